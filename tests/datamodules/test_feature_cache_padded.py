"""The release's context (model.llm.zero_padding=false, model.adapter.use_llm_mask=false) can be cached: T5-style
pad positions attend to the caption, so their outputs are part of the CAM's input; the cache stores all
max_length tokens and a run reading it conditions the UNet exactly as one computing the features online. With
padding masked (every other config), only the real tokens are stored, whatever sits at the padding."""

import io
from pathlib import Path

import numpy as np
import pytest
import torch

from llm4gen.cli import cache
from llm4gen.configs.schema import load_config
from llm4gen.datamodules.shards import iter_tar_samples
from llm4gen.datamodules.synthetic import write_synthetic_shards
from llm4gen.datamodules.webdataset_datamodule import WebDatasetDataModule
from llm4gen.tools.cache_key import DEFAULT_FIELDS, CacheKeyMismatch, check_cache_key
from llm4gen.tools.feature_cache import check_cacheable, keeps_llm_padding, stored_llm_tokens
from tests.helpers.modules import make_module
from tests.helpers.tolerances import ENCODER_OUTPUT

PADDED = ["model.llm.zero_padding=false", "model.adapter.use_llm_mask=false"]


@pytest.fixture(scope="module")
def padded_cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("padded")
    write_synthetic_shards(str(root / "source"), num_samples=4, samples_per_shard=4, resolution=32, seed=3)
    out = root / "cache"
    assert cache.main(["--shards", str(root / "source"), "--output", str(out), "--fields",
                       "latent_moments,llm_features", "--dtype", "float32", "--device", "cpu", *PADDED]) == 0
    return root / "source", out


def first_batch(shards, precomputed_keys):
    dm = WebDatasetDataModule(str(shards), batch_size=4, shuffle_buffer=0, shuffle_shards=False, resolution=32,
                              precomputed_keys=precomputed_keys)
    return next(iter(dm.train_dataloader()))


def test_padded_cache_holds_every_position_and_conditions_like_online(padded_cache, tiny_model_config):
    source, out = padded_cache
    module = make_module(tiny_model_config, **{"llm.zero_padding": False, "adapter.use_llm_mask": False}).eval()
    max_length = module.cfg.llm.max_length
    padded_samples = 0
    for sample in iter_tar_samples(str(out / "shard-000000.tar")):
        caption = sample["txt"].decode()
        stored = torch.from_numpy(np.load(io.BytesIO(sample["llm_features.npy"])))
        online = module.llm([caption])
        assert stored.shape == (max_length, 384)
        real = int(online.mask.sum())
        if real < max_length:  # (a dense shapes caption fills all max_length tokens)
            padded_samples += 1
            assert stored[real:].abs().min() > 0  # pad outputs are not zeros, and kept
        torch.testing.assert_close(stored, online.features[0], **ENCODER_OUTPUT.close)  # cache batches: rounding
    assert padded_samples > 0

    online_batch = first_batch(source / "shard-000000.tar", ())
    cached_batch = first_batch(out / "shard-000000.tar", ["latent_moments", "llm_features"])
    drop = torch.tensor([False, True, False, False])
    with torch.no_grad():
        contexts = [module.conditioning(batch, drop)[0] for batch in (online_batch, cached_batch)]
    assert contexts[0].shape == (4, 77 + max_length, 64)
    torch.testing.assert_close(contexts[1], contexts[0], **ENCODER_OUTPUT.close)  # rounding; other features: O(1)


def test_the_run_must_match_the_caches_padding(padded_cache):
    _, out = padded_cache
    keys = "data.precomputed_keys=[latent_moments,llm_features]"
    check_cache_key(str(out), load_config(overrides=[*PADDED, keys]))
    with pytest.raises(CacheKeyMismatch, match="model.llm.zero_padding=False, this run has True"):
        check_cache_key(str(out), load_config(overrides=[keys]))
    # pad outputs with the padding masked: the stored padding would be read as real tokens
    with pytest.raises(CacheKeyMismatch, match="model.adapter.use_llm_mask=<not recorded>, this run has True"):
        check_cache_key(str(out), load_config(overrides=["model.llm.zero_padding=false", keys]))


def test_stored_tokens_per_padding_mode():
    mask = torch.tensor([True, True, True, False, False])
    assert stored_llm_tokens(mask, keep_padding=False) == 3
    assert stored_llm_tokens(mask, keep_padding=True) == 5
    with pytest.raises(ValueError, match="pads on the left"):
        stored_llm_tokens(torch.tensor([False, True, True]), keep_padding=False)
    release = load_config(overrides=PADDED)
    assert keeps_llm_padding(release)
    assert not keeps_llm_padding(load_config(overrides=["model.llm.zero_padding=false"]))  # masked: real tokens only
    assert not keeps_llm_padding(load_config(overrides=["model.adapter.use_llm_mask=false"]))  # zeros at padding


@pytest.mark.parametrize("config", sorted(p.name for p in (Path(__file__).resolve().parents[2] / "configs").glob("*.yaml")))
def test_every_shipped_config_has_a_cache_recipe(config):
    """cache.py's default fields are accepted for each shipped config (the paper's keep pad outputs)."""
    root = Path(__file__).resolve().parents[2]
    check_cacheable(load_config(root / "configs" / config), DEFAULT_FIELDS)

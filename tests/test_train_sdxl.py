"""train.py, generate.py and attention_maps.py on the embedded tiny SDXL, as a user runs them."""

import numpy as np
import pytest
import torch
from PIL import Image

from llm4gen.cli import attention_maps, generate, train
from llm4gen.datamodules.synthetic import write_synthetic_shards
from tests.helpers.training import FAST


@pytest.fixture(scope="module")
def sdxl_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxl")
    write_synthetic_shards(root / "shards", num_samples=16, samples_per_shard=16, resolution=32)
    out = root / "out"
    assert train.main(["--config", "configs/tiny_sdxl.yaml", f"output_dir={out}", f"data.shards={root / 'shards'}",
                       "data.synthetic_if_missing=false", "trainer.max_steps=3", "checkpoint.every_n_steps=3",
                       "model.objective.lambda_entity=0.1", *FAST]) == 0
    return out


@pytest.mark.slow
def test_sdxl_checkpoint_holds_only_the_trainable_state(sdxl_run):
    ckpt = torch.load(sdxl_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 3
    keys = set(ckpt["state_dict"])
    assert keys and all(k.startswith("adapter.") for k in keys)
    assert ckpt["state_dict"]["adapter.blocks.0.llm_proj.weight"].shape == (80, 384)
    assert ckpt["hyper_parameters"]["model"]["base"]["family"] == "sdxl"
    assert (sdxl_run / "export" / "adapter" / "config.json").exists()


@pytest.mark.slow
def test_generate_on_a_tiny_sdxl_checkpoint_same_seed_same_image(sdxl_run, tmp_path):
    args = ["--checkpoint", str(sdxl_run / "checkpoints" / "last.ckpt"), "--prompt", "a red circle", "--steps", "2"]
    assert generate.main([*args, "--output-dir", str(tmp_path / "a"), "--seed", "7"]) == 0
    assert generate.main([*args, "--output-dir", str(tmp_path / "b"), "--seed", "7"]) == 0
    (a,), (b,) = sorted((tmp_path / "a").glob("*.png")), sorted((tmp_path / "b").glob("*.png"))
    assert Image.open(a).size == (32, 32)
    assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))


@pytest.mark.slow
def test_attention_maps_on_a_tiny_sdxl_checkpoint(sdxl_run, tmp_path, capsys):
    out = tmp_path / "maps.png"
    assert attention_maps.main(["--checkpoint", str(sdxl_run / "checkpoints" / "last.ckpt"), "--prompt",
                                "a red circle and a blue square", "--output", str(out), "--steps", "2",
                                "--panel-size", "32"]) == 0
    printed = capsys.readouterr().out
    assert "red" in printed and "circle" in printed and "2 steps" in printed
    assert Image.open(out).size[0] >= 5 * 32  # the image and four word maps side by side

"""export.py --format diffusers on a tiny run: generate.py --pipeline on the folder writes the images
generate.py --checkpoint writes, and the folder carries a model card the hub can read."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from llm4gen.cli import export, generate, train
from llm4gen.pipelines.model_card import read_card_metadata
from tests.helpers.training import FAST


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "run"
    assert train.main([f"output_dir={out}", f"data.shards={out.parent / 'data'}", "trainer.max_steps=2",
                       "model.ema.enabled=true", "validation.at_start=false", *FAST]) == 0
    return out


def images(folder):
    return [np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))]


@pytest.mark.slow
def test_the_exported_pipeline_writes_the_checkpoints_images_and_a_model_card(run, tmp_path, capsys):
    checkpoint = run / "checkpoints" / "last.ckpt"
    assert export.main(["--checkpoint", str(checkpoint), "--output", str(tmp_path / "pipe")]) == 0
    assert (tmp_path / "pipe" / "model_index.json").is_file() and (tmp_path / "pipe" / "adapter").is_dir()
    common = ["--prompt", "a red circle", "--prompt", "a blue square and a green triangle", "--seed", "5",
              "--steps", "3", "--device", "cpu"]
    assert generate.main(["--checkpoint", str(checkpoint), "--output-dir", str(tmp_path / "a"), *common]) == 0
    assert generate.main(["--pipeline", str(tmp_path / "pipe"), "--output-dir", str(tmp_path / "b"), *common]) == 0
    from_checkpoint, from_pipeline = images(tmp_path / "a"), images(tmp_path / "b")
    assert len(from_checkpoint) == 2 and all(np.array_equal(x, y) for x, y in zip(from_checkpoint, from_pipeline))

    meta = read_card_metadata(tmp_path / "pipe" / "README.md")
    assert meta["library_name"] == "diffusers" and meta["base_model"] == "embedded:shapes-sd"
    assert "connector-cam" in meta["tags"] and meta["license"]
    card = (tmp_path / "pipe" / "README.md").read_text()
    assert "2 optimizer steps" in card and "| train/loss |" in card and "LLM4GenPipeline.from_pretrained" in card


def test_generate_refuses_a_folder_that_is_not_a_pipeline(tmp_path, capsys):
    assert generate.main(["--pipeline", str(tmp_path), "--prompt", "a cat", "--output-dir", str(tmp_path / "o")]) == 2
    assert "has no model_index.json" in capsys.readouterr().err


@pytest.mark.slow
def test_a_tiny_sdxl_run_exports_and_samples_through_generate_pipeline(tmp_path):
    out = tmp_path / "run"
    assert train.main(["--config", "configs/tiny_sdxl.yaml", f"output_dir={out}", f"data.shards={tmp_path / 'data'}",
                       "trainer.max_steps=2", "validation.at_start=false", *FAST]) == 0
    checkpoint = out / "checkpoints" / "last.ckpt"
    assert export.main(["--checkpoint", str(checkpoint), "--output", str(tmp_path / "pipe")]) == 0
    common = ["--prompt", "a red circle", "--seed", "2", "--steps", "2", "--device", "cpu"]
    assert generate.main(["--checkpoint", str(checkpoint), "--output-dir", str(tmp_path / "a"), *common]) == 0
    assert generate.main(["--pipeline", str(tmp_path / "pipe"), "--output-dir", str(tmp_path / "b"), *common]) == 0
    assert all(np.array_equal(x, y) for x, y in zip(images(tmp_path / "a"), images(tmp_path / "b")))
    assert read_card_metadata(tmp_path / "pipe" / "README.md")["base_model"] == "embedded:tiny-sdxl"

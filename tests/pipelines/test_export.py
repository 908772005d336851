"""export.py --format diffusers on a tiny run: generate.py --pipeline on the folder writes the images
generate.py --checkpoint writes, and the folder carries a model card the hub can read."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from llm4gen.cli import export, generate, train
from llm4gen.pipelines.model_card import read_card_metadata
from tests.helpers.training import FAST


@pytest.fixture(scope="module", params=["concat", "gated"])
def run(request, tmp_path_factory):
    """A 2-step tiny run, with the paper's concatenation or the gated fusion (at a rate that opens its gates
    enough to show in the images: a closed gate samples the base)."""
    out = tmp_path_factory.mktemp("export") / "run"
    gated = ["model.adapter.fusion=gated", "model.optim.lr=2e-2"] if request.param == "gated" else []
    assert train.main([f"output_dir={out}", f"data.shards={out.parent / 'data'}", "trainer.max_steps=2",
                       "model.ema.enabled=true", "validation.at_start=false", *FAST, *gated]) == 0
    return out


def images(folder):
    """generate.py's images of a folder, in prompt order (not its grid.png)."""
    return [np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png")) if p.name != "grid.png"]


def folder_bytes(folder) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


BARE_LOAD = """
import sys
import numpy as np
import torch
from diffusers import DDIMScheduler, DiffusionPipeline

torch.set_num_threads(int(sys.argv[3]))  # the test process's count: float sums depend on it
pipe = DiffusionPipeline.from_pretrained(sys.argv[1], trust_remote_code=True)
pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
image = pipe(["a red circle"], negative_prompt=[""], num_inference_steps=3, guidance_scale=7.5,
             generator=[torch.Generator("cpu").manual_seed(5)], output_type="np").images[0]
np.save(sys.argv[2], (image * 255).round().astype(np.uint8))
print(type(pipe).__name__, pipe.unet is not None)
"""


@pytest.mark.slow
def test_the_exported_pipeline_writes_the_checkpoints_images_and_a_model_card(run, tmp_path, capsys):
    checkpoint = run / "checkpoints" / "last.ckpt"
    assert export.main(["--checkpoint", str(checkpoint), "--output", str(tmp_path / "pipe")]) == 0
    assert (tmp_path / "pipe" / "model_index.json").is_file() and (tmp_path / "pipe" / "adapter").is_dir()
    gated = OmegaConf.load(run / "config.yaml").model.adapter.fusion == "gated"
    assert (tmp_path / "pipe" / "fusion" / "config.json").is_file() == gated
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
    assert "frozen parts not copied, loaded from: `vae` = `embedded:shapes-sd (vae)`" in card


@pytest.mark.slow
def test_the_default_export_holds_only_what_trained_and_loads_like_a_full_copy(run, tmp_path):
    """By reference the folder holds the CAM, the tokenizers and the scheduler (the frozen VAE, CLIP, UNet and
    LLM are named in model_index.json's frozen_sources); --full copies them; both sample the same images, and
    a bare DiffusionPipeline.from_pretrained in a fresh process (no llm4gen import of its own) does too."""
    import json
    import subprocess
    import sys

    checkpoint = run / "checkpoints" / "last.ckpt"
    referenced, full = tmp_path / "referenced", tmp_path / "full"
    assert export.main(["--checkpoint", str(checkpoint), "--output", str(referenced)]) == 0
    assert export.main(["--checkpoint", str(checkpoint), "--output", str(full), "--full"]) == 0
    assert not {"vae", "text_encoder", "unet", "llm"} & {p.name for p in referenced.iterdir()}
    index = json.loads((referenced / "model_index.json").read_text())
    assert index["vae"] == [None, None] and set(index["frozen_sources"]) == {"vae", "text_encoder", "unet", "llm"}
    assert index["_class_name"] == ["pipeline", "LLM4GenPipeline"] and (referenced / "pipeline.py").is_file()
    small, big = folder_bytes(referenced), folder_bytes(full)
    assert small < 5_000_000 and big > 100_000_000, (small, big)  # 29 M frozen parameters are 116 MB in fp32
    common = ["--prompt", "a red circle", "--seed", "5", "--steps", "3", "--device", "cpu"]
    for name, folder in (("r", referenced), ("f", full)):
        assert generate.main(["--pipeline", str(folder), "--output-dir", str(tmp_path / name), *common]) == 0
    assert generate.main(["--checkpoint", str(checkpoint), "--output-dir", str(tmp_path / "c"), *common]) == 0
    expected = images(tmp_path / "c")[0]
    assert np.array_equal(images(tmp_path / "r")[0], expected) and np.array_equal(images(tmp_path / "f")[0], expected)
    script = tmp_path / "bare.py"
    script.write_text(BARE_LOAD)
    for folder in (referenced, full):
        result = subprocess.run([sys.executable, str(script), str(folder), str(tmp_path / f"{folder.name}.npy"),
                                 str(torch.get_num_threads())],
                                cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "LLM4GenPipeline True" in result.stdout
        assert np.array_equal(np.load(tmp_path / f"{folder.name}.npy"), expected)


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

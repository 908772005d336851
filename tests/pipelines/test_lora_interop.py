"""A LoRA run's export/unet_lora/ is in the format diffusers and peft read: it loads with load_lora_weights into
a stock StableDiffusionPipeline built from the same base (no connector, no llm4gen code in the pipeline), changes
its images, and fused (fuse_lora) gives the unfused images."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llm4gen.cli import train
from llm4gen.encoders.sources import resolve_source
from tests.helpers.training import FAST
from tests.helpers.tolerances import IMAGES


@pytest.mark.slow
def test_the_exported_lora_loads_into_a_stock_pipeline_and_fuses_to_the_same_images(tmp_path):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    out = tmp_path / "run"
    assert train.main([f"output_dir={out}", f"data.shards={tmp_path / 'data'}", "trainer.max_steps=3",
                       "model.unet_training=lora", "model.lora.rank=4", "model.optim.lr=1e-2",
                       "validation.at_start=false", *FAST]) == 0
    assert (out / "export" / "unet_lora" / "pytorch_lora_weights.safetensors").is_file()

    pipe = StableDiffusionPipeline.from_pretrained(resolve_source("embedded:shapes-sd"), safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)

    def sample():
        return pipe("a red circle", num_inference_steps=3, guidance_scale=4.0,
                    generator=torch.Generator("cpu").manual_seed(0), output_type="np").images

    stock = sample()
    pipe.load_lora_weights(str(out / "export" / "unet_lora"))
    with_lora = sample()
    assert np.abs(with_lora - stock).max() > 100 * IMAGES.atol  # the trained LoRA changes what the base draws (0.43)
    pipe.fuse_lora()
    np.testing.assert_allclose(sample(), with_lora, **IMAGES.close)  # W + BA summed once: rounding (measured 3.7e-6)


@pytest.mark.slow
def test_a_lora_run_exports_as_a_pipeline_with_the_lora_fused_and_kept_apart(tmp_path):
    """export.py on a LoRA run: the pipeline's UNet has the LoRA merged in (a plain UNet, no peft layers),
    its images are generate.py --checkpoint's within one grey level, and unet_lora/ beside it loads with
    load_lora_weights."""
    import json

    from PIL import Image

    from llm4gen.cli import export, generate

    out = tmp_path / "run"
    assert train.main([f"output_dir={out}", f"data.shards={tmp_path / 'data'}", "trainer.max_steps=3",
                       "model.unet_training=lora", "model.lora.rank=4", "model.optim.lr=1e-2",
                       "validation.at_start=false", *FAST]) == 0
    checkpoint = out / "checkpoints" / "last.ckpt"
    assert export.main(["--checkpoint", str(checkpoint), "--output", str(tmp_path / "pipe")]) == 0
    pipe_dir = tmp_path / "pipe"
    assert (pipe_dir / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (pipe_dir / "unet_lora" / "pytorch_lora_weights.safetensors").is_file()
    assert "unet" not in json.loads((pipe_dir / "model_index.json").read_text())["frozen_sources"]
    from safetensors import safe_open

    with safe_open(str(pipe_dir / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as handle:
        assert not [k for k in handle.keys() if "lora" in k]  # merged, not carried as LoRA layers
    common = ["--prompt", "a red circle", "--seed", "3", "--steps", "3", "--device", "cpu"]
    assert generate.main(["--checkpoint", str(checkpoint), "--output-dir", str(tmp_path / "a"), *common]) == 0
    assert generate.main(["--pipeline", str(pipe_dir), "--output-dir", str(tmp_path / "b"), *common]) == 0
    a, b = (np.asarray(Image.open(next((tmp_path / d).glob("000-*.png"))), dtype=np.int16) for d in ("a", "b"))
    assert np.abs(a - b).max() <= 1

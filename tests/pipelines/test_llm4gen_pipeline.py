"""LLM4GenPipeline (pipelines/llm4gen_pipeline.py): a trained module's pipeline samples the images the module's
own generate() samples, and a saved pipeline loads back (from another process's view: only the folder) to the
same images; ELLA's connector is called at every denoising step inside the pipeline too, and a gated fusion
travels with the folder."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from llm4gen.pipelines import LLM4GenPipeline, pipeline_from_module
from tests.helpers.modules import make_module

PROMPTS = ["a red circle and a blue square", "a green triangle"]
SETTINGS = dict(num_inference_steps=3, guidance_scale=4.0)


def module_images(module):
    return np.asarray(module.generate(PROMPTS, seeds=[0, 1], output_type="np", **SETTINGS))


def pipeline_images(pipe):
    generators = [torch.Generator("cpu").manual_seed(s) for s in (0, 1)]
    return pipe(PROMPTS, generator=generators, output_type="np", **SETTINGS).images


EXTRA = {"ella": {"adapter.ella": {"num_latents": 8, "num_blocks": 1, "width": 64, "num_heads": 4, "time_channels": 16}},
         "gated": {"adapter.kind": "cam", "adapter.fusion": "gated"}}


def open_gates(module):
    """Gates away from zero, so that the LLM branch shows in the images (a closed gate samples the base)."""
    if module.fusion is not None:
        with torch.no_grad():
            for i, layer in enumerate(module.fusion.layers.values()):
                layer.gate.fill_(0.3 + 0.05 * i)
    return module


@pytest.fixture(scope="module", params=["cam", "ella", "gated"])
def module(request, tiny_model_config):
    torch.manual_seed(0)
    return open_gates(make_module(tiny_model_config, **{"adapter.kind": request.param, **EXTRA.get(request.param, {})}))


def test_the_pipeline_samples_what_the_module_samples(module):
    np.testing.assert_allclose(pipeline_images(pipeline_from_module(module)), module_images(module), atol=1e-5, rtol=0)


def test_num_images_per_prompt_repeats_the_context(module):
    pipe = pipeline_from_module(module)
    images = pipe(PROMPTS[:1], num_images_per_prompt=2, generator=torch.Generator("cpu").manual_seed(0),
                  output_type="np", **SETTINGS).images
    assert images.shape[0] == 2 and np.abs(images[0] - images[1]).max() > 0  # two noises, one prompt


def test_a_saved_pipeline_loads_back_to_the_same_images(module, tmp_path):
    pipe = pipeline_from_module(module)
    pipe.save_pretrained(tmp_path / "pipe")
    expected = pipeline_images(pipe)
    loaded = LLM4GenPipeline.from_pretrained(tmp_path / "pipe")
    assert type(loaded.adapter) is type(module.adapter) and (loaded.fusion is None) == (module.fusion is None)
    np.testing.assert_allclose(pipeline_images(loaded), expected, atol=1e-6, rtol=0)


@pytest.mark.slow
def test_a_fresh_process_loads_the_folder_with_the_installed_package_alone(module, tmp_path):
    pipe = pipeline_from_module(module)
    pipe.save_pretrained(tmp_path / "pipe")
    np.save(tmp_path / "expected.npy", pipeline_images(pipe))
    script = (f"import numpy as np, torch\ntorch.set_num_threads({torch.get_num_threads()})\n"
              f"from llm4gen.pipelines import LLM4GenPipeline\n"
              f"pipe = LLM4GenPipeline.from_pretrained({str(tmp_path / 'pipe')!r})\n"
              f"g = [torch.Generator('cpu').manual_seed(s) for s in (0, 1)]\n"
              f"out = pipe({PROMPTS!r}, generator=g, output_type='np', num_inference_steps=3, guidance_scale=4.0).images\n"
              f"np.testing.assert_allclose(out, np.load({str(tmp_path / 'expected.npy')!r}), atol=1e-5, rtol=0)\n"
              f"print('same images')\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "same images" in result.stdout, result.stderr[-2000:]


@pytest.mark.parametrize("kind", ["cam", "ella", "gated"])
def test_the_xl_pipeline_samples_what_the_sdxl_module_samples_and_round_trips(kind, tmp_path):
    from omegaconf import OmegaConf

    from llm4gen.configs.schema import load_config
    from llm4gen.pipelines import LLM4GenXLPipeline

    sdxl = OmegaConf.to_container(load_config("configs/tiny_sdxl.yaml").model, resolve=True)
    torch.manual_seed(0)
    module = open_gates(make_module(sdxl, **{"adapter.kind": kind, **EXTRA.get(kind, {})}))
    pipe = pipeline_from_module(module)
    assert isinstance(pipe, LLM4GenXLPipeline)
    expected = module_images(module)
    np.testing.assert_allclose(pipeline_images(pipe), expected, atol=1e-5, rtol=0)
    pipe.save_pretrained(tmp_path / "xl")
    np.testing.assert_allclose(pipeline_images(LLM4GenXLPipeline.from_pretrained(tmp_path / "xl")), expected,
                               atol=1e-5, rtol=0)

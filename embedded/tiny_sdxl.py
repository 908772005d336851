"""The embedded tiny SDXL: a Stable Diffusion XL-shaped model small enough to train on a laptop CPU.

Built like the tiny SD1.5 (``embedded/tiny.py``): random weights from configs (fixed seed), written in
the diffusers SDXL folder layout (``unet/``, ``vae/``, ``text_encoder/``, ``text_encoder_2/``,
``tokenizer/``, ``tokenizer_2/``, ``scheduler/``), so training loads it through the same
``from_pretrained`` path as ``stabilityai/stable-diffusion-xl-base-1.0``. What makes it SDXL-shaped:

- two CLIP text encoders of different widths (32 and 48 here, 768 and 1280 in SDXL), the second a
  ``CLIPTextModelWithProjection`` whose pooled, projected output conditions the UNet; the UNet
  cross-attends to both penultimate hidden states concatenated (80 wide here, 2048 in SDXL);
- the same CLIP BPE for both tokenizers, padded with ``<|endoftext|>`` by the first and ``!`` by the
  second, as SDXL base 1.0 ships them;
- a UNet with ``addition_embed_type="text_time"``: the pooled embedding and six size/crop time ids
  (each embedded in ``addition_time_embed_dim``) are added to the timestep embedding; no cross-attention
  at the highest resolution and several transformer layers per block at the lowest, as in SDXL;
- SDXL's VAE scaling factor (0.13025) and its Euler scheduler config.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from llm4gen.embedded.registry import (
    CLIP_TOKENIZER_DIR,
    SDXL_SCHEDULER,
    TINY_CLIP_1,
    TINY_CLIP_2,
    TINY_SDXL_UNET,
    TINY_SDXL_VAE,
    TINY_SDXL_VERSION,
)
from llm4gen.embedded.tiny import built_once


def build_tiny_sdxl(directory, seed: int = 0) -> Path:
    """Writes the tiny SDXL folder (deterministic for a seed) and returns its path."""
    with torch.random.fork_rng(devices=[]):  # leave the caller's random stream as it was
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**TINY_SDXL_UNET)
        vae = AutoencoderKL(**TINY_SDXL_VAE)
        text_encoder = CLIPTextModel(CLIPTextConfig(**TINY_CLIP_1))
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**TINY_CLIP_2))
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
        tokenizer=CLIPTokenizer.from_pretrained(CLIP_TOKENIZER_DIR),
        tokenizer_2=CLIPTokenizer.from_pretrained(CLIP_TOKENIZER_DIR, pad_token="!"),
        unet=unet, scheduler=EulerDiscreteScheduler(**SDXL_SCHEDULER))
    pipe.save_pretrained(directory)
    return Path(directory)


def tiny_sdxl_path() -> Path:
    """The tiny SDXL folder in the cache, built on first use."""
    return built_once(TINY_SDXL_VERSION, build_tiny_sdxl)

"""Loads the frozen parts of a Stable Diffusion base model from a diffusers folder or hub id.

``family`` selects the layout; SD1.5 is implemented. SDXL adds a second CLIP encoder, a pooled
embedding and size/crop time ids: it slots in as another entry of ``LOADERS`` whose text encoder
returns those in ``ClipText.unet_kwargs``; the LightningModule passes them through unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from encoders.clip import ClipTextEncoder
from encoders.sources import TORCH_DTYPES, load_pretrained


@dataclass
class BaseModel:
    vae: AutoencoderKL
    unet: UNet2DConditionModel
    text: ClipTextEncoder
    noise_scheduler: DDPMScheduler  # training noise schedule, from the base model's own scheduler config


def load_sd15(source: str, revision: str | None, dtype: torch.dtype, vae_dtype: torch.dtype) -> BaseModel:
    def part(cls, subfolder, **kwargs):
        return load_pretrained(cls.from_pretrained, source, f"model.base.pretrained ({subfolder})",
                               subfolder=subfolder, revision=revision, **kwargs)

    vae = part(AutoencoderKL, "vae", torch_dtype=vae_dtype)
    unet = part(UNet2DConditionModel, "unet", torch_dtype=dtype)
    text = ClipTextEncoder(part(CLIPTokenizer, "tokenizer"), part(CLIPTextModel, "text_encoder", dtype=dtype))
    # Latent diffusion never clips x0 to [-1, 1]; SD folders ship a PNDM config that leaves it unset.
    scheduler = part(DDPMScheduler, "scheduler", clip_sample=False)
    for module in (vae, unet):
        module.requires_grad_(False).eval()
    return BaseModel(vae=vae, unet=unet, text=text, noise_scheduler=scheduler)


LOADERS = {"sd15": load_sd15}


def load_base_model(cfg) -> BaseModel:
    """From the ``model.base`` config section."""
    return LOADERS[cfg.family](cfg.pretrained, cfg.revision, TORCH_DTYPES[cfg.dtype], TORCH_DTYPES[cfg.vae_dtype])

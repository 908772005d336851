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
from encoders.strict_loading import load_strict

# Buffers that older checkpoints saved and current classes no longer persist: not weights.
IGNORED_UNEXPECTED = ("text_model.embeddings.position_ids",)
BASE_HINT = ("model.base.pretrained must be a Stable Diffusion 1.5 folder in the diffusers layout (unet/, vae/, "
             "text_encoder/, tokenizer/, scheduler/) or its hub id; model.base.unet a diffusers UNet folder")


@dataclass
class BaseModel:
    vae: AutoencoderKL
    unet: UNet2DConditionModel
    text: ClipTextEncoder
    noise_scheduler: DDPMScheduler  # training noise schedule, from the base model's own scheduler config


def load_sd15(source: str, revision: str | None, dtype: torch.dtype, vae_dtype: torch.dtype,
              unet_source: str | None = None) -> BaseModel:
    """``unet_source`` replaces the base's UNet (the released LLM4GEN model ships a fine-tuned ``unet/``)."""
    def part(cls, subfolder, **kwargs):
        return load_pretrained(cls.from_pretrained, source, f"model.base.pretrained ({subfolder})",
                               subfolder=subfolder, revision=revision, **kwargs)

    def weights(cls, subfolder, **kwargs):  # every weight matched by name and shape, or refused
        return load_strict(cls.from_pretrained, source, f"model.base.pretrained ({subfolder})",
                           allowed_unexpected=IGNORED_UNEXPECTED, hint=BASE_HINT, subfolder=subfolder,
                           revision=revision, **kwargs)

    vae = weights(AutoencoderKL, "vae", torch_dtype=vae_dtype)
    if unet_source:
        unet = load_strict(UNet2DConditionModel.from_pretrained, unet_source, "model.base.unet", hint=BASE_HINT,
                           torch_dtype=dtype)
    else:
        unet = weights(UNet2DConditionModel, "unet", torch_dtype=dtype)
    text = ClipTextEncoder(part(CLIPTokenizer, "tokenizer"), weights(CLIPTextModel, "text_encoder", dtype=dtype))
    # Latent diffusion never clips x0 to [-1, 1]; SD folders ship a PNDM config that leaves it unset.
    scheduler = part(DDPMScheduler, "scheduler", clip_sample=False)
    for module in (vae, unet):
        module.requires_grad_(False).eval()
    return BaseModel(vae=vae, unet=unet, text=text, noise_scheduler=scheduler)


LOADERS = {"sd15": load_sd15}


def load_base_model(cfg) -> BaseModel:
    """From the ``model.base`` config section."""
    return LOADERS[cfg.family](cfg.pretrained, cfg.revision, TORCH_DTYPES[cfg.dtype], TORCH_DTYPES[cfg.vae_dtype],
                               unet_source=cfg.get("unet"))

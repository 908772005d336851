"""Loads the frozen parts of a Stable Diffusion base model from a diffusers folder or hub id.

``family`` selects the layout: ``sd15`` (one CLIP encoder) or ``sdxl`` (two CLIP encoders, a pooled
embedding and size/crop time ids, see ``encoders.sdxl``). Each family's text encoder has the same
interface, so the LightningModule never asks which family it holds.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from encoders.clip import ClipTextEncoder
from encoders.sdxl import SdxlTextEncoder
from encoders.sources import TORCH_DTYPES, load_pretrained


@dataclass
class BaseModel:
    vae: AutoencoderKL
    unet: UNet2DConditionModel
    text: ClipTextEncoder | SdxlTextEncoder
    noise_scheduler: DDPMScheduler  # training noise schedule, from the base model's own scheduler config


def _loader(source: str, revision: str | None):
    def part(cls, subfolder, **kwargs):
        return load_pretrained(cls.from_pretrained, source, f"model.base.pretrained ({subfolder})",
                               subfolder=subfolder, revision=revision, **kwargs)
    return part


def _base_model(part, text, dtype: torch.dtype, vae_dtype: torch.dtype, unet=None) -> BaseModel:
    vae = part(AutoencoderKL, "vae", torch_dtype=vae_dtype)
    unet = unet if unet is not None else part(UNet2DConditionModel, "unet", torch_dtype=dtype)
    # Latent diffusion never clips x0 to [-1, 1]; SD folders ship a PNDM config that leaves it unset
    # (SDXL's Euler config is read as DDPM's training schedule the same way).
    scheduler = part(DDPMScheduler, "scheduler", clip_sample=False)
    for module in (vae, unet):
        module.requires_grad_(False).eval()
    return BaseModel(vae=vae, unet=unet, text=text, noise_scheduler=scheduler)


def load_sd15(source: str, revision: str | None, dtype: torch.dtype, vae_dtype: torch.dtype) -> BaseModel:
    part = _loader(source, revision)
    text = ClipTextEncoder(part(CLIPTokenizer, "tokenizer"), part(CLIPTextModel, "text_encoder", dtype=dtype))
    return _base_model(part, text, dtype, vae_dtype)


def load_sdxl(source: str, revision: str | None, dtype: torch.dtype, vae_dtype: torch.dtype) -> BaseModel:
    part = _loader(source, revision)
    unet = part(UNet2DConditionModel, "unet", torch_dtype=dtype)
    if unet.config.addition_embed_type != "text_time":
        raise ValueError(f"model.base.family=sdxl but {source!r} has a UNet with addition_embed_type="
                         f"{unet.config.addition_embed_type!r}, not 'text_time': is it an SD1.5 folder? "
                         f"Set model.base.family=sd15 for it, or point model.base.pretrained at an SDXL folder")
    text = SdxlTextEncoder(part(CLIPTokenizer, "tokenizer"), part(CLIPTokenizer, "tokenizer_2"),
                           part(CLIPTextModel, "text_encoder", dtype=dtype),
                           part(CLIPTextModelWithProjection, "text_encoder_2", dtype=dtype))
    return _base_model(part, text, dtype, vae_dtype, unet=unet)


LOADERS = {"sd15": load_sd15, "sdxl": load_sdxl}


def load_base_model(cfg) -> BaseModel:
    """From the ``model.base`` config section."""
    return LOADERS[cfg.family](cfg.pretrained, cfg.revision, TORCH_DTYPES[cfg.dtype], TORCH_DTYPES[cfg.vae_dtype])

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

from llm4gen.configs.setup_checks import check_sdxl_unet
from llm4gen.encoders.clip import ClipTextEncoder
from llm4gen.encoders.sdxl import SdxlTextEncoder
from llm4gen.encoders.sources import TORCH_DTYPES, load_pretrained
from llm4gen.encoders.strict_loading import load_strict

# Buffers that older checkpoints saved and current classes no longer persist: not weights.
IGNORED_UNEXPECTED = ("text_model.embeddings.position_ids",)
BASE_HINT = ("model.base.pretrained must be a Stable Diffusion folder in the diffusers layout (unet/, vae/, "
             "text_encoder/, tokenizer/, scheduler/; SDXL adds text_encoder_2/, tokenizer_2/) of model.base.family, "
             "or its hub id; model.base.unet a diffusers UNet folder")


@dataclass
class BaseModel:
    vae: AutoencoderKL
    unet: UNet2DConditionModel
    text: ClipTextEncoder | SdxlTextEncoder
    noise_scheduler: DDPMScheduler  # training noise schedule, from the base model's own scheduler config


def _loaders(source: str, revision: str | None):
    """``part`` loads configs, tokenizers and schedulers; ``weights`` loads a model strictly: every weight
    matched by name and shape, or refused (encoders/strict_loading.py)."""
    def part(cls, subfolder, **kwargs):
        return load_pretrained(cls.from_pretrained, source, f"model.base.pretrained ({subfolder})",
                               subfolder=subfolder, revision=revision, **kwargs)

    def weights(cls, subfolder, **kwargs):
        return load_strict(cls.from_pretrained, source, f"model.base.pretrained ({subfolder})",
                           allowed_unexpected=IGNORED_UNEXPECTED, hint=BASE_HINT, subfolder=subfolder,
                           revision=revision, **kwargs)
    return part, weights


def _load_unet(weights, dtype: torch.dtype, unet_source: str | None) -> UNet2DConditionModel:
    """``unet_source`` replaces the base's UNet (the released LLM4GEN model ships a fine-tuned ``unet/``)."""
    if unet_source:
        return load_strict(UNet2DConditionModel.from_pretrained, unet_source, "model.base.unet", hint=BASE_HINT,
                           torch_dtype=dtype)
    return weights(UNet2DConditionModel, "unet", torch_dtype=dtype)


def _base_model(part, weights, text, unet, vae_dtype: torch.dtype) -> BaseModel:
    vae = weights(AutoencoderKL, "vae", torch_dtype=vae_dtype)
    # Latent diffusion never clips x0 to [-1, 1]; SD folders ship a PNDM config that leaves it unset
    # (SDXL's Euler config is read as DDPM's training schedule the same way).
    scheduler = part(DDPMScheduler, "scheduler", clip_sample=False)
    for module in (vae, unet):
        module.requires_grad_(False).eval()
    return BaseModel(vae=vae, unet=unet, text=text, noise_scheduler=scheduler)


def load_sd15(source: str, revision: str | None, dtype: torch.dtype, vae_dtype: torch.dtype,
              unet_source: str | None = None, clip_chunks: int = 1) -> BaseModel:
    part, weights = _loaders(source, revision)
    text = ClipTextEncoder(part(CLIPTokenizer, "tokenizer"), weights(CLIPTextModel, "text_encoder", dtype=dtype),
                           chunks=clip_chunks)
    return _base_model(part, weights, text, _load_unet(weights, dtype, unet_source), vae_dtype)


def load_sdxl(source: str, revision: str | None, dtype: torch.dtype, vae_dtype: torch.dtype,
              unet_source: str | None = None, clip_chunks: int = 1) -> BaseModel:
    part, weights = _loaders(source, revision)
    unet = _load_unet(weights, dtype, unet_source)
    check_sdxl_unet(unet_source or source, unet.config.addition_embed_type)  # load_config refuses it first
    text = SdxlTextEncoder(part(CLIPTokenizer, "tokenizer"), part(CLIPTokenizer, "tokenizer_2"),
                           weights(CLIPTextModel, "text_encoder", dtype=dtype),
                           weights(CLIPTextModelWithProjection, "text_encoder_2", dtype=dtype), chunks=clip_chunks)
    return _base_model(part, weights, text, unet, vae_dtype)


LOADERS = {"sd15": load_sd15, "sdxl": load_sdxl}


def load_base_model(cfg) -> BaseModel:
    """From the ``model.base`` config section."""
    return LOADERS[cfg.family](cfg.pretrained, cfg.revision, TORCH_DTYPES[cfg.dtype], TORCH_DTYPES[cfg.vae_dtype],
                               unet_source=cfg.unet, clip_chunks=cfg.clip_chunks)

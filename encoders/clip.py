"""The frozen CLIP text encoder of Stable Diffusion 1.5: 77 tokens, last hidden state.

Every base-model family's text encoder (this one; ``encoders.sdxl.SdxlTextEncoder``) has the same
interface, which is all the LightningModule uses: ``forward(prompts) -> ClipText``, ``tokenizer`` (the
one whose 77 positions the UNet context starts with), ``hidden_size``, ``unet_kwargs`` (the UNet's
extra text-side inputs) and ``pipeline`` / ``pipeline_inputs`` (the family's diffusers pipeline).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class ClipText:
    hidden: torch.Tensor  # (batch, 77, clip_dim): what the UNet cross-attends to
    pooled: torch.Tensor | None = None  # (batch, pooled_dim): SDXL's pooled text embedding; None for SD1.5


def where_text(keep: torch.Tensor, text: ClipText, other: ClipText) -> ClipText:
    """Row-wise ``text`` where ``keep`` (batch,) is True, else ``other`` (one row broadcasts)."""
    hidden = torch.where(keep.view(-1, 1, 1), text.hidden, other.hidden.to(text.hidden.dtype))
    pooled = None
    if text.pooled is not None:
        pooled = torch.where(keep.view(-1, 1), text.pooled, other.pooled.to(text.pooled.dtype))
    return ClipText(hidden=hidden, pooled=pooled)


def tokenize(tokenizer, prompts: list[str]) -> torch.Tensor:
    """(batch, model_max_length) ids, padded and truncated as the diffusers pipelines do."""
    return tokenizer(prompts, max_length=tokenizer.model_max_length, padding="max_length",
                     truncation=True, return_tensors="pt").input_ids


class ClipTextEncoder(nn.Module):
    def __init__(self, tokenizer, text_encoder):
        super().__init__()
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder.requires_grad_(False).eval()

    @property
    def hidden_size(self) -> int:
        return self.text_encoder.config.hidden_size

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        return tokenize(self.tokenizer, prompts)

    @torch.no_grad()
    def forward(self, prompts: list[str]) -> ClipText:
        ids = self.tokenize(prompts).to(self.text_encoder.device)
        return ClipText(hidden=self.text_encoder(ids).last_hidden_state)  # (batch, 77, clip_dim)

    def unet_kwargs(self, text: ClipText, batch: dict, target_size: tuple[int, int]) -> dict:
        return {}  # SD1.5's UNet takes the context alone

    def pipeline(self, vae, unet, scheduler):
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline(vae=vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer, unet=unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)

    def pipeline_inputs(self, text: ClipText, negative: ClipText) -> dict:
        return {}  # prompt_embeds / negative_prompt_embeds (the fused contexts) are all SD1.5 needs

"""The frozen CLIP text encoder of Stable Diffusion 1.5: 77 tokens, last hidden state."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class ClipText:
    hidden: torch.Tensor  # (batch, 77, clip_dim): what the UNet cross-attends to
    # Extra UNet inputs that come from the text side. Empty for SD1.5; SDXL puts its pooled text
    # embedding here (with the size/crop time ids as ``added_cond_kwargs``).
    unet_kwargs: dict = field(default_factory=dict)


class ClipTextEncoder(nn.Module):
    def __init__(self, tokenizer, text_encoder):
        super().__init__()
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder.requires_grad_(False).eval()

    @property
    def hidden_size(self) -> int:
        return self.text_encoder.config.hidden_size

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        return self.tokenizer(prompts, max_length=self.tokenizer.model_max_length, padding="max_length",
                              truncation=True, return_tensors="pt").input_ids

    @torch.no_grad()
    def forward(self, prompts: list[str]) -> ClipText:
        ids = self.tokenize(prompts).to(self.text_encoder.device)
        return ClipText(hidden=self.text_encoder(ids).last_hidden_state)  # (batch, 77, clip_dim)

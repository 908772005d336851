"""The frozen CLIP text encoder of Stable Diffusion 1.5: 77 tokens, last hidden state.

``chunks > 1`` reads a long caption the way SD front-ends do: its tokens in consecutive windows of 75,
each wrapped in BOS/EOS and padded to 77, encoded separately and concatenated, (batch, 77 * chunks,
clip_dim). The first window is exactly what one-window CLIP sees; windows past the caption's end hold
the empty prompt.

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


def tokenize_chunks(tokenizer, prompts: list[str], chunks: int = 1) -> torch.Tensor:
    """(batch * chunks, model_max_length) ids: each prompt's tokens in consecutive windows of
    ``model_max_length - 2``, each as the pipelines tokenize a prompt (BOS, tokens, EOS, padding); rows
    ``b * chunks .. b * chunks + chunks - 1`` are prompt ``b``'s. ``chunks=1`` is ``tokenize``."""
    if chunks == 1:
        return tokenize(tokenizer, prompts)
    length = tokenizer.model_max_length
    body = length - 2
    content = tokenizer(list(prompts), add_special_tokens=False, verbose=False).input_ids
    rows = []
    for ids in content:
        for window in range(chunks):
            row = [tokenizer.bos_token_id, *ids[window * body:(window + 1) * body], tokenizer.eos_token_id]
            rows.append(row + [tokenizer.pad_token_id] * (length - len(row)))
    return torch.tensor(rows)


class ClipTextEncoder(nn.Module):
    def __init__(self, tokenizer, text_encoder, chunks: int = 1):
        super().__init__()
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder.requires_grad_(False).eval()
        self.chunks = chunks

    @property
    def hidden_size(self) -> int:
        return self.text_encoder.config.hidden_size

    @property
    def context_length(self) -> int:
        """Tokens of the CLIP part of the UNet context: 77 per chunk."""
        return self.tokenizer.model_max_length * self.chunks

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        return tokenize_chunks(self.tokenizer, prompts, self.chunks)

    @torch.no_grad()
    def forward(self, prompts: list[str]) -> ClipText:
        ids = self.tokenize(prompts).to(self.text_encoder.device)  # (batch * chunks, 77)
        hidden = self.text_encoder(ids).last_hidden_state
        return ClipText(hidden=hidden.reshape(len(prompts), self.context_length, -1))  # (batch, 77 * chunks, clip_dim)

    def unet_kwargs(self, text: ClipText, target_size: tuple[int, int], original_size: torch.Tensor | None = None,
                    crop_top_left: torch.Tensor | None = None) -> dict:
        return {}  # SD1.5's UNet takes the context alone

    def pipeline(self, vae, unet, scheduler):
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline(vae=vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer, unet=unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)

    def pipeline_inputs(self, text: ClipText, negative: ClipText) -> dict:
        return {}  # prompt_embeds / negative_prompt_embeds (the fused contexts) are all SD1.5 needs

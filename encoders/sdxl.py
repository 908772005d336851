"""Stable Diffusion XL's text conditioning, as diffusers' ``StableDiffusionXLPipeline`` computes it.

- Two frozen CLIP text encoders (CLIP ViT-L and OpenCLIP ViT-bigG in SDXL) read the same prompt, each
  with its own tokenizer (same BPE; SDXL base 1.0 pads the first with ``<|endoftext|>``, the second
  with ``!``). The UNet context is both penultimate hidden states concatenated:
  (batch, 77, 768 + 1280 = 2048).
- The pooled text embedding is the second encoder's projected end-of-text feature: (batch, 1280).
- ``time_ids`` (batch, 6) = original size (h, w), crop top-left (top, left), target size (h, w), in
  pixels; the UNet embeds them with the pooled embedding and adds both to the timestep embedding.
"""

from __future__ import annotations

import torch
from torch import nn

from llm4gen.encoders.clip import ClipText, tokenize_chunks


def add_time_ids(target_size: tuple[int, int], batch_size: int, original_sizes: torch.Tensor | None = None,
                 crops_top_left: torch.Tensor | None = None, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """SDXL's size/crop conditioning, (batch, 6) = [orig_h, orig_w, crop_top, crop_left, target_h, target_w].

    Without recorded sizes the image is taken as uncropped at the target size (what the pipeline uses
    at inference by default).
    """
    target = torch.tensor(target_size, dtype=torch.float64).expand(batch_size, 2)
    original = target if original_sizes is None else torch.as_tensor(original_sizes, dtype=torch.float64)
    crop = torch.zeros(batch_size, 2, dtype=torch.float64) if crops_top_left is None else \
        torch.as_tensor(crops_top_left, dtype=torch.float64)
    for name, value in (("original_size", original), ("crop_top_left", crop)):
        if value.shape != (batch_size, 2):
            raise ValueError(f"{name} must be (batch={batch_size}, 2) pixels as (h, w) / (top, left), "
                             f"got shape {tuple(value.shape)}")
    return torch.cat([original.cpu(), crop.cpu(), target], dim=1).to(device=device, dtype=dtype)


class SdxlTextEncoder(nn.Module):
    def __init__(self, tokenizer, tokenizer_2, text_encoder, text_encoder_2, chunks: int = 1):
        super().__init__()
        self.chunks = chunks  # > 1: consecutive 77-token windows concatenated; the pooled embedding is the first's
        self.tokenizer, self.tokenizer_2 = tokenizer, tokenizer_2
        self.text_encoder = text_encoder.requires_grad_(False).eval()
        self.text_encoder_2 = text_encoder_2.requires_grad_(False).eval()
        if not hasattr(text_encoder_2, "text_projection"):
            raise ValueError(f"SDXL's second text encoder must be a CLIPTextModelWithProjection (it gives the pooled "
                             f"embedding), got {type(text_encoder_2).__name__}")

    @property
    def hidden_size(self) -> int:
        return self.text_encoder.config.hidden_size + self.text_encoder_2.config.hidden_size

    @property
    def context_length(self) -> int:
        return self.tokenizer.model_max_length * self.chunks

    @property
    def pooled_size(self) -> int:
        return self.text_encoder_2.config.projection_dim

    @torch.no_grad()
    def forward(self, prompts: list[str]) -> ClipText:
        first = self.text_encoder(tokenize_chunks(self.tokenizer, prompts, self.chunks).to(self.text_encoder.device),
                                  output_hidden_states=True)
        second = self.text_encoder_2(tokenize_chunks(self.tokenizer_2, prompts, self.chunks).to(self.text_encoder_2.device),
                                     output_hidden_states=True)
        hidden = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)  # (batch * chunks, 77, d1 + d2)
        pooled = second.text_embeds.reshape(len(prompts), self.chunks, -1)[:, 0]  # (batch, projection_dim)
        return ClipText(hidden=hidden.reshape(len(prompts), self.context_length, -1), pooled=pooled)

    def unet_kwargs(self, text: ClipText, target_size: tuple[int, int], original_size: torch.Tensor | None = None,
                    crop_top_left: torch.Tensor | None = None) -> dict:
        """The UNet's ``added_cond_kwargs``; sizes from ``original_size`` / ``crop_top_left`` (batch, 2) when the
        data recorded them, else the target size and no crop."""
        if text.pooled is None:
            raise ValueError("SDXL needs the pooled text embedding; cached CLIP features without 'clip_pooled'?")
        time_ids = add_time_ids(target_size, text.pooled.shape[0], original_size, crop_top_left,
                                dtype=text.pooled.dtype, device=text.pooled.device)
        return {"added_cond_kwargs": {"text_embeds": text.pooled, "time_ids": time_ids}}

    def pipeline(self, vae, unet, scheduler):
        from diffusers import StableDiffusionXLPipeline

        # The negative prompt goes through the CAM like the prompt, never replaced by zeros.
        return StableDiffusionXLPipeline(vae=vae, text_encoder=self.text_encoder, text_encoder_2=self.text_encoder_2,
                                         tokenizer=self.tokenizer, tokenizer_2=self.tokenizer_2, unet=unet,
                                         scheduler=scheduler, force_zeros_for_empty_prompt=False)

    def pipeline_inputs(self, text: ClipText, negative: ClipText) -> dict:
        return {"pooled_prompt_embeds": text.pooled, "negative_pooled_prompt_embeds": negative.pooled}

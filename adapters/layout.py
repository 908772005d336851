"""What every connector shares: the layout of the context it hands the UNet, and how it is assembled.

A connector maps ``(clip_features, llm_features, llm_mask, timestep)`` to the UNet's cross-attention
context, ``(batch, tokens, clip_dim)``. Where the context's tokens come from decides what works on top:

    CLIP_THEN_LLM   [CLIP's 77 tokens, one token per LLM token]   the CAM, the MLP (LLM4GEN's layout)
    LLM             one token per LLM token                       LaVi-Bridge (it replaces CLIP)
    QUERIES         learned queries, no word positions            ELLA (with or without CLIP before them)
    CLIP_THEN_QUERIES

The entity loss needs word positions in the context: it aligns words to CLIP and LLM tokens in the
first layout, to LLM tokens alone in the second, and is refused for the query layouts.

LLM padding (``use_llm_mask``, on in every config but the release's) leaves every attention: the connector
zeroes its tokens there (ELLA masks them out of its resampler), and the UNet gets ``context_mask`` as its
``encoder_attention_mask``, so a padded position takes no share of any cross-attention. A zero token alone
would not do that: its key scores 0, not minus infinity, and ~180 of them took 60% of every cross-attention.
"""

from __future__ import annotations

import enum

import torch


class ContextLayout(str, enum.Enum):
    CLIP_THEN_LLM = "clip+llm"
    LLM = "llm"
    QUERIES = "queries"
    CLIP_THEN_QUERIES = "clip+queries"

    @classmethod
    def of_tokens(cls, with_clip: bool) -> "ContextLayout":
        """One context token per LLM token, after CLIP's or alone (the MLP's and LaVi-Bridge's layouts)."""
        return cls.CLIP_THEN_LLM if with_clip else cls.LLM

    @property
    def has_word_positions(self) -> bool:
        return self in (ContextLayout.CLIP_THEN_LLM, ContextLayout.LLM)

    @property
    def starts_with_clip(self) -> bool:
        return self in (ContextLayout.CLIP_THEN_LLM, ContextLayout.CLIP_THEN_QUERIES)

    def context_mask(self, clip_tokens: int, llm_mask: torch.Tensor) -> torch.Tensor | None:
        """(batch, context tokens) bool, True where the UNet may attend: every CLIP token (SD attends to CLIP's
        own padding, as it was trained), the real LLM tokens; None for the query layouts, which hold no padding.
        ``llm_mask``: (batch, llm_tokens) bool."""
        if self in (ContextLayout.QUERIES, ContextLayout.CLIP_THEN_QUERIES):
            return None
        if self is ContextLayout.LLM:
            return llm_mask
        return torch.cat([llm_mask.new_ones(llm_mask.shape[0], clip_tokens), llm_mask], dim=1)


def check_widths(connector, clip_features: torch.Tensor, llm_features: torch.Tensor) -> None:
    config = connector.config
    if clip_features.shape[-1] != config.clip_dim or llm_features.shape[-1] != config.llm_dim:
        raise ValueError(
            f"{type(connector).__name__} expects CLIP width {config.clip_dim} and LLM width {config.llm_dim}, "
            f"got CLIP {tuple(clip_features.shape)} and LLM {tuple(llm_features.shape)}")


def join_context(connector, clip_features: torch.Tensor, tokens: torch.Tensor,
                 llm_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``[clip_features, llm_scale * tokens]`` (or the scaled tokens alone without ``with_clip``); tokens at LLM
    padding positions are zeroed when the connector has ``use_llm_mask`` and ``tokens`` follow the LLM's."""
    config = connector.config
    tokens = tokens * config.llm_scale
    if getattr(config, "use_llm_mask", False) and llm_mask is not None and tokens.shape[1] == llm_mask.shape[1]:
        tokens = tokens * llm_mask[..., None].to(tokens.dtype)
    if not config.with_clip:
        return tokens
    return torch.cat([clip_features, tokens.to(clip_features.dtype)], dim=1)

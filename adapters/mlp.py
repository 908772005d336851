"""The plain baseline connector: a two-layer MLP over the LLM's tokens, concatenated to CLIP's.

    p       = W2 GELU(W1 l)                 # (batch, llm_tokens, clip_dim), one token per LLM token
    context = [c, llm_scale * p]            # (batch, 77 + llm_tokens, clip_dim)

This is the "MLP" row of ELLA's connector ablation (Hu et al. 2024, table 6): no attention, no timestep,
no interaction with CLIP's tokens. With ``with_clip=False`` the context is the projected LLM tokens alone.
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from llm4gen.adapters.layout import ContextLayout, check_widths, join_context


class MLPConnector(ModelMixin, ConfigMixin):
    """Args:
        clip_dim: the UNet's context width (CLIP's hidden width).
        llm_dim: width of the LLM token features.
        hidden_dim: the MLP's hidden width (default: ``clip_dim``).
        with_clip: put CLIP's tokens before the projected LLM tokens (default) or use the LLM tokens alone.
        llm_scale: multiplies the projected LLM tokens.
        use_llm_mask: LLM padding leaves every attention (zeroed here, masked out of the UNet's; layout.py).
    """

    timestep_aware = False

    @register_to_config
    def __init__(self, clip_dim: int = 768, llm_dim: int = 2048, hidden_dim: int | None = None, with_clip: bool = True,
                 llm_scale: float = 1.0, use_llm_mask: bool = True):
        super().__init__()
        hidden = hidden_dim or clip_dim
        self.proj = nn.Sequential(nn.Linear(llm_dim, hidden), nn.GELU(), nn.Linear(hidden, clip_dim))

    @property
    def layout(self) -> ContextLayout:
        return ContextLayout.of_tokens(self.config.with_clip)

    def forward(self, clip_features: torch.Tensor, llm_features: torch.Tensor, llm_mask: torch.Tensor | None = None,
                timestep: torch.Tensor | None = None) -> torch.Tensor:
        """(batch, [77 +] llm_tokens, clip_dim); ``timestep`` is ignored (accepted like every connector)."""
        check_widths(self, clip_features, llm_features)
        return join_context(self, clip_features, self.proj(llm_features), llm_mask)

"""LaVi-Bridge's adapter (Zhao et al., "Bridging Different Language Models and Generative Vision Models
for Text-to-Image Generation", ECCV 2024): a small gated MLP that maps each LLM token to the UNet's
context width and replaces CLIP, trained together with LoRA in the UNet's attention.

    h       = W_in l                              # LLM width -> hidden
    h       = a * GELU(g),  [a, g] = W_gate h     # GEGLU
    context = LN(W_out h)                         # (batch, llm_tokens, clip_dim)

The paper trains it with LoRA in the UNet (``model.unet_training=lora``; its configs use rank 32) and
optionally in the LLM. ``with_clip=True`` puts CLIP's tokens before the adapted ones instead (LLM4GEN's
layout), which keeps a frozen UNet's original conditioning.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from llm4gen.adapters.layout import ContextLayout, check_widths, join_context


class GEGLU(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class LaViBridgeAdapter(ModelMixin, ConfigMixin):
    """Args:
        clip_dim: the UNet's context width.
        llm_dim: width of the LLM token features.
        hidden_dim: the adapter's hidden width (default: ``clip_dim``).
        with_clip: keep CLIP's tokens before the adapted LLM tokens (default False: LaVi-Bridge replaces CLIP).
        llm_scale: multiplies the adapted tokens.
        use_llm_mask: LLM padding leaves every attention (zeroed here, masked out of the UNet's; layout.py).
    """

    timestep_aware = False

    @register_to_config
    def __init__(self, clip_dim: int = 768, llm_dim: int = 4096, hidden_dim: int | None = None, with_clip: bool = False,
                 llm_scale: float = 1.0, use_llm_mask: bool = True):
        super().__init__()
        hidden = hidden_dim or clip_dim
        self.proj_in = nn.Linear(llm_dim, hidden)
        self.gate = GEGLU(hidden)
        self.proj_out = nn.Linear(hidden, clip_dim)
        self.norm = nn.LayerNorm(clip_dim)

    @property
    def layout(self) -> ContextLayout:
        return ContextLayout.of_tokens(self.config.with_clip)

    def forward(self, clip_features: torch.Tensor, llm_features: torch.Tensor, llm_mask: torch.Tensor | None = None,
                timestep: torch.Tensor | None = None) -> torch.Tensor:
        """(batch, [77 +] llm_tokens, clip_dim); ``timestep`` is ignored."""
        check_widths(self, clip_features, llm_features)
        tokens = self.norm(self.proj_out(self.gate(self.proj_in(llm_features))))
        return join_context(self, clip_features, tokens, llm_mask)

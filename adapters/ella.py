"""ELLA's Timestep-Aware Semantic Connector (Hu et al., "ELLA: Equip Diffusion Models with LLM for
Enhanced Semantic Alignment", 2024), written from the paper's description.

A Perceiver resampler whose every LayerNorm is modulated by the denoising timestep:

    e       = MLP(sinusoidal(t))                           # (batch, width) timestep embedding
    q       = Q + W_t SiLU(e)                              # (batch, num_latents, width) learned queries + time
    x       = W_in l                                       # LLM tokens -> width
    per block:
        n   = AdaLN(q, e)
        q   = q + Attn(n, [n, AdaLN(x, e)])                # queries attend to themselves and the LLM tokens
        q   = q + FFN(AdaLN(q, e))
    out     = LN(W_out q)                                  # (batch, num_latents, clip_dim)

AdaLN(h, e) = LN(h) * (1 + scale(e)) + shift(e), its scale and shift zero-initialised (so at the start
every block sees plain LayerNorms). The published SD1.5 model: 64 queries, 6 blocks, width 768, 8 heads.

ELLA replaces CLIP: the context is ``out`` alone. ``with_clip=True`` concatenates it after CLIP's tokens, as
LLM4GEN does with its CAM. Only the connector depends on the timestep, so cached LLM features stay valid;
the pipeline calls it once per denoising step (pipelines/llm4gen_pipeline.py), for the prompt and for the
null prompt of classifier-free guidance at the same timestep.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from llm4gen.adapters.layout import ContextLayout, check_widths, join_context


class AdaLayerNorm(nn.Module):
    """LayerNorm without its own affine, shifted and scaled by the timestep embedding (zero-initialised)."""

    def __init__(self, dim: int, time_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.modulation = nn.Linear(time_dim, 2 * dim)
        nn.init.zeros_(self.modulation.weight)
        nn.init.zeros_(self.modulation.bias)

    def forward(self, x: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
        # x: (batch, tokens, dim); time: (batch, time_dim)
        shift, scale = self.modulation(F.silu(time))[:, None].chunk(2, dim=-1)
        return self.norm(x) * (1 + scale) + shift


class ResamplerBlock(nn.Module):
    def __init__(self, width: int, num_heads: int, time_dim: int, ffn_mult: int = 4):
        super().__init__()
        if width % num_heads:
            raise ValueError(f"ELLA width {width} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.query_norm = AdaLayerNorm(width, time_dim)
        self.token_norm = AdaLayerNorm(width, time_dim)
        self.to_q = nn.Linear(width, width)
        self.to_k = nn.Linear(width, width)
        self.to_v = nn.Linear(width, width)
        self.to_out = nn.Linear(width, width)
        self.ffn_norm = AdaLayerNorm(width, time_dim)
        self.ffn = nn.Sequential(nn.Linear(width, ffn_mult * width), nn.GELU(), nn.Linear(ffn_mult * width, width))

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, width = x.shape
        return x.view(batch, tokens, self.num_heads, width // self.num_heads).transpose(1, 2)

    def forward(self, queries: torch.Tensor, tokens: torch.Tensor, time: torch.Tensor,
                token_mask: torch.Tensor | None = None) -> torch.Tensor:
        # queries: (batch, num_latents, width); tokens: (batch, llm_tokens, width); token_mask: (batch, llm_tokens)
        normed = self.query_norm(queries, time)
        keys = torch.cat([normed, self.token_norm(tokens, time)], dim=1)
        attn_mask = None
        if token_mask is not None:  # queries always attend to themselves; LLM padding is masked out
            keep = torch.cat([token_mask.new_ones(token_mask.shape[0], queries.shape[1]), token_mask], dim=1)
            attn_mask = keep[:, None, None, :].bool()
        q, k, v = self._heads(self.to_q(normed)), self._heads(self.to_k(keys)), self._heads(self.to_v(keys))
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        queries = queries + self.to_out(attended.transpose(1, 2).flatten(2))
        return queries + self.ffn(self.ffn_norm(queries, time))


class TimestepAwareConnector(ModelMixin, ConfigMixin):
    """Args:
        clip_dim: the UNet's context width (the output width).
        llm_dim: width of the LLM token features.
        width: the resampler's width (ELLA: 768).
        num_blocks: resampler blocks (ELLA: 6).
        num_heads: attention heads (ELLA: 8).
        num_latents: learned queries, the context length it produces (ELLA: 64).
        time_channels: sinusoidal timestep channels (ELLA: 320, as SD1.5's UNet).
        with_clip: put CLIP's tokens before the queries (default False: ELLA replaces CLIP).
        llm_scale: multiplies the output queries.
        use_llm_mask: mask LLM padding out of the queries' attention (off: the padded positions are attended).
    """

    timestep_aware = True

    @register_to_config
    def __init__(self, clip_dim: int = 768, llm_dim: int = 2048, width: int = 768, num_blocks: int = 6,
                 num_heads: int = 8, num_latents: int = 64, time_channels: int = 320, with_clip: bool = False,
                 llm_scale: float = 1.0, use_llm_mask: bool = True):
        super().__init__()
        if num_blocks < 1 or num_latents < 1:
            raise ValueError(f"num_blocks={num_blocks}, num_latents={num_latents}: ELLA needs at least one of each")
        self.time_proj = Timesteps(time_channels, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(time_channels, width)
        self.proj_in = nn.Linear(llm_dim, width)
        self.latents = nn.Parameter(torch.randn(num_latents, width) * width ** -0.5)
        self.time_to_latents = nn.Linear(width, width)
        self.blocks = nn.ModuleList(ResamplerBlock(width, num_heads, width) for _ in range(num_blocks))
        self.proj_out = nn.Linear(width, clip_dim)
        self.norm_out = nn.LayerNorm(clip_dim)

    @property
    def layout(self) -> ContextLayout:
        return ContextLayout.CLIP_THEN_QUERIES if self.config.with_clip else ContextLayout.QUERIES

    def embed_timestep(self, timestep: torch.Tensor | float, batch: int, like: torch.Tensor) -> torch.Tensor:
        """(batch, width): one timestep for the whole batch (a number or 0-d tensor, as a sampler passes it)
        or one per sample (batch,)."""
        timestep = torch.as_tensor(timestep, device=like.device)
        if timestep.ndim == 0:
            timestep = timestep.expand(batch)
        if timestep.shape != (batch,):
            raise ValueError(f"timestep has shape {tuple(timestep.shape)}; expected () or ({batch},)")
        return self.time_embedding(self.time_proj(timestep).to(like.dtype))

    def forward(self, clip_features: torch.Tensor, llm_features: torch.Tensor, llm_mask: torch.Tensor | None = None,
                timestep: torch.Tensor | float | None = None) -> torch.Tensor:
        """(batch, [77 +] num_latents, clip_dim) at denoising step ``timestep``."""
        if timestep is None:
            raise ValueError("the timestep-aware connector (model.adapter.kind=ella) needs the denoising timestep")
        check_widths(self, clip_features, llm_features)
        batch = llm_features.shape[0]
        time = self.embed_timestep(timestep, batch, self.latents)
        queries = self.latents[None].expand(batch, -1, -1) + self.time_to_latents(F.silu(time))[:, None]
        tokens = self.proj_in(llm_features)
        mask = llm_mask if self.config.use_llm_mask else None
        for block in self.blocks:
            queries = block(queries, tokens, time, mask)
        return join_context(self, clip_features, self.norm_out(self.proj_out(queries)))

"""The Cross-Adapter Module (CAM) of LLM4GEN.

The CAM enriches the CLIP text conditioning with a frozen LLM's token features. Exactly as in the
authors' SD1.5 release, each block does

    p = llm_proj(l)                                   # LLM width -> CLIP width (first block only)
    p = out_proj(MHA(q=q_proj(LN_llm(p)),             # query from the LLM side
                     k=k_proj(LN_clip(c)),            # key and value from the CLIP side
                     v=v_proj(LN_clip(c)))) + p
    p = FFN(LN_ffn(p)) + p                            # FFN = Linear, QuickGELU, Linear

and the module returns ``[c, llm_scale * p]`` concatenated along the sequence: the CLIP features pass
through untouched, so a UNet trained on CLIP alone still sees exactly what it was trained on in the
first 77 positions. ``llm_scale`` is the paper's balancing factor lambda (1.0 reproduces the release).

It is a diffusers ``ModelMixin``: ``save_pretrained(dir)`` writes ``config.json`` + safetensors and
``CrossAdapter.from_pretrained(dir)`` loads it without any of the training code.
``CrossAdapter.from_released(path)`` loads the released ``projector.pth`` layout.
"""

from __future__ import annotations

import os
from typing import Mapping

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from llm4gen.adapters.layout import ContextLayout


class QuickGELU(nn.Module):
    """CLIP's GELU approximation, x * sigmoid(1.702 x), as used in the released FFN."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class CrossAdapterBlock(nn.Module):
    def __init__(self, in_dim: int, dim: int, num_heads: int, ffn_mult: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"adapter width {dim} is not divisible by num_heads={num_heads}; "
                             f"pick a divisor of {dim} (the release uses 8 heads of 96 for 768)")
        self.num_heads = num_heads
        # Only the first block sees the LLM's own width; later blocks refine at the CLIP width.
        self.llm_proj = nn.Linear(in_dim, dim) if in_dim != dim else nn.Identity()
        self.clip_norm = nn.LayerNorm(dim)  # released name: q_norm (it normalises the CLIP side)
        self.llm_norm = nn.LayerNorm(dim)   # released name: kv_norm (it normalises the LLM side)
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        self.ffn_norm = nn.LayerNorm(dim)   # released name: norm
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_mult * dim), QuickGELU(), nn.Linear(ffn_mult * dim, dim))
        for proj in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
            nn.init.trunc_normal_(proj.weight, std=0.02)
            nn.init.zeros_(proj.bias)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        return x.view(batch, tokens, self.num_heads, dim // self.num_heads).transpose(1, 2)

    def forward(self, llm: torch.Tensor, clip: torch.Tensor) -> torch.Tensor:
        # llm: (batch, llm_tokens, in_dim); clip: (batch, clip_tokens, dim)
        p = self.llm_proj(llm)
        c = self.clip_norm(clip)
        q = self._heads(self.q_proj(self.llm_norm(p)))
        k, v = self._heads(self.k_proj(c)), self._heads(self.v_proj(c))
        attn = F.scaled_dot_product_attention(q, k, v)  # (batch, heads, llm_tokens, head_dim)
        p = self.out_proj(attn.transpose(1, 2).flatten(2)) + p
        return self.ffn(self.ffn_norm(p)) + p  # (batch, llm_tokens, dim)


class CrossAdapter(ModelMixin, ConfigMixin):
    """Fuses LLM token features into the CLIP conditioning sequence.

    Args:
        clip_dim: width of the CLIP hidden states (and of the UNet's cross-attention context).
        llm_dim: width of the LLM token features.
        num_heads: attention heads (the release: 8).
        num_blocks: stacked blocks (the release: 1).
        ffn_mult: FFN hidden width as a multiple of ``clip_dim`` (the release: 4).
        llm_scale: the paper's lambda, multiplying the fused LLM tokens (the release: 1.0).
        use_llm_mask: LLM padding leaves every attention: the fused tokens are zeroed there and the model masks
            them out of the UNet's cross-attention (layout.py). Off: the release, whose 256 positions, padding
            included, all go to the UNet unmasked.
    """

    timestep_aware = False
    layout = ContextLayout.CLIP_THEN_LLM  # CLIP's tokens untouched, then one fused token per LLM token

    @register_to_config
    def __init__(self, clip_dim: int = 768, llm_dim: int = 2048, num_heads: int = 8, num_blocks: int = 1,
                 ffn_mult: int = 4, llm_scale: float = 1.0, use_llm_mask: bool = True):
        super().__init__()
        if num_blocks < 1:
            raise ValueError(f"num_blocks={num_blocks}: the adapter needs at least one block")
        self.blocks = nn.ModuleList(
            CrossAdapterBlock(llm_dim if i == 0 else clip_dim, clip_dim, num_heads, ffn_mult)
            for i in range(num_blocks))

    def fuse(self, clip_features: torch.Tensor, llm_features: torch.Tensor,
             llm_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Returns the fused LLM tokens alone, (batch, llm_tokens, clip_dim)."""
        # clip_features: (batch, clip_tokens, clip_dim); llm_features: (batch, llm_tokens, llm_dim)
        if clip_features.shape[-1] != self.config.clip_dim or llm_features.shape[-1] != self.config.llm_dim:
            raise ValueError(
                f"CrossAdapter expects CLIP width {self.config.clip_dim} and LLM width {self.config.llm_dim}, "
                f"got CLIP {tuple(clip_features.shape)} and LLM {tuple(llm_features.shape)}")
        p = llm_features
        for block in self.blocks:
            p = block(p, clip_features)
        p = p * self.config.llm_scale
        if self.config.use_llm_mask and llm_mask is not None:
            p = p * llm_mask[..., None].to(p.dtype)
        return p

    def forward(self, clip_features: torch.Tensor, llm_features: torch.Tensor,
                llm_mask: torch.Tensor | None = None, timestep: torch.Tensor | None = None) -> torch.Tensor:
        """(batch, clip_tokens + llm_tokens, clip_dim): ``[clip_features, fused LLM tokens]``; ``timestep`` is
        ignored (every connector accepts it, adapters/layout.py)."""
        return torch.cat([clip_features, self.fuse(clip_features, llm_features, llm_mask)], dim=1)

    @classmethod
    def from_released(cls, path_or_state_dict: str | os.PathLike | Mapping[str, torch.Tensor],
                      num_heads: int = 8, llm_scale: float = 1.0, use_llm_mask: bool = True) -> "CrossAdapter":
        """Loads the authors' ``projector.pth`` (module ``LLMFusionModule``) into a CrossAdapter.

        Widths and block count are read from the tensors; heads are not stored, so pass them if the
        checkpoint was not the released 8-head one. The layout records no masking: ``use_llm_mask=False``
        reads it as the authors ran it, every padded position attended (configs/sd15_t5xl.yaml).
        """
        state = path_or_state_dict
        if not isinstance(state, Mapping):
            state = torch.load(state, map_location="cpu", weights_only=True)
        converted = convert_released_state_dict(state)
        clip_dim, llm_dim = converted["blocks.0.llm_proj.weight"].shape
        num_blocks = 1 + max(int(k.split(".")[1]) for k in converted)
        ffn_mult = converted["blocks.0.ffn.0.weight"].shape[0] // clip_dim
        adapter = cls(clip_dim=clip_dim, llm_dim=llm_dim, num_heads=num_heads, num_blocks=num_blocks,
                      ffn_mult=ffn_mult, llm_scale=llm_scale, use_llm_mask=use_llm_mask)
        adapter.load_state_dict(converted, strict=True)
        return adapter


# Released name -> our name, within one block. The release's norm names are the reverse of their
# roles: q_norm normalises the CLIP side (keys/values), kv_norm the projected LLM side (queries).
RELEASED_BLOCK_NAMES = {
    "llm_proj": "llm_proj", "q_proj": "q_proj", "k_proj": "k_proj", "v_proj": "v_proj",
    "out_proj": "out_proj", "q_norm": "clip_norm", "kv_norm": "llm_norm", "norm": "ffn_norm",
    "FFN.0": "ffn.0", "FFN.2": "ffn.2",
}
RELEASED_PREFIX = "CrossFusionModule."


def convert_released_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Maps ``CrossFusionModule.{i}.{name}.{weight,bias}`` keys onto CrossAdapter's ``blocks.{i}...``."""
    converted = {}
    for key, value in state.items():
        stripped = key.removeprefix("module.")
        if not stripped.startswith(RELEASED_PREFIX):
            raise KeyError(f"unexpected key {key!r} in a released CAM state dict: expected keys "
                           f"'{RELEASED_PREFIX}<block>.<layer>.<weight|bias>'")
        block, rest = stripped[len(RELEASED_PREFIX):].split(".", 1)
        layer, param = rest.rsplit(".", 1)
        if layer not in RELEASED_BLOCK_NAMES:
            raise KeyError(f"unknown layer {layer!r} in released key {key!r}; known: {sorted(RELEASED_BLOCK_NAMES)}")
        converted[f"blocks.{block}.{RELEASED_BLOCK_NAMES[layer]}.{param}"] = value
    return converted


def to_released_state_dict(adapter: "CrossAdapter") -> dict[str, torch.Tensor]:
    """The inverse of :func:`convert_released_state_dict`: CrossAdapter weights under the released names.

    The release has no ``llm_scale``: an adapter that uses one is refused, since a tool reading the release
    would run a different model. Whether padding is masked is the reader's setting (``use_llm_mask``), not
    the weights': the layout records none.
    """
    if adapter.config.llm_scale != 1.0:
        raise ValueError(f"the released CAM layout has no llm_scale; this adapter has llm_scale="
                         f"{adapter.config.llm_scale}. Export it with save_pretrained instead, or train with "
                         f"llm_scale=1.0.")
    ours_to_released = {ours: released for released, ours in RELEASED_BLOCK_NAMES.items()}
    converted = {}
    for key, value in adapter.state_dict().items():
        _, block, rest = key.split(".", 2)  # blocks.{i}.{layer}.{param}
        layer, param = rest.rsplit(".", 1)
        if layer not in ours_to_released:
            raise KeyError(f"adapter key {key!r} has no released name (known layers: {sorted(ours_to_released)})")
        converted[f"{RELEASED_PREFIX}{block}.{ours_to_released[layer]}.{param}"] = value.detach().cpu().clone()
    return converted


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def released_parameter_count(clip_dim: int = 768, llm_dim: int = 2048, ffn_mult: int = 4) -> int:
    """Closed form of the released block's size (8.66M for 768/2048), to check against."""
    linear = lambda i, o: i * o + o  # noqa: E731
    norms = 3 * 2 * clip_dim
    return (linear(llm_dim, clip_dim) + 4 * linear(clip_dim, clip_dim) + norms
            + linear(clip_dim, ffn_mult * clip_dim) + linear(ffn_mult * clip_dim, clip_dim))


__all__ = ["CrossAdapter", "CrossAdapterBlock", "QuickGELU", "convert_released_state_dict", "count_parameters",
           "released_parameter_count", "to_released_state_dict"]

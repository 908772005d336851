"""Attention written out, for code that needs its probabilities (the entity loss's capture, the gated fusion
while it is captured, the attention-share measurement): what PyTorch's fused kernel computes, kept."""

from __future__ import annotations

import contextlib

import torch


def attention_probabilities(
    query: torch.Tensor, key: torch.Tensor, scale: float, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """softmax(q k^T * scale + mask) over keys, in float32 whatever the input dtype or autocast.

    query (batch, heads, queries, head_dim), key (batch, heads, keys, head_dim),
    attention_mask broadcastable to (batch, heads, queries, keys): additive (float) or keep-where-True
    (bool), as `scaled_dot_product_attention` takes it -> (batch, heads, queries, keys).
    Float32 because the entity loss sums these over thousands of pixels, and bf16 logits would differ
    from what the fused kernel (which accumulates in float32) attends with.
    """
    device_type = query.device.type
    # (meta tensors, as in FLOP counting, have no autocast to turn off)
    no_autocast = torch.autocast(device_type=device_type, enabled=False) if device_type != "meta" else contextlib.nullcontext()
    with no_autocast:
        scores = torch.matmul(query.float(), key.float().transpose(-1, -2)) * scale
        if attention_mask is not None:
            if attention_mask.dtype == torch.bool:
                scores = scores.masked_fill(~attention_mask, float("-inf"))
            else:
                scores = scores + attention_mask.float()
        return scores.softmax(dim=-1)


def writes_out(store) -> bool:
    """Whether a layer whose attention may be captured (``store``: losses/attention_capture.AttentionStore, or None)
    computes the softmax written out: while the store keeps maps, and whenever gradients flow, so that gradient
    checkpointing's recomputation (run in backward, after the store stopped keeping) takes the very path its forward
    took. Sampling (no gradient, nothing kept) runs the fused kernel, bit for bit the layer without capture."""
    return store is not None and (store.enabled or torch.is_grad_enabled())

"""FLOPs of one training sample, counted once for a run's actual configuration.

Counted with Lightning's ``measure_flops`` (PyTorch's ``FlopCounterMode``: matmuls, convolutions and
attention) on *meta twins* of the module's own parts: every parameter and buffer is swapped for a meta
tensor of the same shape, dtype and ``requires_grad`` (``torch.func.functional_call``), so the count
runs the real forward code, costs no memory and no compute, and works for full-size SD1.5 + T5-XL on a
laptop. What is counted is what the configuration computes per sample:

    encoders (no grad, forward only, each skipped when its features are cached):
        VAE encoder at the training resolution, CLIP text encoder (77 tokens), LLM (max_length tokens)
    the trained path (forward + backward, exactly as autograd differentiates it):
        CAM(clip, llm) -> context (77 + L tokens) -> UNet(z_t, t, context) -> MSE

The backward follows ``requires_grad``: with a frozen UNet only activation gradients are computed
(about 2x the forward, a little more because attention differentiates both of its activation
operands); a fully trained UNet adds its weight gradients (about 3x). LoRA adds its small matrices;
the entity loss's captured layers do the same products unfused, so it adds only its own small loss.
These are *model* FLOPs (the MFU convention): gradient checkpointing's recomputation is not counted,
and attention is counted as its two matmuls, whatever kernel runs.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import torch
from lightning.fabric.utilities.throughput import measure_flops
from torch import nn


@dataclass
class StepFlops:
    """FLOPs per training sample, by part."""

    vae: int = 0       # VAE encoder (0 when latents are cached)
    clip: int = 0      # CLIP text encoder (0 when CLIP features are cached)
    llm: int = 0       # LLM encoder (0 when LLM features are cached)
    trained: int = 0   # CAM + UNet forward and backward, and the loss

    @property
    def total(self) -> int:
        return self.vae + self.clip + self.llm + self.trained

    def as_dict(self) -> dict[str, int]:
        return {**asdict(self), "total": self.total}


class _Call(nn.Module):
    """Runs ``fn(*parts, *inputs)``; holds the parts so one functional call swaps all their weights."""

    def __init__(self, fn: Callable, *parts: nn.Module):
        super().__init__()
        self.parts = nn.ModuleList(parts)
        self.fn = fn

    def forward(self, *inputs):
        return self.fn(*self.parts, *inputs)


def _meta_state(module: nn.Module) -> dict[str, torch.Tensor]:
    state = {}
    for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
        meta = torch.empty_like(tensor, device="meta")
        state[name] = meta.requires_grad_(tensor.requires_grad) if tensor.is_floating_point() else meta
    return state


@contextlib.contextmanager
def _without_checkpointing(unet: nn.Module):
    """Model FLOPs: gradient checkpointing's recomputed forward is not part of the count."""
    was = bool(getattr(unet, "is_gradient_checkpointing", False))
    if was:
        unet.disable_gradient_checkpointing()
    try:
        yield
    finally:
        if was:
            unet.enable_gradient_checkpointing()


def count_flops(fn: Callable, parts: Sequence[nn.Module], inputs: Sequence[torch.Tensor], backward: bool = False) -> int:
    """FLOPs of ``fn(*parts, *inputs)`` (+ the backward of its output's mean) on meta twins of ``parts``.

    ``fn`` should call ``part.forward`` (not ``part(...)``), so an in-place ``torch.compile`` is bypassed."""
    call = _Call(fn, *parts)
    state = _meta_state(call)

    def forward():
        return torch.func.functional_call(call, state, tuple(inputs), tie_weights=True, strict=False)

    if not backward:
        with torch.no_grad():
            return measure_flops(call, forward)
    return measure_flops(call, forward, loss_fn=lambda out: out.float().pow(2).mean())


def _meta(*shape: int, dtype: torch.dtype = torch.float32, grad: bool = False) -> torch.Tensor:
    return torch.empty(shape, device="meta", dtype=dtype, requires_grad=grad)


def _dtype(module: nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


def trained_path_flops(adapter: nn.Module, unet: nn.Module, latent_size: int, clip_tokens: int, llm_tokens: int,
                       fusion: nn.Module | None = None) -> int:
    """Connector -> UNet -> MSE, forward and backward, per sample (requires_grad of each weight as it is), at
    ``llm_tokens`` LLM positions (a masked context is shorter: this is its longest). ``fusion``: the gated
    fusion installed in ``unet``'s cross-attention, counted with it."""

    adapter_dtype, unet_dtype = _dtype(adapter), _dtype(unet)
    added = {}
    if unet.config.addition_embed_type == "text_time":  # SDXL: the pooled text embedding and 6 size/crop ids
        time_ids = 6
        pooled = unet.config.projection_class_embeddings_input_dim - time_ids * unet.config.addition_time_embed_dim
        added = {"added_cond_kwargs": {"text_embeds": _meta(1, pooled, dtype=unet_dtype),
                                       "time_ids": _meta(1, time_ids, dtype=unet_dtype)}}

    def step(adapter, unet, *rest):  # rest: [the fusion, whose layers the UNet's processors call,] the inputs
        clip, llm, latents, timesteps = rest[-4:]
        context = adapter.forward(clip, llm, None, timesteps).to(latents.dtype)  # (1, context tokens, clip_dim)
        return unet.forward(latents, timesteps, context, **added).sample

    clip_dim, llm_dim = adapter.config.clip_dim, adapter.config.llm_dim
    inputs = (_meta(1, clip_tokens, clip_dim, dtype=adapter_dtype), _meta(1, llm_tokens, llm_dim, dtype=adapter_dtype),
              _meta(1, unet.config.in_channels, latent_size, latent_size, dtype=unet_dtype),
              torch.zeros(1, dtype=torch.long, device="meta"))
    with _without_checkpointing(unet):
        return count_flops(step, [adapter, unet] + ([fusion] if fusion is not None else []), inputs, backward=True)


def vae_encoder_flops(vae: nn.Module, image_size: int) -> int:
    image = _meta(1, vae.config.in_channels, image_size, image_size, dtype=_dtype(vae))
    return count_flops(lambda vae, x: vae.encode(x).latent_dist.parameters, [vae], [image])


def text_encoder_flops(model: nn.Module, tokens: int, decoder: bool = False) -> int:
    """A transformers text model's forward over ``tokens`` token ids (CLIP, T5 encoder, BERT, Llama)."""
    ids = torch.zeros(1, tokens, dtype=torch.long, device="meta")
    extra = {}
    if decoder:  # an empty cache: transformers then skips its packed-sequence check, which reads values
        from transformers import DynamicCache

        name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        extra = {"use_cache": True, name: DynamicCache(config=model.config)}
    # No attention mask: a mask changes no product, and building one reads values (impossible on meta).
    return count_flops(lambda m, i: m.forward(input_ids=i, **extra).last_hidden_state, [model], [ids])


def latent_size_for(vae: nn.Module, resolution: int) -> int:
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    if resolution % factor:
        raise ValueError(f"data.resolution={resolution} is not a multiple of the VAE's downsampling factor {factor}")
    return resolution // factor


def module_step_flops(module, resolution: int, precomputed_keys: Sequence[str] = (),
                      context_llm_tokens: int | None = None) -> StepFlops:
    """Per-sample training FLOPs of an LLM4GenModule at ``data.resolution``, with the encoders whose
    features come from a cache (``data.precomputed_keys``) left out. The UNet reads ``context_llm_tokens`` LLM
    positions (default ``model.llm.max_length``: a masked context is cut at its batch's longest caption, so
    that is an upper bound there; the LLM itself always reads max_length)."""
    cached = set(precomputed_keys)
    window = module.clip.tokenizer.model_max_length
    chunks = module.clip.context_length // window  # model.base.clip_chunks windows of 77 tokens
    flops = StepFlops(trained=trained_path_flops(module.adapter, module.unet, latent_size_for(module.vae, resolution),
                                                 module.clip.context_length,
                                                 context_llm_tokens or module.cfg.llm.max_length, module.fusion))
    if "latent_moments" not in cached:
        flops.vae = vae_encoder_flops(module.vae, resolution)
    if "clip_features" not in cached:
        flops.clip = chunks * text_encoder_flops(module.clip.text_encoder, window)
        if getattr(module.clip, "text_encoder_2", None) is not None:  # SDXL's second CLIP encoder
            flops.clip += chunks * text_encoder_flops(module.clip.text_encoder_2, window)
    if "llm_features" not in cached:
        flops.llm = text_encoder_flops(module.llm.model, module.cfg.llm.max_length, decoder=module.llm.kind == "decoder")
    return flops

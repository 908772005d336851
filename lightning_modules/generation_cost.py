"""What an evaluation will cost, before it starts: images, UNet calls, FLOPs (counted on the UNet's meta twin
at the resolution it samples at) and hours on a device at an assumed utilisation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from llm4gen.lightning_modules.flops import _meta, count_flops
from llm4gen.lightning_modules.throughput import peak_tflops_for

ASSUMED_UTILISATION = 0.35  # of the bf16 peak: sampling at batch 8-32 with guidance, typical for SD-sized UNets
REFERENCE_DEVICES = ("NVIDIA A100", "NVIDIA H100")


@dataclass(frozen=True)
class GenerationCost:
    images: int
    unet_calls: int
    flops_per_call: int
    total_flops: float

    def hours(self, device_name: str, utilisation: float = ASSUMED_UTILISATION) -> Optional[float]:
        peak = peak_tflops_for(device_name)
        return None if peak is None else self.total_flops / (peak * 1e12 * utilisation) / 3600

    def summary(self, device_name: Optional[str] = None) -> str:
        devices = ([device_name] if device_name and peak_tflops_for(device_name) else []) + list(REFERENCE_DEVICES)
        estimates = ", ".join(f"{d.replace('NVIDIA ', '')} ~{self.hours(d):.2g} h" for d in dict.fromkeys(devices))
        return (f"{self.images} images to generate: {self.unet_calls:,} UNet calls of {self.flops_per_call / 1e12:.3g} "
                f"TFLOP = {self.total_flops / 1e15:.3g} PFLOP; {estimates} (bf16 at {ASSUMED_UTILISATION:.0%} of peak; "
                f"text encoders and VAE not counted)")


def unet_call_flops(unet, context_tokens: int) -> int:
    """FLOPs of one UNet call on one latent at the UNet's own sample size (the pipelines' default resolution)."""
    dtype = next(unet.parameters()).dtype
    size = unet.config.sample_size
    size = size if isinstance(size, int) else size[0]
    added = {}
    if unet.config.addition_embed_type == "text_time":
        time_ids = 6
        pooled = unet.config.projection_class_embeddings_input_dim - time_ids * unet.config.addition_time_embed_dim
        added = {"added_cond_kwargs": {"text_embeds": _meta(1, pooled, dtype=dtype), "time_ids": _meta(1, time_ids, dtype=dtype)}}

    def call(unet, latents, timesteps, context):
        return unet.forward(latents, timesteps, context, **added).sample

    inputs = (_meta(1, unet.config.in_channels, size, size, dtype=dtype), torch.zeros(1, dtype=torch.long, device="meta"),
              _meta(1, context_tokens, unet.config.cross_attention_dim, dtype=dtype))
    return count_flops(call, [unet], inputs)


def generation_cost(unet, context_tokens: int, images: int, steps: int, guidance_scale: float) -> GenerationCost:
    calls = images * steps * (2 if guidance_scale > 1 else 1)  # guidance runs the UNet on both halves
    per_call = unet_call_flops(unet, context_tokens)
    return GenerationCost(images, calls, per_call, float(calls) * per_call)


def sampler_cost(sampler, images: int) -> GenerationCost:
    """The cost of ``images`` more images from an evaluation ``Sampler`` (module or pipeline)."""
    s = sampler.settings
    if sampler.module is not None:
        unet = sampler.module.unet
        tokens = sampler.module.clip.context_length + sampler.module.cfg.llm.max_length  # CLIP + LLM (CAM layout)
    else:
        unet = sampler.pipeline.unet
        tokens = 77 + int(getattr(sampler.pipeline.config, "llm_max_length", 0) or 0)
    return generation_cost(unet, tokens, images, s.num_inference_steps, s.guidance_scale)

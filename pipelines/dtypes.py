"""Where parts stored in different dtypes meet while sampling: the one place that decides it.

The shipped configs keep the frozen UNet and CLIP in bfloat16, the VAE in float32 (an fp16/bf16 VAE loses
detail or overflows: diffusers #4820) and the trained connector in float32. diffusers' pipelines assume one
dtype: the latents take the prompt embeddings' dtype and go to the VAE as they are, so a bf16 UNet over an fp32
VAE stops at the VAE's first convolution. Training never sees this (Lightning's autocast covers it, and the
training step casts its inputs itself); every sampling path runs outside autocast.

Sampling casts explicitly at each module's door instead of running under autocast:

- **exact**: each part computes in the dtype it is stored in. Autocast would run the fp32 VAE's convolutions in
  bf16 (the precision the fp32 VAE exists to avoid) and recast every frozen weight at every call;
- **the latent trajectory stays in float32**: the UNet reads its inputs in its own dtype and hands back float32,
  so classifier-free guidance and the scheduler's update accumulate in float32 over all steps (a bf16
  trajectory rounds every latent at 2^-8 relative, 30 times over); the casts cost one copy of a latent per call;
- **the same for every pipeline**: the hooks sit on the UNet, on the VAE's encoder and decoder and on a
  ControlNet, so diffusers' own sampling loops (text-to-image, SDXL, img2img, inpainting, ControlNet,
  T2I-Adapter, IP-Adapter) run unchanged: a T2I-Adapter's and an IP-Adapter's image encoder read their inputs
  in their own dtype already (the pipelines cast them), and what they hand the UNet passes its door.

A float32 model is untouched: every cast is then the identity and the images are bitwise those of before.
The connector meets the UNet in two more places, each cast where it meets: its context is cast to the UNet's
dtype at the UNet's door (above), and the gated fusion's layers read the context in their own dtype and hand
their keys and values back in the attention's (adapters/gated_fusion.py).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch


def cast_floats(value: Any, dtype: torch.dtype) -> Any:
    """``value`` with every floating-point tensor in it (through tuples, lists and dicts) in ``dtype``; integer and
    bool tensors (timesteps, masks) and everything else as they are."""
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, dict):
        return {key: cast_floats(item, dtype) for key, item in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(cast_floats(item, dtype) for item in value)
    return value


def module_dtype(module: torch.nn.Module) -> torch.dtype:
    """The dtype a module computes in: its first floating parameter's."""
    for parameter in module.parameters():
        if parameter.is_floating_point():
            return parameter.dtype
    return torch.float32


def reads_in_own_dtype(module: torch.nn.Module, returns: torch.dtype | None = None) -> list:
    """Hooks making ``module`` cast its floating inputs to its own dtype (and its output's first floating tensor to
    ``returns``, when given); the handles, to remove them."""
    dtype = module_dtype(module)

    def cast_inputs(_module, args, kwargs):
        return cast_floats(args, dtype), cast_floats(kwargs, dtype)

    handles = [module.register_forward_pre_hook(cast_inputs, with_kwargs=True)]
    if returns is not None and returns != dtype:
        def cast_output(_module, _args, output):
            if isinstance(output, torch.Tensor):
                return output.to(returns)
            if isinstance(output, tuple):
                return (cast_floats(output[0], returns), *output[1:])
            if hasattr(output, "sample"):  # UNet2DConditionOutput
                output.sample = output.sample.to(returns)
            return output

        handles.append(module.register_forward_hook(cast_output))
    return handles


def vae_doors(vae) -> list[torch.nn.Module]:
    """The VAE's modules that latents or pixels enter: its encoder, decoder and the quantisation convolutions."""
    doors = [vae.encoder, vae.decoder]
    for name in ("quant_conv", "post_quant_conv"):
        if isinstance(getattr(vae, name, None), torch.nn.Module):
            doors.append(getattr(vae, name))
    return doors


@contextlib.contextmanager
def sampling_dtypes(unet, vae=None, latents: torch.dtype = torch.float32, others=()):
    """While active, the UNet reads every floating input in its own dtype and returns ``latents``' dtype (float32),
    and the VAE's encoder and decoder read theirs in the VAE's dtype, as does each of ``others`` (a ControlNet:
    its residuals go to the UNet, whose door casts them). Install it innermost, after any hook that puts tensors
    into the UNet's arguments, so that it sees what the UNet is finally given."""
    handles = reads_in_own_dtype(unet, returns=latents) if unet is not None else []
    for door in [*(vae_doors(vae) if vae is not None else []), *others]:
        handles += reads_in_own_dtype(door)
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()

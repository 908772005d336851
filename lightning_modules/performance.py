"""Fast paths and memory options of ``model.performance``, applied to the LightningModule's parts.

What each does, and why it is safe:
- ``channels_last``: UNet and VAE weights in NHWC; convolutions then pick tensor-core kernels without
  layout transposes. Same math (only the memory layout changes).
- ``gradient_checkpointing``: the UNet keeps only block inputs and recomputes the rest in backward.
  It matters with a frozen UNet too, since the gradient reaches the CAM through the whole UNet.
  Same gradients (the recomputation is deterministic); about one more UNet forward of compute.
- ``compile``: ``torch.compile`` of the UNet and the CAM, in place (``nn.Module.compile``), so state-dict
  keys, checkpoints and ``save_pretrained`` stay as they were. Off by default.
- ``tf32``: TF32 tensor cores for fp32 matmuls and convolutions (Ampere and later); process-wide.
- ``optimizer``: ``adamw`` (PyTorch's default loop), ``adamw_fused`` (one kernel for all parameters),
  ``adamw_8bit`` (bitsandbytes' 8-bit state: 2 bytes per parameter instead of 8; for full-UNet runs).

The fused SDPA kernel is what every attention layer already uses (diffusers' ``AttnProcessor2_0`` in
the UNet, ``F.scaled_dot_product_attention`` in the CAM); only the layers the entity loss reads are
written out (``losses/attention_capture.py``), since it needs their probabilities.
bf16: frozen parts take ``model.base.dtype`` / ``model.llm.dtype`` (bfloat16 on GPUs); what trains is
built in fp32 and ``trainer.precision=bf16-mixed`` runs it under bf16 autocast (fp32 master weights).
"""

from __future__ import annotations

import importlib.util
import shutil

import torch

from llm4gen.configs.errors import ConfigError

OPTIMIZERS = ("adamw", "adamw_fused", "adamw_8bit")


def check_compile_supported(backend: str, on_this_machine: bool = True) -> None:
    """Raises ConfigError naming why ``torch.compile`` with ``backend`` cannot run: an unknown backend, and with
    ``on_this_machine`` (the run trains here, not on a cluster node) what this Python and PATH lack."""
    import torch._dynamo

    if on_this_machine and not torch._dynamo.is_dynamo_supported():
        raise ConfigError("model.performance.compile=true, but torch.compile is not supported on this Python/platform "
                          f"(torch {torch.__version__}); set model.performance.compile=false")
    if backend not in torch._dynamo.list_backends(exclude_tags=()):
        raise ConfigError(f"model.performance.compile_backend={backend!r} is not a torch.compile backend; known: "
                          f"{', '.join(sorted(torch._dynamo.list_backends(exclude_tags=())))}")
    if on_this_machine and backend == "inductor" and not torch.cuda.is_available():
        if not any(shutil.which(cc) for cc in ("g++", "c++", "clang++")):
            raise ConfigError("model.performance.compile=true with the inductor backend on a CPU needs a C++ compiler "
                              "(g++ or clang++) on the PATH; install one, use compile_backend=aot_eager, or set "
                              "compile=false")


def check_optimizer_available(kind: str) -> None:
    """The optimizer ``kind`` names can be built here (bitsandbytes' is a separate, GPU-only install)."""
    if kind == "adamw_8bit" and importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError("model.performance.optimizer=adamw_8bit needs bitsandbytes (GPU only): pip install "
                          "bitsandbytes on the GPU machine, or use adamw_fused")


def set_tf32(enabled: bool) -> None:
    """TF32 for CUDA matmuls and cuDNN convolutions (process-wide)."""
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):  # torch >= 2.9
        matmul.fp32_precision = "tf32" if enabled else "ieee"
        torch.backends.cudnn.conv.fp32_precision = "tf32" if enabled else "ieee"
    else:
        matmul.allow_tf32 = enabled
        torch.backends.cudnn.allow_tf32 = enabled


def apply_performance(module, perf) -> None:
    """Applies ``model.performance`` to an LLM4GenModule's UNet, VAE and CAM (call once, after they exist)."""
    if perf.tf32:
        set_tf32(True)
    if perf.channels_last:
        module.unet.to(memory_format=torch.channels_last)
        module.vae.to(memory_format=torch.channels_last)
    if perf.gradient_checkpointing:
        module.unet.enable_gradient_checkpointing()
    if perf.compile:
        check_compile_supported(perf.compile_backend)  # the preflight refuses it first where the run trains
        module.unet.compile(backend=perf.compile_backend)
        module.adapter.compile(backend=perf.compile_backend)


def build_optimizer(params, optim, kind: str) -> torch.optim.Optimizer:
    """AdamW with the ``model.optim`` hyperparameters, in the implementation ``kind`` names."""
    kwargs = dict(lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps, weight_decay=optim.weight_decay)
    if kind == "adamw":
        return torch.optim.AdamW(params, **kwargs)
    if kind == "adamw_fused":
        return torch.optim.AdamW(params, fused=True, **kwargs)
    if kind == "adamw_8bit":
        check_optimizer_available(kind)  # the preflight refuses it first where the run trains
        import bitsandbytes

        return bitsandbytes.optim.AdamW8bit(params, **kwargs)
    raise ValueError(f"model.performance.optimizer={kind!r}; expected one of {', '.join(OPTIMIZERS)}")

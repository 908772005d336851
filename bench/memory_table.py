"""Trainable/frozen parameters and estimated peak GPU memory per config, at 512 px and batch 32.

    python bench/memory_table.py                                   # configs/sd15_t5xl.yaml + the two paper recipes (described below)
    python bench/memory_table.py configs/sd15_t5xl.yaml configs/llm4gen_sd15.yaml configs/llm4gen_sd15_adapter_only.yaml
    python bench/memory_table.py --resolution 512 --batch-size 32 --no-described
    python bench/memory_table.py --strategy fsdp2 --gpus 8 configs/llm4gen_sdxl.yaml --set model.unet_training=full \
        --set model.base.dtype=float32 --resolution 1024 --batch-size 8 --no-described

Method (prints a Markdown table; ~1-2 minutes on a CPU, no GPU, no download):
- Parameters: exact. The full-size architectures are built from their published configs
  (``embedded/full_size.py``: SD1.5 UNet/VAE/CLIP-L, T5-XL for the T5-XL/RankGen sources) and the CAM
  from the config's ``model.adapter``; LoRA layers are added as configured.
- Weights, gradients, optimizer, EMA: from the counts. Frozen parts in their configured dtypes; what
  trains in fp32 (master weights), with fp32 gradients, AdamW's two fp32 moments (8 B/param; 2 B with
  ``adamw_8bit``) and an fp32 EMA copy when ``model.ema.enabled``.
- Activations: the tensors autograd saves for the backward pass of the trained path (CAM -> UNet),
  measured on the CPU with ``torch.autograd.graph.saved_tensors_hooks`` (each storage counted once,
  weights excluded) in fp32 at batch 1 and two reduced resolutions (64 and 128 px: latents 8 and 16),
  fitted as ``a + b * latent_pixels`` (``a`` covers what scales with the 77 + L context only), evaluated
  at the target resolution, multiplied by the batch size and halved for bf16-mixed. With the entity
  loss the captured layers' fp32 attention maps are part of it; with gradient checkpointing only what
  the checkpointed blocks keep is.
- Encoder transients (online configs): the frozen VAE/CLIP/LLM run under no_grad, so their memory
  is transient: estimated as the largest (input + output) of any leaf module of the VAE encoder at the
  target resolution (measured at 128 px and scaled by pixels) times the batch, which bounds the live
  set from below; the T5-XL activations at 256 tokens are small beside it.
- ``--strategy fsdp2 --gpus N`` (lightning_modules/sharding.py): what trains (fp32 masters, gradients, AdamW
  moments, EMA) is split over the N GPUs; frozen parts stay whole on each; while a sharded block runs its
  weights are gathered whole in the compute dtype (bf16), and the next block's are prefetched: two of the
  largest block's are added to the weights. Activations are per GPU and unchanged.
- Estimated peak = weights + gradients + optimizer + EMA + max(saved activations, encoder transient).
  Not counted: the allocator's fragmentation, cuDNN/cuBLAS workspaces, the transient gradients of one
  layer during backward, and with checkpointing one block's recomputed activations: expect the real
  peak to be 10-20% higher. ``bench/gpu_bench.py`` measures the real peak on a lent GPU.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from llm4gen.configs.schema import load_config  # noqa: E402
from llm4gen.embedded import full_size  # noqa: E402
from llm4gen.encoders.sources import TORCH_DTYPES  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BASE_CONFIG = ROOT / "configs" / "sd15_t5xl.yaml"
# The two paper recipes of issue 10 (configs/llm4gen_sd15.yaml and configs/llm4gen_sd15_adapter_only.yaml),
# described here as overrides of the release config until those files exist; pass the files once they do.
DESCRIBED = {
    "llm4gen_sd15 (described): CAM + full UNet + entity loss, checkpointing, 8-bit AdamW": [
        "model.unet_training=full", "model.base.dtype=float32", "model.objective.lambda_entity=0.01",
        "model.performance.gradient_checkpointing=true", "model.performance.optimizer=adamw_8bit"],
    "llm4gen_sd15 (described) without checkpointing, fused AdamW": [
        "model.unet_training=full", "model.base.dtype=float32", "model.objective.lambda_entity=0.01",
        "model.performance.optimizer=adamw_fused"],
    "llm4gen_sd15_adapter_only (described): CAM only, cached latents + LLM features": [
        "data.precomputed_keys=[latent_moments,llm_features]"],
}
GIB = 2**30


@dataclass
class Row:
    name: str
    trains: str
    trainable: int
    frozen: int
    weights: float
    states: float      # gradients + optimizer + EMA, bytes
    activations: float
    transient: float

    @property
    def peak(self) -> float:
        return self.weights + self.states + max(self.activations, self.transient)


def llm_architecture(cfg):
    """The LLM's architecture on the meta device (embedded/full_size.py's known sources, or a local folder)."""
    try:
        return full_size.llm_architecture(cfg.model.llm.pretrained, cfg.model.llm.trust_remote_code)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None


def build_parts(cfg, device: str = "meta"):
    """(unet, adapter) with what trains marked requires_grad, LoRA added as configured; a gated fusion
    (``model.adapter.fusion: gated``) installed in the UNet's cross-attention and counted with the UNet, whose
    submodule it is here (training keeps it beside the connector: the same parameters, the same activations)."""
    from llm4gen.adapters.connectors import build_connector
    from llm4gen.adapters.gated_fusion import GatedFusion

    sdxl = cfg.model.base.family == "sdxl"
    unet = (full_size.sdxl_unet if sdxl else full_size.sd15_unet)("meta").requires_grad_(cfg.model.unet_training == "full")
    config = llm_architecture(cfg).config
    llm_width = getattr(config, "d_model", None) or config.hidden_size
    a = cfg.model.adapter
    with torch.device("meta"):
        adapter = build_connector(a, clip_dim=unet.config.cross_attention_dim, llm_dim=llm_width)  # model.adapter.kind: the CAM or another
    if cfg.model.unet_training == "lora":
        from peft import LoraConfig

        lora = cfg.model.lora
        unet.add_adapter(LoraConfig(r=lora.rank, lora_alpha=lora.alpha, target_modules=list(lora.target_modules)))
    if a.fusion == "gated":
        with torch.device("meta"):
            fusion = GatedFusion.for_unet(unet, clip_tokens=77)
        fusion.install(unet)
        unet.add_module("gated_fusion", fusion)
    if device != "meta":
        unet, adapter = materialize(unet, device), materialize(adapter, device)
    return unet, adapter, llm_width


def materialize(module: nn.Module, device: str) -> nn.Module:
    """Real (random) storage for a meta-built module, keeping requires_grad: shapes are what matter."""
    flags = {n: p.requires_grad for n, p in module.named_parameters()}
    module = module.to_empty(device=device)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.normal_(0, 0.02)
            p.requires_grad_(flags[name])
        for b in module.buffers():
            b.zero_()
    return module


def count(module: nn.Module, trainable: bool) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad == trainable)


def saved_activation_bytes(unet, adapter, latent: int, llm_tokens: int, entity: str | None, checkpointing: bool) -> int:
    """Bytes autograd keeps for backward through connector -> UNet at batch 1, fp32, on the CPU."""
    from llm4gen.losses.attention_capture import (
        cross_attention_layer_names,
        install_attention_capture,
        remove_attention_capture,
    )

    weights = {p.untyped_storage().data_ptr() for p in list(unet.parameters()) + list(adapter.parameters())}
    saved: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    store = None
    if entity:
        resolutions = entity if entity in ("lowest", "all") else [int(x) for x in entity.split(",")]
        store = install_attention_capture(unet, cross_attention_layer_names(unet, resolutions, sample_size=latent))
    if checkpointing:
        unet.enable_gradient_checkpointing()
    try:
        clip, llm = torch.randn(1, 77, adapter.config.clip_dim), torch.randn(1, llm_tokens, adapter.config.llm_dim)
        added = {}
        if unet.config.addition_embed_type == "text_time":  # SDXL: the pooled embedding and 6 size/crop ids
            pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
            added = {"added_cond_kwargs": {"text_embeds": torch.randn(1, pooled), "time_ids": torch.randn(1, 6)}}
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            context = adapter(clip, llm, None, torch.tensor([500]))
            unet(torch.randn(1, 4, latent, latent), torch.tensor([500]), context, **added).sample.float().pow(2).mean()
            kept = sum(m.untyped_storage().nbytes() for m in store.maps().values()) if store else 0
    finally:
        if checkpointing:
            unet.disable_gradient_checkpointing()
        if store is not None:
            remove_attention_capture(unet)
    return sum(saved.values()) + kept


def vae_transient_bytes(image: int) -> int:
    """Largest (input + output) bytes of one VAE-encoder leaf module at batch 1, fp32."""
    vae = materialize(full_size.sd15_vae("meta").requires_grad_(False), "cpu")
    largest = 0

    def hook(module, inputs, output):
        nonlocal largest
        tensors = [t for t in (*inputs, output) if isinstance(t, torch.Tensor)]
        largest = max(largest, sum(t.numel() * t.element_size() for t in tensors))

    hooks = [m.register_forward_hook(hook) for m in vae.encoder.modules() if not list(m.children())]
    with torch.no_grad():
        vae.encode(torch.randn(1, 3, image, image))
    for h in hooks:
        h.remove()
    return largest


def largest_sharded_block(unet) -> int:
    """Parameters of the biggest unit FSDP2 gathers at once (lightning_modules/sharding.py's units)."""
    from llm4gen.lightning_modules.sharding import sharded_blocks

    return max(sum(p.numel() for p in block.parameters()) for block in sharded_blocks(unet))


def estimate(name: str, cfg, resolution: int, batch: int, cache: dict, gpus: int = 1, sharded: bool = False) -> Row:
    m = cfg.model
    unet, adapter, llm_width = build_parts(cfg)
    llm = llm_architecture(cfg)
    sdxl = m.base.family == "sdxl"
    vae = full_size.sdxl_vae() if sdxl else full_size.sd15_vae()
    texts = [full_size.clip_l_text()] + ([full_size.openclip_bigg_text()] if sdxl else [])
    clip_params = sum(p.numel() for text in texts for p in text.parameters())
    trainable = count(unet, True) + count(adapter, True)
    frozen = count(unet, False) + sum(p.numel() for p in (*vae.parameters(), *llm.parameters())) + clip_params
    size = lambda dtype: TORCH_DTYPES[dtype].itemsize  # noqa: E731
    unet_frozen_bytes = count(unet, False) * (size(m.base.dtype))
    weights = (unet_frozen_bytes + sum(p.numel() for p in vae.parameters()) * size(m.base.vae_dtype)
               + clip_params * size(m.base.dtype)
               + sum(p.numel() for p in llm.parameters()) * size(m.llm.dtype) + trainable * 4)
    optimizer_bytes = 2 if m.performance.optimizer == "adamw_8bit" else 8
    states = trainable * (4 + optimizer_bytes + (4 if m.ema.enabled else 0))
    if sharded:  # what trains split over the GPUs; two blocks' weights gathered whole (bf16) at a time
        weights += trainable * 4 / gpus - trainable * 4 + 2 * largest_sharded_block(unet) * 2
        states /= gpus

    entity = m.objective.entity_layers if m.objective.lambda_entity > 0 else None
    key = (m.base.family, m.adapter.kind, m.adapter.fusion, m.unet_training, entity, m.performance.gradient_checkpointing,
           m.llm.max_length, llm_width)
    if key not in cache:
        cpu_unet, cpu_adapter, _ = build_parts(cfg, device="cpu")
        low, high = (saved_activation_bytes(cpu_unet, cpu_adapter, side, m.llm.max_length, entity,
                                            m.performance.gradient_checkpointing) for side in (8, 16))
        per_pixel = (high - low) / (16 * 16 - 8 * 8)
        cache[key] = (low - per_pixel * 64, per_pixel)
        del cpu_unet, cpu_adapter
    constant, per_pixel = cache[key]
    latent = resolution // 8
    activations = (constant + per_pixel * latent * latent) * batch * 0.5  # bf16-mixed: half the fp32 bytes
    transient = 0.0
    if "latent_moments" not in cfg.data.precomputed_keys:
        if "vae" not in cache:
            cache["vae"] = vae_transient_bytes(128)
        transient = cache["vae"] * (resolution / 128) ** 2 * batch * size(m.base.vae_dtype) / 4
    connector = {"cam": "CAM", "mlp": "MLP", "lavi_bridge": "LaVi-Bridge adapter", "ella": "ELLA"}[m.adapter.kind]
    connector += " (gated)" if m.adapter.fusion == "gated" else ""
    trains = connector + {"frozen": "", "full": " + UNet", "lora": " + LoRA"}[m.unet_training]
    if entity:
        trains += " + entity loss"
    return Row(name, trains, trainable, frozen, weights, states, activations, transient)


def print_table(rows: list[Row], resolution: int, batch: int, strategy: str = "ddp", gpus: int = 1) -> None:
    how = "DDP (a whole copy on every GPU)" if strategy == "ddp" else f"FSDP2 over {gpus} GPUs (what trains split)"
    print(f"\n{resolution} px, batch {batch} per GPU, bf16-mixed, {how}: per-GPU memory (GiB; parameters in millions)\n")
    print("| config | trains | trainable | frozen | weights | grads + optimizer + EMA | saved activations "
          "| encoder transient | est. peak |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r.name} | {r.trains} | {r.trainable / 1e6:,.2f} M | {r.frozen / 1e6:,.1f} M | {r.weights / GIB:.1f} "
              f"| {r.states / GIB:.1f} | {r.activations / GIB:.1f} | {r.transient / GIB:.1f} | **{r.peak / GIB:.0f}** |")


def main(argv=None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("configs", nargs="*", help="config files (default: configs/sd15_t5xl.yaml)")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--no-described", action="store_true",
                        help="leave out the two paper recipes described in this script (once their files exist)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a dotted override applied to every config (e.g. model.unet_training=full)")
    parser.add_argument("--strategy", choices=("ddp", "fsdp2"), default="ddp",
                        help="fsdp2: what trains sharded over --gpus GPUs (trainer.strategy=fsdp2)")
    parser.add_argument("--gpus", type=int, default=8, help="with --strategy fsdp2: how many GPUs share the shards")
    args = parser.parse_args(argv)
    if args.gpus < 1:
        parser.error(f"--gpus {args.gpus}: at least 1")
    torch.manual_seed(0)
    suffix = f" ({', '.join(args.set)})" if args.set else ""
    entries = [(f"{Path(path).stem}{suffix}", load_config(path, args.set)) for path in (args.configs or [BASE_CONFIG])]
    if not args.no_described:
        entries += [(name, load_config(BASE_CONFIG, overrides)) for name, overrides in DESCRIBED.items()]
    cache: dict = {}
    rows = []
    for name, cfg in entries:
        print(f"measuring {name} ...", file=sys.stderr, flush=True)
        rows.append(estimate(name, cfg, args.resolution, args.batch_size, cache, args.gpus, args.strategy == "fsdp2"))
    print_table(rows, args.resolution, args.batch_size, args.strategy, args.gpus)
    return rows


if __name__ == "__main__":
    main()

"""One command for a lent GPU: images/s, MFU and peak memory of the training step, per scenario.

    python bench/gpu_bench.py                      # full-size SD1.5 + T5-XL, random weights, ~5-8 min on one H100/H200
    python bench/gpu_bench.py --smoke              # the same code on the embedded tiny models, CPU, seconds
    python bench/gpu_bench.py --scenarios a,e --batch-sizes 32,64 --out runs/gpu_bench.json
    python bench/gpu_bench.py --scenarios i,j,k    # SDXL at 1024 px, full size

Full size means the published configs (``embedded/full_size.py``) with random weights: SD1.5 UNet,
VAE and CLIP-L, and the T5-XL encoder. They are written once as ordinary model folders under
``--workdir`` and loaded through ``model.base.pretrained`` / ``model.llm.pretrained`` like real
weights, so each scenario times exactly what training runs: ``LLM4GenModule``'s own training step
under Lightning's Trainer (bf16-mixed, the optimizer, gradient clipping), on synthetic batches in
pinned memory. Nothing is downloaded.

Scenarios:
  a  cached latents + LLM features, frozen UNet (the main case: the issue's target is >= 240 img/s on an H100)
  b  online: VAE + T5-XL + CLIP + UNet from pixels and captions
  c  (a) + the entity loss (lowest-resolution layers captured)
  d  (a) with a LoRA UNet (rank 4)
  e  (a) with the full UNet trained (fp32 masters) and gradient checkpointing
  f, g, h  (a) with ELLA's connector, LaVi-Bridge's adapter + LoRA rank 32, the MLP (``--scenarios f,g,h``)
  l  (e) sharded: trainer.strategy=fsdp2 on one GPU (bf16 params, fp32 reduction, activation checkpointing)
  i, j, k  SDXL base 1.0 + T5-XL at 1024 px: cached features with a frozen UNet, online encoding, LoRA
           (batch sweep 4, 8, 16; the full-size SDXL folder, ~7 GB, is written once under ``--workdir``)
Each runs ``--warmup`` steps, then ``--steps`` timed ones, for each batch size of the sweep until one
runs out of memory or the time budget is spent. MFU = FLOPs per sample (counted for the scenario's
configuration, ``lightning_modules/flops.py``) x images/s / the device's dense bf16 peak. With
``--profile`` (default on a GPU) the top kernels of scenario (a) at its best batch size are printed.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lightning as L  # noqa: E402
import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from torch.utils.data import DataLoader, IterableDataset  # noqa: E402

from llm4gen.configs.schema import load_config  # noqa: E402
from llm4gen.datamodules.batch import Batch  # noqa: E402
from llm4gen.datamodules.collate import with_entities  # noqa: E402
from llm4gen.datamodules.entity_targets import EntityTargetBuilder, TokenizerSources  # noqa: E402
from llm4gen.lightning_modules.flops import latent_size_for, module_step_flops  # noqa: E402
from llm4gen.lightning_modules.llm4gen import LLM4GenModule  # noqa: E402
from llm4gen.lightning_modules.sharding import STRATEGY_NAME, ShardedStrategy  # noqa: E402
from llm4gen.lightning_modules.throughput import device_peak_flops  # noqa: E402

CAPTIONS = [
    "A red book and a yellow vase on a wooden table, next to a green apple and a blue ceramic mug.",
    "A black cat with white paws sits on a blue velvet sofa beside a brass floor lamp.",
    "Two glass bottles, one green and one amber, on a stone windowsill at sunset.",
    "A small orange fox in a snowy birch forest, wearing a knitted purple scarf.",
]
CACHED = ["latent_moments", "llm_features"]
SDXL = "model.base.family=sdxl"  # marks a scenario that runs on the SDXL base
SCENARIOS = {
    "a": ("cached latents + LLM features, frozen UNet", [], CACHED),
    "b": ("online: VAE + LLM + CLIP + UNet", [], []),
    "c": ("(a) + entity loss", ["model.objective.lambda_entity=0.1"], CACHED),
    "d": ("(a), LoRA UNet (rank 4)", ["model.unet_training=lora"], CACHED),
    "e": ("(a), full UNet + gradient checkpointing",
          ["model.unet_training=full", "model.base.dtype=float32", "model.performance.gradient_checkpointing=true"], CACHED),
    # the other connectors (model.adapter.kind), on (a)'s cached features; not in the default list
    "f": ("(a), ELLA connector (64 queries, 6 blocks)", ["model.adapter.kind=ella"], CACHED),
    "g": ("(a), LaVi-Bridge adapter + LoRA UNet (rank 32)",
          ["model.adapter.kind=lavi_bridge", "model.unet_training=lora", "model.lora.rank=32",
           "model.lora.alpha=32", "model.base.dtype=float32"], CACHED),
    "h": ("(a), MLP connector", ["model.adapter.kind=mlp"], CACHED),
    # sharded data parallel (trainer.strategy=fsdp2: lightning_modules/sharding.py) on one GPU: the full UNet's
    # blocks gathered in bf16 from fp32 shards, activations recomputed per block; not in the default list
    "l": ("(e) sharded: FSDP2, bf16 params, activation checkpointing",
          ["model.unet_training=full", "model.base.dtype=float32", "model.performance.gradient_checkpointing=true",
           f"trainer.strategy={STRATEGY_NAME}"], CACHED),
    # SDXL base 1.0 at 1024 px (full size: embedded/full_size.py's random-weight folder; smoke: the tiny SDXL)
    "i": ("SDXL 1024 px: cached latents + LLM features, frozen UNet", [SDXL], CACHED),
    "j": ("SDXL 1024 px: online VAE + LLM + both CLIPs + UNet", [SDXL], []),
    "k": ("SDXL 1024 px: (i), LoRA UNet (rank 4)", [SDXL, "model.unet_training=lora"], CACHED),
}


def full_size_overrides(workdir: Path, device: str) -> list[str]:
    """Config overrides for full-size SD1.5 + T5-XL (random weights, written once under ``workdir``)."""
    from llm4gen.embedded.full_size import write_random_sd15, write_random_t5_xl

    sd15, t5 = workdir / "sd15-random", workdir / "t5-xl-random"
    for folder, write in ((sd15, write_random_sd15), (t5, write_random_t5_xl)):
        marker = folder / ".complete"
        if not marker.exists():
            print(f"writing {folder} (random weights, once)", flush=True)
            write(folder, device=device)
            marker.touch()
    return [f"model.base.pretrained={sd15}", "model.base.dtype=bfloat16", f"model.llm.pretrained={t5}",
            "model.llm.kind=encoder-decoder", "model.llm.max_length=256", "model.llm.dtype=bfloat16",
            "model.llm.zero_padding=false", "data.resolution=512", "model.performance.tf32=true",
            "model.performance.optimizer=adamw_fused", "model.performance.channels_last=true"]


def full_size_sdxl_overrides(workdir: Path, device: str) -> list[str]:
    """Config overrides for full-size SDXL base 1.0 + T5-XL at 1024 px (random weights, written once)."""
    from llm4gen.embedded.full_size import write_random_sdxl

    sdxl = workdir / "sdxl-random"
    if not (sdxl / ".complete").exists():
        print(f"writing {sdxl} (random weights, once)", flush=True)
        write_random_sdxl(sdxl, device=device)
        (sdxl / ".complete").touch()
    sd15 = full_size_overrides(workdir, device)  # the T5-XL folder and the fast paths
    return [o for o in sd15 if not o.startswith(("model.base.pretrained=", "data.resolution="))] + [
        f"model.base.pretrained={sdxl}", "data.resolution=1024", "data.buckets.enabled=false"]


def make_batches(module: LLM4GenModule, batch_size: int, resolution: int, cached: list[str], entities: bool,
                 count: int = 4) -> list[dict]:
    """Synthetic batches with the shapes the datamodule yields (cached fields or pixels), pinned on a GPU."""
    g = torch.Generator().manual_seed(0)
    latent = latent_size_for(module.vae, resolution)
    channels = 2 * module.vae.config.latent_channels
    batches = []
    for i in range(count):
        captions = [CAPTIONS[(i + j) % len(CAPTIONS)] for j in range(batch_size)]
        fields = {}
        if "latent_moments" in cached:
            fields["latent_moments"] = torch.randn(batch_size, channels, latent, latent, generator=g)  # (B, 2C, h, w)
        else:
            fields["pixel_values"] = torch.rand(batch_size, 3, resolution, resolution, generator=g) * 2 - 1
        if "llm_features" in cached:
            length = module.cfg.llm.max_length
            fields["llm_features"] = torch.randn(batch_size, length, module.llm.hidden_size, generator=g)  # (B, L, D)
            fields["llm_mask"] = torch.ones(batch_size, length, dtype=torch.bool)
        batch = Batch(captions=captions, **fields)
        if entities:  # parsed and aligned as the data workers do
            builder = EntityTargetBuilder(TokenizerSources.from_model_config(module.cfg))
            batch = with_entities(batch, module.cfg.objective.entity_parser, builder)
        if torch.cuda.is_available():
            batch = batch.pin_memory()
        batches.append(batch)
    return batches


class Repeat(IterableDataset):
    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        while True:
            yield from self.batches


class StepTimer(L.Callback):
    """Wall time of the steps after ``warmup`` (device synchronised at both ends)."""

    def __init__(self, warmup: int, profiler=None):
        self.warmup, self.profiler = warmup, profiler
        self.start = self.end = None

    @staticmethod
    def _sync():
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def on_train_batch_start(self, trainer, *args):
        if trainer.global_step == self.warmup and self.start is None:
            self._sync()
            if self.profiler is not None:
                self.profiler.start()
            self.start = time.perf_counter()

    def on_train_end(self, trainer, *args):
        self._sync()
        self.end = time.perf_counter()
        if self.profiler is not None:
            self.profiler.stop()


def fit_steps(module, batches, steps: int, warmup: int, accelerator: str, precision: str, profiler=None,
              sharded: bool = False) -> float:
    """Seconds per step of ``steps`` timed training steps after ``warmup``."""
    timer = StepTimer(warmup, profiler)
    with (process_group_of_its_own() if sharded else contextlib.nullcontext()):
        trainer = L.Trainer(max_steps=warmup + steps, accelerator=accelerator, devices=1, precision=precision,
                            strategy=ShardedStrategy(world_size=1) if sharded else "auto",
                            logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, gradient_clip_val=1.0, callbacks=[timer])
        trainer.fit(module, train_dataloaders=DataLoader(Repeat(batches), batch_size=None, pin_memory=False))
    return (timer.end - timer.start) / steps


@contextlib.contextmanager
def process_group_of_its_own():
    """The sharded strategy starts a (one-process) process group and Lightning writes MASTER_PORT and the ranks into
    os.environ: both are undone afterwards, so that nothing started later from this process (a SLURM job, another
    scenario) inherits a port this process still listens on."""
    saved = dict(os.environ)
    try:
        yield
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        os.environ.clear()
        os.environ.update(saved)


def is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error).lower()


def run_scenario(name: str, base: list[str], args, peak_flops: float | None, deadline: float,
                 sdxl_base: list[str] | None = None) -> dict:
    description, overrides, cached = SCENARIOS[name]
    sdxl = SDXL in overrides
    cfg = load_config(None, [*(sdxl_base if sdxl else base), *overrides, "model.optim.warmup_steps=0",
                             "model.ema.enabled=false"])
    result = {"description": description, "overrides": overrides, "cached": cached, "runs": []}
    gpu = torch.cuda.is_available()
    module = LLM4GenModule(OmegaConf.to_object(cfg.model), seed=cfg.seed)
    flops = module_step_flops(module, cfg.data.resolution, cached)
    result["flops_per_sample"] = flops.as_dict()
    for batch_size in (args.sdxl_batch_sizes if sdxl else args.batch_sizes):
        if time.monotonic() > deadline and result["runs"]:
            result["runs"].append({"batch_size": batch_size, "status": "skipped: time budget"})
            break
        if gpu:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        batches = make_batches(module, batch_size, cfg.data.resolution, cached, cfg.model.objective.lambda_entity > 0)
        try:
            seconds = fit_steps(module, batches, args.steps, args.warmup, "gpu" if gpu else "cpu", args.precision,
                                sharded=cfg.trainer.get("strategy") == STRATEGY_NAME)
        except (RuntimeError, torch.cuda.OutOfMemoryError) as error:
            if not is_oom(error):
                raise
            result["runs"].append({"batch_size": batch_size, "status": "out of memory"})
            break
        finally:
            del batches
            module.zero_grad(set_to_none=True)
            gc.collect()
        images_per_sec = batch_size / seconds
        tflops = images_per_sec * flops.total / 1e12
        run = {"batch_size": batch_size, "status": "ok", "step_ms": seconds * 1e3, "images_per_sec": images_per_sec,
               "tflops_per_sec": tflops, "mfu": tflops * 1e12 / peak_flops if peak_flops else None,
               "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if gpu else None}
        result["runs"].append(run)
        print(f"  {name} batch {batch_size}: {images_per_sec:.1f} img/s, {tflops:.3g} TFLOP/s"
              + (f", MFU {run['mfu']:.1%}" if run["mfu"] is not None else "")
              + (f", peak {run['peak_memory_gib']:.1f} GiB" if gpu else ""), flush=True)
    ok = [r for r in result["runs"] if r["status"] == "ok"]
    result["best"] = max(ok, key=lambda r: r["images_per_sec"]) if ok else None
    if args.profile and name == "a" and result["best"]:
        result["profile"] = profile_step(module, cfg, cached, result["best"]["batch_size"], args)
    del module
    gc.collect()
    if gpu:
        torch.cuda.empty_cache()
    return result


def profile_step(module, cfg, cached, batch_size: int, args) -> str:
    """Top kernels (by device time) of 3 training steps, as torch.profiler's table."""
    from torch.profiler import ProfilerActivity, profile

    gpu = torch.cuda.is_available()
    prof = profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else []))
    batches = make_batches(module, batch_size, cfg.data.resolution, cached, False)
    fit_steps(module, batches, 3, args.warmup, "gpu" if gpu else "cpu", args.precision, profiler=prof)
    averages = prof.key_averages()
    if not gpu:
        return averages.table(sort_by="self_cpu_time_total", row_limit=15)
    try:
        return averages.table(sort_by="self_device_time_total", row_limit=15)
    except (AttributeError, KeyError):  # older torch names it after CUDA
        return averages.table(sort_by="self_cuda_time_total", row_limit=15)


def print_table(results: dict) -> None:
    print("\n| scenario | batch | images/s | TFLOP/s | MFU | peak memory GiB | FLOP/sample (T) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, result in results.items():
        best = result["best"] or {}
        fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
        print(f"| {name}: {result['description']} | {best.get('batch_size', '-')} | {fmt(best.get('images_per_sec'), '.1f')} "
              f"| {fmt(best.get('tflops_per_sec'), '.3g')} | {fmt(best.get('mfu'), '.1%')} "
              f"| {fmt(best.get('peak_memory_gib'), '.1f')} | {result['flops_per_sample']['total'] / 1e12:.3g} |")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny embedded models on the CPU (a test runs this)")
    parser.add_argument("--scenarios", default=None,
                        help="comma-separated subset of a..k (f, g, h: the other connectors; i, j, k: SDXL); default "
                             "a..e on a GPU (one 10-minute command; run i,j,k as a second), a..e and i, j, k with --smoke")
    parser.add_argument("--batch-sizes", default=None, help="sweep, e.g. 16,32,64 (default 32,64,128; smoke: 2)")
    parser.add_argument("--sdxl-batch-sizes", default=None, help="the SDXL scenarios' sweep (default 4,8,16; smoke: 2)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per run (default 10; smoke: 2)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3; smoke: 1)")
    parser.add_argument("--budget-s", type=float, default=390.0, help="stop sweeping larger batches after this")
    parser.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (default: by GPU name)")
    parser.add_argument("--profile", action=argparse.BooleanOptionalAction, default=None,
                        help="profile scenario (a) at its best batch size (default: on a GPU)")
    parser.add_argument("--workdir", default=str(Path.home() / ".cache" / "llm4gen" / "gpu-bench"),
                        help="where the random-weight full-size folders are written (~6 GB, once)")
    parser.add_argument("--out", default="runs/gpu_bench.json", help="JSON results")
    args = parser.parse_args(argv)
    args.scenarios = args.scenarios or ("a,b,c,d,e,i,j,k" if args.smoke else "a,b,c,d,e")
    args.scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = sorted(set(args.scenarios) - set(SCENARIOS))
    if unknown:
        parser.error(f"unknown scenarios {unknown}; choose from {', '.join(SCENARIOS)}")
    default_sizes = "2" if args.smoke else "32,64,128"
    args.batch_sizes = [int(b) for b in (args.batch_sizes or default_sizes).split(",")]
    args.sdxl_batch_sizes = [int(b) for b in (args.sdxl_batch_sizes or ("2" if args.smoke else "4,8,16")).split(",")]
    args.steps = args.steps or (2 if args.smoke else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.smoke else 3)
    args.profile = torch.cuda.is_available() if args.profile is None else args.profile
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # no per-fit banners in the table
    started = time.monotonic()
    gpu = torch.cuda.is_available()
    if not gpu and not args.smoke:
        print("error: no CUDA device; the full-size bench needs a GPU (use --smoke on a CPU)", file=sys.stderr)
        raise SystemExit(2)
    any_sdxl = any(SDXL in SCENARIOS[name][1] for name in args.scenarios)
    if args.smoke:
        base = ["trainer.precision=32-true"]
        sdxl_base = [*base, "model.base.pretrained=embedded:tiny-sdxl", "data.resolution=32", "data.buckets.enabled=false"]
        args.precision = "32-true"
    else:
        base = full_size_overrides(Path(args.workdir).expanduser(), "cuda")
        sdxl_base = full_size_sdxl_overrides(Path(args.workdir).expanduser(), "cuda") if any_sdxl else None
        args.precision = "bf16-mixed"
    device = torch.device("cuda" if gpu else "cpu")
    peak = device_peak_flops(device, args.peak_tflops)
    deadline = started + args.budget_s
    results = {}
    for name in args.scenarios:
        print(f"scenario {name}: {SCENARIOS[name][0]}", flush=True)
        results[name] = run_scenario(name, base, args, peak, deadline, sdxl_base)
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if gpu else platform.processor() or "cpu",
        "peak_tflops": peak / 1e12 if peak else None, "torch": torch.__version__, "smoke": args.smoke,
        "precision": args.precision, "steps": args.steps, "warmup": args.warmup,
        "wall_s": time.monotonic() - started, "scenarios": results,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print_table(results)
    if "a" in results and results["a"].get("profile"):
        print("\ntop kernels, scenario (a):\n" + results["a"]["profile"])
    print(f"\n{report['device']}, {report['wall_s']:.0f} s; results in {out}")
    return report


if __name__ == "__main__":
    main()

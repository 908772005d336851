"""What a feature cache buys: data throughput, training step time and bytes on disk, online vs cached.

    python bench/bench_cache.py [--num-samples 128] [--source-resolution 256] [--resolution 32]
                                [--batch-size 8] [--steps 8] [--dtype float16]

Writes synthetic shards (PNG shapes at --source-resolution) into a temporary directory, caches them with
``run_cache`` (latent_moments, llm_features, entities) and prints:

1. samples/s of one data worker (``num_workers=0``: the main process) through the datamodule, online
   (PNG decode + resize + crop -> pixels) against cached (read latent moments + LLM features);
2. the tiny default's training step (forward, backward, AdamW) on an online batch (VAE + LLM run) against
   a cached batch (neither runs), median of --steps after one warm-up;
3. bytes per sample per field of this cache (from its storage report), and the same computed for the
   full-size setup: SD1.5 at 512 px (moments 8x64x64), T5-XL (width 2048) at several caption lengths,
   CLIP ViT-L (77x768), so docs/performance.md can quote them.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from llm4gen.configs.schema import load_config  # noqa: E402
from llm4gen.datamodules.synthetic import write_synthetic_shards  # noqa: E402
from llm4gen.datamodules.webdataset_datamodule import WebDatasetDataModule  # noqa: E402
from llm4gen.tools.cache_storage import format_bytes, npy_bytes, tar_member_bytes  # noqa: E402
from llm4gen.tools.feature_cache import run_cache  # noqa: E402

CACHED_KEYS = ["latent_moments", "llm_features"]


def loader_rate(shards: str, resolution: int, batch_size: int, precomputed_keys: list[str],
                epochs: int = 3) -> tuple[float, float]:
    """(samples per wall second, samples per CPU second) of the last of ``epochs`` passes (the first
    warms the page cache). CPU time is what a worker costs; wall time also counts other users' load."""
    dm = WebDatasetDataModule(shards, batch_size=batch_size, num_workers=0, resolution=resolution,
                              shuffle_buffer=64, precomputed_keys=precomputed_keys)
    loader = dm.train_dataloader()
    rates = (0.0, 0.0)
    for _ in range(epochs):
        samples, wall, cpu = 0, time.perf_counter(), time.process_time()
        for batch in loader:
            dm.on_batch_consumed(batch)
            samples += len(batch)
        rates = (samples / (time.perf_counter() - wall), samples / (time.process_time() - cpu))
    return rates


def first_batch(shards: str, resolution: int, batch_size: int, precomputed_keys: list[str]):
    dm = WebDatasetDataModule(shards, batch_size=batch_size, resolution=resolution, shuffle_buffer=0,
                              shuffle_shards=False, precomputed_keys=precomputed_keys)
    return next(iter(dm.train_dataloader()))


def step_time(module, batch, steps: int) -> tuple[float, float]:
    """Median (wall, CPU) seconds of compute_losses + backward + AdamW step on one batch."""
    optimizer = torch.optim.AdamW(module.trainable_parameters(), lr=1e-4)
    module.train()
    walls, cpus = [], []
    for step in range(steps + 1):
        wall, cpu = time.perf_counter(), time.process_time()
        terms = module.compute_losses(batch, generator=torch.Generator().manual_seed(step))
        loss = module.objective(terms)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return statistics.median(walls[1:]), statistics.median(cpus[1:])


def full_size_rows(dtype: str) -> list[tuple[str, int]]:
    """(what, bytes in a tar per sample) for the paper's setup, computed from the array shapes."""
    rows = [("SD1.5 512 px latent moments (8, 64, 64)", tar_member_bytes(npy_bytes((8, 64, 64), dtype)))]
    for tokens in (16, 32, 64, 128):
        rows.append((f"T5-XL features ({tokens}, 2048) unpadded", tar_member_bytes(npy_bytes((tokens, 2048), dtype))))
    rows.append(("T5-XL features (256, 2048) padded (release)", tar_member_bytes(npy_bytes((256, 2048), dtype))))
    rows.append(("CLIP ViT-L features (77, 768)", tar_member_bytes(npy_bytes((77, 768), dtype))))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-samples", type=int, default=128)
    parser.add_argument("--samples-per-shard", type=int, default=32)
    parser.add_argument("--source-resolution", type=int, default=256, help="stored PNG size")
    parser.add_argument("--resolution", type=int, default=32, help="training resolution (tiny default: 32)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    args = parser.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))

    cfg = load_config(overrides=[f"data.resolution={args.resolution}", "data.synthetic_if_missing=false",
                                 f"data.batch_size={args.batch_size}"])
    with tempfile.TemporaryDirectory() as tmp:
        source, cache_dir = os.path.join(tmp, "source"), os.path.join(tmp, "cache")
        write_synthetic_shards(source, args.num_samples, args.samples_per_shard, args.source_resolution, seed=0)
        start = time.perf_counter()
        summary = run_cache(cfg, source, cache_dir, ["latent_moments", "llm_features", "entities"],
                            cache_dtype=args.dtype, batch_size=32, log=lambda *a, **k: None)
        cache_rate = args.num_samples / (time.perf_counter() - start)
        report = summary["report"]

        online_rate = loader_rate(source, args.resolution, args.batch_size, [])
        cached_rate = loader_rate(cache_dir, args.resolution, args.batch_size, CACHED_KEYS)

        from llm4gen.lightning_modules.llm4gen import LLM4GenModule

        module = LLM4GenModule(OmegaConf.to_object(cfg.model))
        online_batch = first_batch(source, args.resolution, args.batch_size, [])
        cached_batch = first_batch(cache_dir, args.resolution, args.batch_size, CACHED_KEYS)
        online_step = step_time(module, online_batch, args.steps)
        cached_step = step_time(module, cached_batch, args.steps)

    print(f"\nfeature cache benchmark: {args.num_samples} synthetic samples, PNG {args.source_resolution} px -> "
          f"{args.resolution} px, batch {args.batch_size}, cache {args.dtype}, torch threads {torch.get_num_threads()}")
    print(f"cache writing (tiny VAE + MiniLM + spaCy, CPU): {cache_rate:.1f} samples/s (incl. model loading)\n")
    print(f"{'one data worker (num_workers=0)':<44} {'samples/s':>10} {'per CPU-s':>10}")
    print(f"{'online: PNG decode + resize + crop':<44} {online_rate[0]:>10.0f} {online_rate[1]:>10.0f}")
    print(f"{'cached: latent moments + LLM features':<44} {cached_rate[0]:>10.0f} {cached_rate[1]:>10.0f}")
    print(f"{'ratio cached / online':<44} {cached_rate[0] / online_rate[0]:>10.2f} "
          f"{cached_rate[1] / online_rate[1]:>10.2f}\n")
    print(f"{'tiny-default training step (median)':<44} {'wall ms':>10} {'CPU ms':>10}")
    print(f"{'online (VAE encode + MiniLM + UNet + CAM)':<44} {online_step[0] * 1e3:>10.1f} "
          f"{online_step[1] * 1e3:>10.1f}")
    print(f"{'cached (UNet + CAM)':<44} {cached_step[0] * 1e3:>10.1f} {cached_step[1] * 1e3:>10.1f}")
    print(f"{'ratio online / cached':<44} {online_step[0] / cached_step[0]:>10.2f} "
          f"{online_step[1] / cached_step[1]:>10.2f}\n")
    print(f"this cache (mean LLM tokens {report['mean_llm_tokens']:.1f}): bytes per sample")
    print(f"{'member group':<44} {'payload':>10} {'in tar':>10} {'per 1M samples':>15}")
    for group, f in report["fields"].items():
        print(f"{group:<44} {f['bytes_per_sample']:>10,.0f} {f['tar_bytes_per_sample']:>10,.0f} "
              f"{format_bytes(f['projected_bytes']):>15}")
    print(f"\nfull-size setup, {args.dtype}, computed from shapes (npy header + tar header/padding included)")
    print(f"{'field':<44} {'in tar':>10} {'per 1M samples':>15}")
    for what, size in full_size_rows(args.dtype):
        print(f"{what:<44} {size:>10,} {format_bytes(size * 1e6):>15}")


if __name__ == "__main__":
    main()

"""Data loading throughput: decode + transform samples/s, in total and per worker.

    python bench/bench_data.py [--num-samples 1024] [--source-resolution 256] [--resolution 128]
                               [--batch-size 16] [--workers 0 1 2] [--epochs 2]

Writes synthetic shards (PNG shapes at --source-resolution) into a temporary directory, then times
(a) ``preprocess_image`` alone in this process and (b) full epochs through the datamodule's
DataLoader for each worker count. The first epoch is a warm-up (page cache, worker start).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from llm4gen.datamodules.synthetic import synthetic_sample, write_synthetic_shards  # noqa: E402
from llm4gen.datamodules.transforms import preprocess_image, sample_rng  # noqa: E402
from llm4gen.datamodules.webdataset_datamodule import WebDatasetDataModule  # noqa: E402


def time_transform_only(count: int, source_resolution: int, resolution: int) -> float:
    images = [synthetic_sample(i, source_resolution, 0)["png"] for i in range(count)]
    start = time.perf_counter()
    for i, data in enumerate(images):
        preprocess_image(data, resolution, center_crop=False, random_flip=True, rng=sample_rng(0, 0, str(i)))
    return count / (time.perf_counter() - start)


def time_loader(shards: str, workers: int, args: argparse.Namespace) -> tuple[float, int]:
    dm = WebDatasetDataModule(
        shards,
        batch_size=args.batch_size,
        num_workers=workers,
        resolution=args.resolution,
        center_crop=False,
        random_flip=True,
        shuffle_buffer=256,
    )
    loader = dm.train_dataloader()
    rates = []
    for _ in range(args.epochs):
        samples = 0
        start = time.perf_counter()
        for batch in loader:
            dm.on_batch_consumed(batch)
            samples += len(batch)
        rates.append(samples / (time.perf_counter() - start))
    return rates[-1], samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-samples", type=int, default=1024)
    parser.add_argument("--samples-per-shard", type=int, default=64)
    parser.add_argument("--source-resolution", type=int, default=256)
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as directory:
        write_synthetic_shards(directory, args.num_samples, args.samples_per_shard, args.source_resolution, seed=0)
        alone = time_transform_only(min(256, args.num_samples), args.source_resolution, args.resolution)
        print(f"# {args.num_samples} PNG samples {args.source_resolution}px -> {args.resolution}px, "
              f"batch {args.batch_size}, {os.cpu_count()} CPUs")
        print(f"# preprocess_image alone, this process: {alone:,.0f} samples/s")
        print(f"| {'workers':>7} | {'samples/s':>10} | {'per worker':>10} | {'samples':>7} |")
        print(f"| {'-' * 7} | {'-' * 10} | {'-' * 10} | {'-' * 7} |")
        for workers in args.workers:
            rate, samples = time_loader(directory, workers, args)
            print(f"| {workers:>7} | {rate:>10,.0f} | {rate / max(workers, 1):>10,.0f} | {samples:>7} |")


if __name__ == "__main__":
    main()

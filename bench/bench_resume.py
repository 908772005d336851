"""Resume cost against the position in the epoch: time from restoring a data position to the first
batch, at 10% and at 90% of an epoch over many shards.

    python bench/bench_resume.py [--shards 200] [--samples-per-shard 20] [--batch-size 8] [--repeats 3]

Writes synthetic shards (PNG, --source-resolution px) to a temporary directory, iterates the
datamodule to each position (untimed), saves its ``state_dict``, then times a fresh datamodule
restoring that state until its first batch, both from the saved stream snapshot (what checkpoints
hold now: only the partial shard and the shuffle buffer's samples are read) and by replaying the
stream up to the cursor (what an old checkpoint without a snapshot does). Also checks that the
resumed batch is the one the uninterrupted stream yields next.

The elastic rows: a position saved on 2 ranks (explicit rank/world_size, one worker each, both at the
same step) and restored on 3, each new rank timed to its first batch (the slowest of the three is
reported): the remaining samples of the epoch are worked out from the saved positions and re-divided, and
a new rank starts with the samples the old ranks still held in their shuffle buffers, named one by one.
Also checks that no resumed first batch holds a sample the 2 ranks had trained on.

Last, the one-time count pass that shards without a recorded count get before the first step (member headers
only, datamodules/shard_counts.py): over the local files (seeking from header to header) and streamed through
``pipe:cat`` as a remote shard is.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time

from llm4gen.datamodules.shard_counts import count_samples  # noqa: E402
from llm4gen.datamodules.shards import resolve_shards  # noqa: E402
from llm4gen.datamodules.synthetic import write_synthetic_shards  # noqa: E402
from llm4gen.datamodules.webdataset_datamodule import WebDatasetDataModule  # noqa: E402


def make_datamodule(shards: str, args: argparse.Namespace, rank: int = 0, world_size: int = 1) -> WebDatasetDataModule:
    return WebDatasetDataModule(shards, batch_size=args.batch_size, num_workers=0, resolution=args.resolution,
                                shuffle_buffer=args.shuffle_buffer, seed=0, rank=rank, world_size=world_size)


def state_at(shards: str, batches: int, args: argparse.Namespace) -> tuple[dict, list[str]]:
    """The datamodule state after ``batches`` consumed batches, and the next batch's keys."""
    dm = make_datamodule(shards, args)
    for index, batch in enumerate(dm.train_dataloader()):
        if index == batches:
            return state, batch.keys
        dm.on_batch_consumed(batch)
        if index == batches - 1:
            state = copy.deepcopy(dm.state_dict())
    raise ValueError(f"the epoch has fewer than {batches + 1} batches")


def without_snapshot(state: dict) -> dict:
    state = copy.deepcopy(state)
    for rank in state["ranks"]:
        rank["workers"] = [w[:2] for w in rank["workers"]]
    return state


def time_resume(shards: str, state: dict, expected: list[str], args: argparse.Namespace) -> float:
    best = float("inf")
    for _ in range(args.repeats):
        dm = make_datamodule(shards, args)
        start = time.perf_counter()
        dm.load_state_dict(state)
        batch = next(iter(dm.train_dataloader()))
        best = min(best, time.perf_counter() - start)
        assert batch.keys == expected, "the resumed stream differs from the uninterrupted one"
    return best


def elastic_state(shards: str, batches: int, args: argparse.Namespace) -> tuple[dict, set[str]]:
    """Both ranks of 2 after ``batches`` consumed batches each: the gathered state and the keys trained on."""
    states, seen = [], set()
    for rank in range(2):
        dm = make_datamodule(shards, args, rank=rank, world_size=2)
        for index, batch in enumerate(dm.train_dataloader()):
            dm.on_batch_consumed(batch)
            seen.update(batch.keys)
            if index + 1 == batches:
                break
        states.append(copy.deepcopy(dm.state_dict()))
    return {**states[0], "ranks": [state["ranks"][0] for state in states]}, seen


def time_elastic(shards: str, state: dict, seen: set[str], args: argparse.Namespace) -> float:
    """The slowest of the 3 new ranks' times to their first batch (each the best of --repeats)."""
    slowest = 0.0
    for rank in range(3):
        best = float("inf")
        for _ in range(args.repeats):
            dm = make_datamodule(shards, args, rank=rank, world_size=3)
            dm.setup("fit")  # counted shards: the count is cached beside them, not part of a resume
            start = time.perf_counter()
            dm.load_state_dict(state)
            batch = next(iter(dm.train_dataloader()))
            best = min(best, time.perf_counter() - start)
            assert not set(batch.keys) & seen, "the elastic resume repeated a sample trained on before"
        slowest = max(slowest, best)
    return slowest


def time_count_pass(urls: list[str], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        counts = count_samples(urls)
        best = min(best, time.perf_counter() - start)
        assert None not in counts
    return best


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=200)
    parser.add_argument("--samples-per-shard", type=int, default=20)
    parser.add_argument("--source-resolution", type=int, default=64)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--shuffle-buffer", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as directory:
        total = args.shards * args.samples_per_shard
        write_synthetic_shards(directory, num_samples=total, samples_per_shard=args.samples_per_shard,
                               resolution=args.source_resolution, seed=0)
        epoch_batches = total // args.batch_size
        rows, elastic = [], []
        for share in (0.1, 0.9):
            batches = int(epoch_batches * share)
            state, expected = state_at(directory, batches, args)
            rows.append((share, batches, time_resume(directory, state, expected, args),
                         time_resume(directory, without_snapshot(state), expected, args)))
            per_rank = int(total // (2 * args.batch_size) * share)
            elastic.append((share, per_rank, time_elastic(directory, *elastic_state(directory, per_rank, args), args)))
        urls = resolve_shards(directory)
        counting = (time_count_pass(urls, args.repeats), time_count_pass([f"pipe:cat {u}" for u in urls], args.repeats))

    print(f"{args.shards} shards x {args.samples_per_shard} samples ({args.source_resolution} px PNG), batch "
          f"{args.batch_size}, shuffle buffer {args.shuffle_buffer}, best of {args.repeats}; time to the first batch")
    print(f"| position | batches consumed | resume from snapshot (s) | replay to cursor (s) |")
    print(f"| --- | --- | --- | --- |")
    for share, batches, snapshot, replay in rows:
        print(f"| {share:.0%} | {batches} | {snapshot:.3f} | {replay:.3f} |")
    ratio = rows[1][2] / rows[0][2]
    print(f"90% / 10% resume from snapshot: {ratio:.2f}x (target <= 1.5); replay: {rows[1][3] / rows[0][3]:.2f}x")
    print()
    print("elastic resume: saved on 2 ranks x 1 worker, resumed on 3 ranks x 1 worker; the slowest new rank")
    print(f"| position | batches consumed per old rank | time to the first batch (s) |")
    print(f"| --- | --- | --- |")
    for share, batches, seconds in elastic:
        print(f"| {share:.0%} | {batches} | {seconds:.3f} |")
    print(f"90% / 10% elastic resume: {elastic[1][2] / elastic[0][2]:.2f}x")
    print()
    local, streamed = counting
    print(f"count pass over {args.shards} shards ({total} samples, headers only): local {local:.3f} s "
          f"({total / local:,.0f} samples/s); streamed through pipe:cat {streamed:.3f} s ({total / streamed:,.0f} samples/s)")


if __name__ == "__main__":
    main()

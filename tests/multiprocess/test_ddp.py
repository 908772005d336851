"""DDP on CPU with the real train.py: 2 processes (gloo), with ``data.epoch_batches`` and without it.

Checked per rank through the key recorder (``LLM4GEN_RECORD_KEYS`` -> ``<path>.rank<R>``): the
trainable weights end identical on both ranks (a SHA-256 each rank computes itself), one epoch of
the non-resampled stream gives every sample to exactly one rank, a shard count that does not
divide among the ranks still finishes, and without ``epoch_batches`` uneven, partly corrupt shards end
every epoch on both ranks at the same step, without a warning. The module tells DDP to ignore its frozen
parameters, so DDP runs with ``find_unused_parameters`` off (Lightning's ``ddp`` default) without complaint.
"""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest

from llm4gen.datamodules.synthetic import write_synthetic_shards
from llm4gen.datamodules.webdataset_datamodule import WebDatasetDataModule
from tests.helpers.shards import png_bytes, write_tar

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

DDP = ("trainer.devices=2", "trainer.strategy=ddp", "trainer.accelerator=cpu")
DDP_TIMEOUT_S = 300  # a hang in a collective would otherwise block forever


def shard_keys(directory: Path) -> set[str]:
    keys = set()
    for shard in directory.glob("*.tar"):
        with tarfile.open(shard) as tar:
            keys |= {name.split(".", 1)[0] for name in tar.getnames()}
    return keys


def run_ddp(tiny_runs, tmp_path: Path, shards_dir: Path, *overrides: str) -> tuple[str, dict[int, list[dict]]]:
    record = tmp_path / "keys.jsonl"
    output = tiny_runs.run(tiny_runs.argv(tmp_path / "run", *DDP, *overrides, shards_dir=shards_dir),
                           tiny_runs.env(record), timeout_s=DDP_TIMEOUT_S)
    assert not record.exists(), "a 2-process run must write one record per rank, not <path>"
    records = {rank: tiny_runs.read_records(record.with_name(f"{record.name}.rank{rank}")) for rank in (0, 1)}
    assert "MEMBER: 2/2" in output and "unused parameters" not in output.lower(), output[-3000:]
    return output, records


def assert_same_weights_on_both_ranks(records: dict[int, list[dict]], steps: int) -> None:
    ends = {rank: [r for r in lines if r.get("event") == "train_end"] for rank, lines in records.items()}
    assert [len(ends[0]), len(ends[1])] == [1, 1], ends
    assert ends[0][0]["global_step"] == ends[1][0]["global_step"] == steps
    assert ends[0][0]["trainable_sha256"] == ends[1][0]["trainable_sha256"], ends


def test_epoch_batches_partition_an_epoch_over_ranks_even_with_a_large_shuffle_buffer(tmp_path):
    """The same split without processes (explicit rank/world_size): the shuffle buffer (64) is larger
    than a rank's 16 samples, and the repeat round that epoch_batches may need must not leak into it."""
    write_synthetic_shards(str(tmp_path), num_samples=32, samples_per_shard=8, resolution=8, seed=0)
    keys = {}
    for rank in (0, 1):
        dm = WebDatasetDataModule(str(tmp_path), batch_size=4, resolution=8, shuffle_buffer=64, seed=0,
                                  epoch_batches=4, rank=rank, world_size=2)
        dm.setup("fit")
        keys[rank] = [key for batch in dm.train_dataloader() for key in batch.keys]
    assert len(keys[0]) == len(set(keys[0])) == 16 and len(keys[1]) == len(set(keys[1])) == 16
    assert not set(keys[0]) & set(keys[1])
    assert set(keys[0]) | set(keys[1]) == shard_keys(tmp_path)


def test_two_ranks_split_an_epoch_exactly_and_end_with_identical_weights(tiny_runs, tmp_path):
    shards = tmp_path / "shards"  # 4 shards x 8 samples: each rank reads 2 shards = 16 samples = 4 batches
    write_synthetic_shards(str(shards), num_samples=32, samples_per_shard=8, resolution=32, seed=0)

    _, records = run_ddp(tiny_runs, tmp_path, shards, "data.epoch_batches=4", "trainer.max_steps=4")

    batches = {rank: [r for r in lines if "keys" in r] for rank, lines in records.items()}
    for rank in (0, 1):
        assert [r["global_step"] for r in batches[rank]] == [0, 1, 2, 3], batches[rank]
        assert all(r["rank"] == rank and len(r["keys"]) == 4 for r in batches[rank])
    keys = {rank: [k for r in batches[rank] for k in r["keys"]] for rank in (0, 1)}
    assert len(set(keys[0])) == len(keys[0]) == 16 and len(set(keys[1])) == len(keys[1]) == 16
    assert not set(keys[0]) & set(keys[1])  # no sample on both ranks
    assert set(keys[0]) | set(keys[1]) == shard_keys(shards)  # and none left out
    assert_same_weights_on_both_ranks(records, steps=4)

    checkpoint = tiny_runs.load_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert checkpoint["global_step"] == 4 and all(k.startswith("adapter.") for k in checkpoint["state_dict"])
    positions = checkpoint["WebDatasetDataModule"]["ranks"]  # every rank's data position, gathered
    assert [p["world_size"] for p in positions] == [2, 2]


def test_shard_count_not_divisible_by_ranks_finishes(tiny_runs, tmp_path):
    shards = tmp_path / "shards"  # 3 shards x 8 samples: rank 0 reads 2 shards, rank 1 one shard (2 batches)
    write_synthetic_shards(str(shards), num_samples=24, samples_per_shard=8, resolution=32, seed=0)

    # 3 batches per rank per epoch: rank 1 must repeat its shard within the epoch; 4 steps cross an epoch.
    _, records = run_ddp(tiny_runs, tmp_path, shards, "data.epoch_batches=3", "trainer.max_steps=4")

    for rank in (0, 1):
        assert [r["global_step"] for r in records[rank] if "keys" in r] == [0, 1, 2, 3]
    assert_same_weights_on_both_ranks(records, steps=4)


def test_without_epoch_batches_uneven_corrupt_shards_end_every_epoch_on_both_ranks(tiny_runs, tmp_path):
    shards = tmp_path / "shards"  # 7 + 7 + 6 samples, and a shard of 3 of which 2 are unusable: 23 counted
    write_synthetic_shards(str(shards), num_samples=20, samples_per_shard=7, resolution=32, seed=0)
    write_tar(shards / "shard-corrupt.tar", [("broken", {"png": png_bytes(32)[:40], "txt": b"a cut png"}),
                                             ("usable", {"png": png_bytes(32), "txt": b"a green square"}),
                                             ("silent", {"png": png_bytes(32), "txt": b" "})])

    # 23 // (2 ranks x batch 4) = 2 batches per rank per epoch: 6 steps cross two epoch ends
    output, records = run_ddp(tiny_runs, tmp_path, shards, "trainer.max_steps=6")

    assert "different numbers of batches" not in output and "warning" not in output.lower(), output[-3000:]
    batches = {rank: [r for r in lines if "keys" in r] for rank, lines in records.items()}
    for rank in (0, 1):
        assert [r["global_step"] for r in batches[rank]] == list(range(6)), batches[rank]
        assert all(len(r["keys"]) == 4 for r in batches[rank])
    for epoch in range(3):  # within an epoch no sample goes to both ranks
        keys = [{k for r in batches[rank][2 * epoch:2 * epoch + 2] for k in r["keys"]} for rank in (0, 1)]
        assert not keys[0] & keys[1]
    assert_same_weights_on_both_ranks(records, steps=6)

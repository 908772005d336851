"""A NaN in one rank of a 2-process DDP run (gloo, the real train.py): both ranks skip the same step, which
changes no weight on either, and end with identical weights; the count is the same everywhere."""

from __future__ import annotations

import csv

import pytest
import torch

from tests.helpers.shards import write_latent_shards

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

DDP = ("trainer.devices=2", "trainer.strategy=ddp", "trainer.accelerator=cpu")


def test_a_nan_on_one_rank_is_skipped_by_both(tiny_runs, tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    # 2 shards of 12: each rank reads one (3 batches of 4); only the second shard holds the poisoned sample
    write_latent_shards(shards, num_samples=24, samples_per_shard=12, poisoned={17})
    record = tmp_path / "keys.jsonl"
    out = tmp_path / "run"
    output = tiny_runs.run(tiny_runs.argv(out, *DDP, "model.base.pretrained=embedded:tiny-sd", "trainer.max_steps=3",
                                          "data.precomputed_keys=[latent_moments]", "checkpoint.every_n_steps=1",
                                          "checkpoint.keep_last=-1", "validation.at_start=false",
                                          "model.ema.enabled=true", "data.shuffle_buffer=0", shards_dir=shards),
                           tiny_runs.env(record), timeout_s=300)
    assert "MEMBER: 2/2" in output
    batches = {rank: [r for r in tiny_runs.read_records(record.with_name(f"{record.name}.rank{rank}")) if "keys" in r]
               for rank in (0, 1)}
    holder = [rank for rank in (0, 1) if any("sample-000017" in r["keys"] for r in batches[rank])]
    assert len(holder) == 1  # one rank alone saw the bad sample
    ends = {rank: [r for r in tiny_runs.read_records(record.with_name(f"{record.name}.rank{rank}"))
                   if r.get("event") == "train_end"][0] for rank in (0, 1)}
    assert ends[0]["trainable_sha256"] == ends[1]["trainable_sha256"] and ends[0]["global_step"] == 3
    states = [torch.load(out / "checkpoints" / f"step={s:07d}.ckpt", map_location="cpu", weights_only=False)
              for s in (1, 2, 3)]
    unchanged = [s for s in (1, 2) if all(torch.equal(states[s - 1]["state_dict"][k], states[s]["state_dict"][k])
                                          for k in states[s]["state_dict"])]
    assert len(unchanged) == 1 and states[-1]["nonfinite_steps"]["skipped"] == 1
    with open(out / "logs" / "metrics.csv") as handle:
        assert max(float(r["train/skipped_nonfinite"]) for r in csv.DictReader(handle)
                   if r.get("train/skipped_nonfinite")) == 1

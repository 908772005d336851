"""Resuming a data position reads only the partial shard and the shuffle buffer's samples: the
cost does not grow with the position, and the resumed batches are the uninterrupted ones."""

from __future__ import annotations

import copy

import pytest

import llm4gen.datamodules.shards as shards_module
import llm4gen.datamodules.stream as stream
from llm4gen.datamodules.synthetic import write_synthetic_shards
from llm4gen.datamodules.webdataset_datamodule import WebDatasetDataModule

SHARDS, PER_SHARD, BATCH = 40, 6, 4


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    directory = tmp_path_factory.mktemp("many-shards")
    write_synthetic_shards(str(directory), num_samples=SHARDS * PER_SHARD, samples_per_shard=PER_SHARD, resolution=8, seed=0)
    return str(directory)


def datamodule(shards, **overrides):
    settings = dict(batch_size=BATCH, num_workers=0, resolution=8, shuffle_buffer=10, seed=3, rank=0, world_size=1)
    return WebDatasetDataModule(shards, **{**settings, **overrides})


def uninterrupted(shards, **overrides):
    dm = datamodule(shards, **overrides)
    states, keys = [], []
    for batch in dm.train_dataloader():
        dm.on_batch_consumed(batch)
        keys.append(batch.keys)
        states.append(copy.deepcopy(dm.state_dict()))
    return states, keys


@pytest.mark.parametrize("overrides", [{}, {"epoch_batches": 25}, {"shuffle_buffer": 0}])
@pytest.mark.slow
def test_resume_from_a_late_position_opens_few_shards_and_continues_exactly(shards, monkeypatch, overrides):
    states, keys = uninterrupted(shards, **overrides)
    late = int(len(keys) * 0.9)
    opened = []
    real = stream.iter_tar_samples
    monkeypatch.setattr(stream, "iter_tar_samples", lambda url: (opened.append(url), real(url))[1])
    dm = datamodule(shards, **overrides)
    dm.load_state_dict(states[late - 1])
    batches = iter(dm.train_dataloader())
    resumed = [next(batches).keys]
    shards_read_before_the_first_batch = len(set(opened))
    resumed += [batch.keys for batch in batches]
    assert resumed == keys[late:]
    # Replaying would read the ~36 shards before this position; the snapshot needs the partial shard
    # and the few holding the 10 buffered samples.
    assert shards_read_before_the_first_batch <= 8, opened


def test_a_position_without_a_snapshot_still_resumes_by_replaying(shards):
    states, keys = uninterrupted(shards)
    state = copy.deepcopy(states[9])
    state["ranks"][0]["workers"] = [w[:2] for w in state["ranks"][0]["workers"]]  # as older checkpoints hold
    dm = datamodule(shards)
    dm.load_state_dict(state)
    assert [batch.keys for batch in dm.train_dataloader()] == keys[10:]


def test_shuffle_buffer_state_names_its_samples_by_place():
    import random

    samples = [{"__place__": (0, i), "v": i} for i in range(5)]
    buffer = shards_module.ShuffleBuffer(iter(samples), 3, random.Random(0))
    first = next(buffer)
    state = buffer.state()
    assert sorted(map(tuple, state["buffer"])) == sorted(s["__place__"] for s in samples[:4] if s is not first)
    assert state["draining"] == [] and state["rng"][0] == 3

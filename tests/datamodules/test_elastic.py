"""Several ranks without ``epoch_batches``: every rank makes the same number of full batches on uneven, partly
corrupt shards (so none can end an epoch alone and hang the others in a collective), and a position saved on one
number of ranks and workers resumes on another by dividing exactly what was left of the epoch.

The datamodule is driven directly with explicit rank/world_size (the ranks' states gathered by hand, as Lightning
does); one slow test runs 3 gloo processes with a collective after every batch, as DDP has."""

import json
import os
import warnings

import pytest
import torch

from llm4gen.datamodules.sample_slices import segments_of
from llm4gen.datamodules.shards import epoch_shard_numbers
from llm4gen.datamodules.webdataset_datamodule import WebDatasetDataModule
from tests.helpers.shards import png_bytes, write_tar

SIZES = [11, 3, 8, 1, 6, 9, 4]  # 42 samples in 7 shards of uneven size
BATCH = 3


def good(name):
    return name, {"png": png_bytes(8, (len(name) * 9 % 256, 40, 90)), "txt": f"a caption for {name}".encode()}


def write_shards(directory, corrupt=False):
    """SIZES samples per shard; with ``corrupt``, 5 of them unusable, spread unevenly (3 in the first shard)."""
    bad = {(0, 2): {"png": png_bytes(16)[:50], "txt": b"a truncated png"}, (0, 5): {"png": png_bytes(8), "txt": b"  "},
           (0, 9): {"png": png_bytes(8)}, (5, 0): {"jpg": b"not a jpeg", "txt": b"garbage"},
           (6, 3): {"png": png_bytes(8), "txt": b""}} if corrupt else {}
    keys = []
    for shard, size in enumerate(SIZES):
        members = []
        for index in range(size):
            name = f"s{shard}-{index:02d}"
            members.append((name, bad[shard, index]) if (shard, index) in bad else good(name))
            keys += [] if (shard, index) in bad else [name]
        write_tar(directory / f"shard-{shard}.tar", members)
    return set(keys)


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    directory = tmp_path_factory.mktemp("uneven")
    return str(directory), write_shards(directory)


@pytest.fixture(scope="module")
def corrupt(tmp_path_factory):
    directory = tmp_path_factory.mktemp("uneven-corrupt")
    return str(directory), write_shards(directory, corrupt=True)


def make(shards, rank, world_size, num_workers=0, **overrides):
    settings = dict(batch_size=BATCH, resolution=8, shuffle_buffer=4, seed=7, rank=rank, world_size=world_size,
                    num_workers=num_workers)
    return WebDatasetDataModule(shards, **{**settings, **overrides})


def consume(dm, limit=None, loader=None):
    batches = []
    for batch in dm.train_dataloader() if loader is None else loader:
        dm.on_batch_consumed(batch)
        batches.append(batch)
        if limit is not None and len(batches) == limit:
            break
    return batches


def keys_of(batches):
    return [key for batch in batches for key in batch.keys]


def gathered(states):
    """The state Lightning stores: every rank's position (each datamodule here holds only its own)."""
    return {**states[0], "ranks": [state["ranks"][0] for state in states]}


def test_every_rank_makes_the_same_full_batches_on_uneven_corrupt_shards(corrupt):
    shards, usable = corrupt
    per_rank, skipped = [], 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "may hang" warning any more
        for rank in range(3):
            dm = make(shards, rank, 3, num_workers=2)
            per_rank.append(consume(dm))
            skipped += sum(dm.skipped_totals().values())
    expected = sum(SIZES) // (3 * BATCH)  # 4 batches per rank: 36 of 42 samples, 5 of which are unusable
    assert [len(batches) for batches in per_rank] == [expected] * 3
    assert all(len(batch.keys) == BATCH for batches in per_rank for batch in batches)
    keys = [set(keys_of(batches)) for batches in per_rank]
    assert not (keys[0] & keys[1] or keys[1] & keys[2] or keys[0] & keys[2])  # a rank never reads another's
    assert set().union(*keys) <= usable and skipped >= 1


def test_same_ranks_and_workers_resume_bitwise(clean):
    shards, _ = clean
    full = [consume(make(shards, rank, 2, num_workers=2)) for rank in range(2)]
    for stop in (1, len(full[0]) - 2):
        states = []
        for rank in range(2):
            first = make(shards, rank, 2, num_workers=2)
            assert keys_of(consume(first, limit=stop)) == keys_of(full[rank][:stop])
            states.append(json.loads(json.dumps(first.state_dict())))
        resumed = make(shards, 1, 2, num_workers=2)
        resumed.load_state_dict(gathered(states))
        rest = consume(resumed)
        assert keys_of(rest) == keys_of(full[1][stop:])
        for a, b in zip(rest, full[1][stop:]):
            assert torch.equal(a.pixel_values, b.pixel_values)


@pytest.mark.parametrize("before, after, stop, new_batch", [((3, 2), (2, 0), 1, BATCH), ((1, 0), (3, 2), 4, BATCH),
                                                              ((2, 1), (1, 2), 3, BATCH), ((2, 1), (2, 1), 2, 2)],
                         ids=["3x2->2x1", "1->3x2", "2->1x2", "batch3->batch2"])
def test_a_resume_on_other_ranks_and_workers_finishes_the_epoch_once(clean, before, after, stop, new_batch):
    shards, keys = clean
    (world, workers), (new_world, new_workers) = before, after
    seen, states = [], []
    for rank in range(world):  # the ranks train in step: each has consumed ``stop`` batches at the checkpoint
        dm = make(shards, rank, world, num_workers=workers)
        seen += keys_of(consume(dm, limit=stop))
        states.append(json.loads(json.dumps(dm.state_dict())))
    state = gathered(states)
    counts = []
    for rank in range(new_world):
        dm = make(shards, rank, new_world, num_workers=new_workers, batch_size=new_batch)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "data position saved with seed")  # the batch size changed: said
            dm.load_state_dict(state)
        loader = dm.train_dataloader()
        rest = consume(dm, loader=loader)
        counts.append(len(rest))
        seen += keys_of(rest)
        assert dm.epoch == 1 and keys_of(consume(dm, loader=loader, limit=1))  # then the next epoch, from its start
    assert len(seen) == len(set(seen)), "a sample was trained on twice"
    assert set(seen) <= keys
    left = len(keys) - world * stop * BATCH
    if new_world > 1:  # equal batches on the new ranks; fewer than one batch per rank of what was left is not used
        assert counts == [left // (new_world * new_batch)] * new_world
        assert len(keys) - len(seen) == left % (new_world * new_batch)
    else:  # one rank uses everything
        assert set(seen) == keys


def test_what_was_left_is_read_in_one_pass_per_shard(clean, monkeypatch):
    """The rest of an epoch holds single samples the old workers' shuffle buffers held, between runs of unread
    ones: a shard is opened once and read forward, not once per run."""
    import llm4gen.datamodules.stream as stream

    shards, _ = clean
    states = []
    for rank in range(3):
        dm = make(shards, rank, 3, num_workers=2)
        consume(dm, limit=1)
        states.append(dm.state_dict())
    opened = []
    real = stream.iter_tar_samples
    monkeypatch.setattr(stream, "iter_tar_samples", lambda url: (opened.append(url), real(url))[1])
    resumed = make(shards, 0, 1)
    resumed.load_state_dict(gathered(states))
    consume(resumed)
    order = epoch_shard_numbers(len(SIZES), 7, 0)
    runs = segments_of(resumed._samples, order, SIZES)
    assert len(runs) > len({run.shard for run in runs})  # some shard holds several runs of what was left
    assert sorted(opened) == sorted(set(opened))


def test_a_position_from_epoch_batches_restarts_the_epoch_on_another_worker_count(clean):
    shards, _ = clean
    dm = make(shards, 0, 1, num_workers=2, epoch_batches=6)
    consume(dm, limit=3)
    resumed = make(shards, 0, 1, num_workers=0, epoch_batches=6)
    resumed.load_state_dict(dm.state_dict())
    reference = make(shards, 0, 1, num_workers=0, epoch_batches=6)
    with pytest.warns(UserWarning, match="epoch_batches.*restarting epoch 0"):
        assert keys_of(consume(resumed)) == keys_of(consume(reference))


# ---------------------------------------------------------------- 3 processes, a collective per batch


def _train_under_gloo(rank, world_size, shards, init_file, out_dir):
    import datetime

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=60))  # a rank left waiting fails instead of hanging
    try:
        dm = WebDatasetDataModule(shards, batch_size=BATCH, resolution=8, shuffle_buffer=4, seed=7, num_workers=1)
        dm.setup("fit")  # the ranks count the shards' samples together here (a collective)
        steps = 0
        for batch in dm.train_dataloader():
            dm.on_batch_consumed(batch)
            gradient = torch.ones(1)
            dist.all_reduce(gradient)  # what DDP does after every step: a rank that stopped early hangs here
            steps += 1
        counts = [None] * world_size
        dist.all_gather_object(counts, steps)
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as handle:
            json.dump({"steps": counts, "skipped": dm.skipped_totals()}, handle)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_three_processes_end_the_epoch_together(corrupt, tmp_path):
    shards, _ = corrupt
    context = torch.multiprocessing.spawn(_train_under_gloo, args=(3, shards, str(tmp_path / "init"), str(tmp_path)),
                                          nprocs=3, join=False)
    try:
        for _ in range(240):  # the processes start, count, read and finish in ~20 s; a hang ends at the timeout
            if context.join(timeout=1):
                break
        else:
            pytest.fail("the 3 ranks did not finish their epoch within 240 s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(3)]
    assert [r["steps"] for r in results] == [[sum(SIZES) // (3 * BATCH)] * 3] * 3

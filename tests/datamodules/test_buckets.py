"""Aspect-ratio bucketing: the bucket set, the assignment, the crop, and the stream's guarantees: every
sample lands in exactly one bucket, every batch is one bucket, ranks with ``epoch_batches`` yield equal
counts, and a resumed stream continues the uninterrupted one exactly (bucket contents included)."""

from __future__ import annotations

import copy
import io
import math
import random

import pytest
from PIL import Image

import llm4gen.datamodules.webdataset_datamodule as wdm
from llm4gen.configs.buckets import assign_bucket, bucket_sizes, buckets_enabled, resolve_buckets
from llm4gen.configs.schema import BucketConfig
from llm4gen.datamodules.synthetic import write_synthetic_shards
from llm4gen.datamodules.transforms import preprocess_image_with_geometry

# ---------------------------------------------------------------- the bucket set


@pytest.mark.parametrize("resolution, step, low, high", [(1024, 64, 0.25, 4.0), (1024, 64, 0.5, 2.0),
                                                         (512, 64, 0.5, 2.0), (32, 8, 0.5, 2.0), (64, 16, 0.25, 4.0)])
def test_buckets_are_step_multiples_of_about_the_square_area_within_the_aspect_range(resolution, step, low, high):
    buckets = bucket_sizes(resolution, step, low, high)
    area = resolution * resolution
    assert (resolution, resolution) in buckets
    assert len(set(buckets)) == len(buckets)
    assert buckets == sorted(buckets, key=lambda b: b[0] / b[1])
    for width, height in buckets:
        assert width % step == 0 and height % step == 0
        assert low <= width / height <= high
        assert width * height <= area  # never more memory than the square
        # As close to the area as the step allows: one more step on the long side would exceed it.
        assert (max(width, height) + step) * min(width, height) > area
        assert (height, width) in buckets  # portrait and landscape alike


def test_sdxl_range_gives_the_sdxl_report_shapes():
    buckets = bucket_sizes(1024, 64, 0.25, 4.0)
    for size in [(1024, 1024), (1152, 896), (896, 1152), (1216, 832), (1344, 768), (512, 2048), (2048, 512)]:
        assert size in buckets
    assert bucket_sizes(1024) == [b for b in buckets if 0.5 <= b[0] / b[1] <= 2.0]


def test_default_step_is_64_for_real_resolutions_and_8_for_tiny_ones():
    assert all(w % 64 == 0 and h % 64 == 0 for w, h in bucket_sizes(1024))
    assert bucket_sizes(32) == [(24, 40), (32, 32), (40, 24)]


def test_impossible_bucket_settings_are_refused():
    with pytest.raises(ValueError, match="no bucket"):
        bucket_sizes(32, step=64)
    with pytest.raises(ValueError, match="contain 1"):
        bucket_sizes(512, 64, 1.5, 2.0)


def test_every_image_size_lands_in_exactly_one_bucket_the_nearest_in_log_aspect():
    buckets = bucket_sizes(512, 64, 0.5, 2.0)
    rng = random.Random(0)
    for _ in range(2000):
        width, height = rng.randint(1, 4000), rng.randint(1, 4000)
        chosen = assign_bucket(width, height, buckets)
        assert chosen in buckets
        distance = lambda b: abs(math.log(b[0] / b[1]) - math.log(width / height))  # noqa: E731
        assert distance(chosen) == min(distance(b) for b in buckets)
        assert assign_bucket(width, height, buckets) == chosen  # a function of the size alone
    assert assign_bucket(100, 100, buckets) == (512, 512)
    assert assign_bucket(10_000, 10, buckets) == buckets[-1] and assign_bucket(10, 10_000, buckets) == buckets[0]


def test_enabled_auto_means_sdxl_only():
    assert buckets_enabled("auto", "sdxl") and not buckets_enabled("auto", "sd15")
    assert buckets_enabled("True", "sd15") and not buckets_enabled(False, "sdxl")
    assert resolve_buckets(BucketConfig(enabled="auto"), 32, "sd15") is None
    assert resolve_buckets(BucketConfig(enabled="auto"), 32, "sdxl") == bucket_sizes(32)
    assert resolve_buckets(None, 32, "sdxl") is None
    with pytest.raises(ValueError, match="auto, true, false"):
        buckets_enabled("sometimes", "sdxl")


# ---------------------------------------------------------------- the crop


def png(width, height):
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 10, 10)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_an_image_is_resized_to_cover_its_bucket_and_cropped_to_it():
    buckets = bucket_sizes(32)
    pixels, original, crop = preprocess_image_with_geometry(png(96, 50), 32, buckets=buckets)
    assert tuple(pixels.shape) == (3, 24, 40)  # landscape -> the 40 x 24 bucket, (3, height, width)
    assert original == (50, 96)
    assert crop == (0, (46 - 40) // 2)  # 96 x 50 covers 40 x 24 at 46 x 24: centre crop of the width
    pixels, _, crop = preprocess_image_with_geometry(png(30, 33), 32, buckets=buckets)
    assert tuple(pixels.shape) == (3, 32, 32) and crop == (1, 0)  # near-square -> the square (32 x 35)
    pixels, _, crop = preprocess_image_with_geometry(png(40, 400), 32, center_crop=False, random_flip=True,
                                                     rng=random.Random(3), buckets=buckets)
    assert tuple(pixels.shape) == (3, 40, 24) and 0 <= crop[0] <= 240 - 40 and crop[1] == 0


# ---------------------------------------------------------------- the stream

SIZES = [(32, 32), (48, 24), (24, 48), (40, 32), (64, 30), (30, 34), (20, 60)]
NUM, PER_SHARD, BATCH = 70, 7, 3


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    directory = tmp_path_factory.mktemp("mixed-aspect")
    write_synthetic_shards(str(directory), num_samples=NUM, samples_per_shard=PER_SHARD, resolution=32, seed=0,
                           sizes=SIZES)
    return str(directory)


BUCKETS = bucket_sizes(32)
EXPECTED_BUCKET = {f"sample-{i:06d}": assign_bucket(*SIZES[i % len(SIZES)], BUCKETS) for i in range(NUM)}


def make(shards, **overrides):
    settings = dict(batch_size=BATCH, num_workers=0, resolution=32, shuffle_buffer=6, seed=2, rank=0, world_size=1,
                    buckets=BUCKETS)
    return wdm.WebDatasetDataModule(shards, **{**settings, **overrides})


def run(dm, limit=None):
    batches, states = [], []
    for batch in dm.train_dataloader():
        dm.on_batch_consumed(batch)
        batches.append(batch)
        states.append(copy.deepcopy(dm.state_dict()))
        if limit is not None and len(batches) == limit:
            break
    return batches, states


def assert_bucket_pure(batches):
    for batch in batches:
        height, width = batch.pixel_values.shape[-2:]
        assert {EXPECTED_BUCKET[key] for key in batch.keys} == {(width, height)}, batch.keys
        assert len(batch.keys) == batch.pixel_values.shape[0] == batch.original_size.shape[0]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_one_epoch_uses_every_sample_once_in_bucket_pure_batches(mixed, num_workers):
    batches, _ = run(make(mixed, num_workers=num_workers))
    keys = [key for batch in batches for key in batch.keys]
    assert sorted(keys) == sorted(EXPECTED_BUCKET)  # every sample once: leftovers come as smaller batches
    assert_bucket_pure(batches)
    assert len({tuple(b.pixel_values.shape[-2:]) for b in batches}) == 3  # all three buckets met
    # Only a worker's last batches of a bucket may be short: at most one per bucket and worker.
    short = [b for b in batches if len(b.keys) < BATCH]
    assert len(short) <= 3 * max(num_workers, 1)
    assert all(len(b.keys) == BATCH for b in batches[: len(batches) - len(short)])


def test_without_buckets_the_same_shards_give_square_batches(mixed):
    batches, _ = run(make(mixed, buckets=None))
    assert {tuple(b.pixel_values.shape[1:]) for b in batches} == {(3, 32, 32)}


@pytest.mark.parametrize("resampled", [False, True])
def test_two_ranks_with_epoch_batches_yield_equal_counts_of_full_bucket_pure_batches(mixed, resampled):
    per_rank = []
    for rank in (0, 1):
        batches, _ = run(make(mixed, num_workers=2, rank=rank, world_size=2, epoch_batches=9, resampled=resampled))
        assert_bucket_pure(batches)
        per_rank.append(batches)
    assert [len(b) for b in per_rank] == [9, 9]
    assert all(len(batch.keys) == BATCH for batches in per_rank for batch in batches)
    keys = [{k for batch in batches for k in batch.keys} for batches in per_rank]
    if not resampled:
        assert not keys[0] & keys[1]  # ranks read disjoint shards


def test_two_ranks_without_epoch_batches_yield_equal_counts_of_full_bucket_pure_batches(mixed):
    per_rank = []
    for rank in (0, 1):
        batches, _ = run(make(mixed, rank=rank, world_size=2))
        assert_bucket_pure(batches)
        per_rank.append(batches)
    # a worker fills the buckets its slice leaves partly filled from the epoch's remainder, then its own slice
    assert [len(b) for b in per_rank] == [NUM // (2 * BATCH)] * 2
    assert all(len(batch.keys) == BATCH for batches in per_rank for batch in batches)
    keys = [{k for batch in batches for k in batch.keys} for batches in per_rank]
    assert not keys[0] & keys[1]


@pytest.mark.parametrize("settings", [{}, {"num_workers": 2}, {"num_workers": 2, "epoch_batches": 14},
                                      {"shuffle_buffer": 0}])
def test_resume_after_any_batch_continues_exactly_with_the_bucket_contents(mixed, settings):
    batches, states = run(make(mixed, **settings))
    keys = [b.keys for b in batches]
    waiting = [len(b.position["snapshot"]["groups"]) for b in batches]
    assert any(waiting), "no position held samples waiting in a bucket: the test would not test them"
    every = 3 if settings.get("num_workers") else 1  # worker processes start per resume: a sample of positions
    for k in range(0, len(batches) - 1, every):  # (after the last batch a resume starts the next epoch)
        dm = make(mixed, **settings)
        dm.load_state_dict(states[k])
        resumed, _ = run(dm)
        assert [b.keys for b in resumed] == keys[k + 1:], k
        assert all(a.pixel_values.shape == b.pixel_values.shape for a, b in zip(resumed, batches[k + 1:]))


def test_a_position_saved_with_other_buckets_warns(mixed):
    _, states = run(make(mixed), limit=2)
    dm = make(mixed, buckets=None)
    with pytest.warns(UserWarning, match="buckets"):
        dm.load_state_dict(states[-1])


def test_bad_bucket_lists_are_refused(mixed):
    with pytest.raises(ValueError, match="buckets"):
        make(mixed, buckets=[(32, 0)])
    with pytest.raises(ValueError, match="buckets"):
        make(mixed, buckets=[])

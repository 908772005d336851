"""The resumable stream: WebDataset shards -> batches (datamodules/batch.py), exact to the batch after a restart.

Why not ``wds.WebDataset`` as is: an exact restart needs every stage to be a deterministic function
of (seed, epoch, rank, worker) and a cheap way to fast-forward, and equal batch counts on every rank need
to know what each rank will read before it reads. So the stream is built here from small generator stages
(webdataset supplies URL opening, ``pipe:`` commands, brace expansion and the member naming), each of them
deterministic:

  samples         the epoch's global order is a function of (seed, epoch) only: the shard list shuffled by
                  ``random.Random(seed, epoch)``, each shard's samples in file order, every sample addressed
                  by its position through the shards' sample counts (shard_counts.py). Each (rank, worker)
                  reads a contiguous slice of it, cut at sample granularity (sample_slices.py): a worker's
                  *segments* are runs of one shard, and a slice that starts inside a shard reads the samples
                  before it without decoding them. With ``epoch_batches`` (or ``resampled``) workers read
                  whole shards instead, ``order[r::world_size][w::num_workers]`` (resampled: drawn with
                  replacement from the (rank, worker)'s own RNG)
  raw samples     tar members grouped by key; a tar that breaks (or ends before its counted samples)
                  counts one ``bad_shard`` and the stream goes on with the next segment
  shuffle buffer  seeded from (seed, epoch, rank, worker)
  decode          caption, then pixels (skipped when latents are precomputed) or cached members; a
                  bad sample raises ``SampleError`` and is counted, never fatal
  batch           batching happens inside the worker (cheap IPC: one pickled batch, not B samples);
                  with aspect-ratio ``buckets`` (``configs/buckets.py``) the worker keeps one waiting
                  list per bucket and a batch is one full list, so every batch is one bucket

Epoch ends. One rank: each worker reads its slice (whole batches of samples) to the end: every sample once,
and only the epoch's last batch partial, or a worker's last one when it skipped samples. Several ranks: every rank makes exactly ``samples // (world_size * batch_size)`` full
batches, whatever was skipped at read time, so no rank can end an epoch alone and leave the others
waiting in a collective. A worker that is short of its quota (skipped samples, or samples waiting in a
partly filled bucket) reads its piece of the epoch's remainder next, then its own slice again, each repeat
round through the shuffle buffer on its own (``ROUND_END``), as ``epoch_batches`` does; samples still
waiting in a bucket when the quota is reached are not used that epoch. What this costs (the remainder, fewer
than world_size x batch_size samples, is not trained on unless skips draw on it) is in sample_slices.py.

Position and resume. Every batch carries ``batch.position``: its epoch, the logical worker that
made it, that worker's batch count and its *cursor* (how many shuffled raw samples it had used). The
trainer reports each batch it trains on with :meth:`WebDatasetDataModule.on_batch_consumed`; the
datamodule keeps, per worker, the cursor of its last consumed batch and which worker is next.
``state_dict()`` (stored by Lightning in every checkpoint, gathered from all ranks) holds this. On
restore each worker replays its raw stream up to its cursor *without decoding* (reading tar bytes
only) and continues, and the logical worker ids are rotated so that physical worker 0 is the one
whose batch was due next. A DataLoader takes batches from its workers round-robin, dropping a
worker once it is exhausted, so the resumed stream equals the uninterrupted one batch for batch.
Requirements: the same shards, seed, batch size, shuffle buffer, num_workers and world size, and
``persistent_workers`` off (the epoch and the resume position reach the workers when the DataLoader starts
them, once per pass). With another num_workers or world size the datamodule works out which samples of the
epoch were not used yet (sample_slices.remaining_spans) and the new workers divide exactly those
(``PassPlan.samples``): the epoch is finished, not repeated (with ``epoch_batches`` it restarts, with a warning).

Buckets. Samples waiting in a partly filled bucket were taken from the stream before the cursor, so
the snapshot also names them by place (``"groups"``); a resumed worker re-reads and re-decodes them
(decoding is a pure function of seed, epoch and key). When a worker's data ends (one rank, no
``epoch_batches``), its partly filled buckets are emitted as smaller batches, one per bucket in (height,
width) order: every sample once. Under a quota only full batches are made. With cached latents the bucket of a
sample is the size of its latents (``cache.py`` writes them at it).

Epochs. The data epoch is this module's own counter, not the trainer's: it advances when a pass
over the train DataLoader runs to its end, so a pass stopped early (``limit_train_batches``, a
``break``) is continued by the next pass. No ``reload_dataloaders_every_n_epochs`` is needed.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Optional, Sequence

import torch
from torch.utils.data import IterableDataset, get_worker_info

from llm4gen.configs.schema import DataConfig
from llm4gen.datamodules.batch import Batch
from llm4gen.datamodules.cache_codec import decode_precomputed
from llm4gen.datamodules.captions import training_caption
from llm4gen.datamodules.collate import collate_samples, with_entities
from llm4gen.datamodules.entity_targets import EntityTargetBuilder
from llm4gen.datamodules.sample_slices import Segment, SlotShare, Span, first_round, segments_of, slot_share
from llm4gen.datamodules.shards import ROUND_END, ShuffleBuffer, assign_shards, epoch_shard_numbers, iter_tar_samples
from llm4gen.datamodules.transforms import (
    SKIP_REASONS,
    SampleError,
    find_image_member,
    check_download_status,
    original_size,
    preprocess_image_with_geometry,
    sample_rng,
)

_REASON_INDEX = {reason: i for i, reason in enumerate(SKIP_REASONS)}
_MAX_CONSECUTIVE_FAILURES = 10_000


class _ShardReader:
    """Reads samples ``first`` to ``stop`` of a shard, keeping it open for a following segment of the same shard
    further on (a pass over the samples a checkpoint left holds many short runs of one shard: one sequential
    read instead of one per run). The samples before ``first`` are read, never decoded."""

    def __init__(self) -> None:
        self.url: Optional[str] = None
        self.samples: Optional[Iterator[dict[str, Any]]] = None
        self.next_index = 0

    def read(self, url: str, first: int, stop: Optional[int]) -> Iterator[tuple[int, dict[str, Any]]]:
        if stop is not None and first >= stop:  # resumed at the segment's end: nothing to read
            return
        if url != self.url or self.samples is None or self.next_index > first:
            self.url, self.samples, self.next_index = url, iter_tar_samples(url), 0
        try:
            while stop is None or self.next_index < stop:
                sample = next(self.samples, None)
                if sample is None:
                    self.samples = None
                    return
                index, self.next_index = self.next_index, self.next_index + 1
                if index >= first:
                    yield index, sample
        except SampleError:
            self.samples = None
            raise


# ---------------------------------------------------------------- the stream


@dataclass
class WorkerPosition:
    """How far one logical worker got: shuffled raw samples used, and batches made."""

    cursor: int = 0
    batches: int = 0
    # Where the stream stood at ``cursor`` (ShardStream._snapshot): lets a resumed worker skip whole
    # shards instead of re-reading everything before the cursor. None: replay (older checkpoints).
    snapshot: Optional[dict[str, Any]] = None


@dataclass
class PassPlan:
    """Everything a worker needs to produce its part of one pass (pickled into each worker)."""

    epoch: int
    rank: int
    world_size: int
    num_workers: int
    first_worker: int = 0  # logical id of physical worker 0 (rotation after a resume)
    workers: list[WorkerPosition] = field(default_factory=list)
    samples: Optional[list[Span]] = None  # the pass's positions in the epoch's global order; None: all of them


@dataclass
class StreamConfig:
    """What a worker's stream reads: the resolved shard list and the ``data`` section as it is."""

    shards: list[str]
    data: DataConfig
    seed: int
    sizes: Optional[list[int]] = None  # samples per shard (shard_counts.py); None: whole-shard streams (epoch_batches, resampled)
    shuffle_shards: bool = True
    entity_parser: Optional[str] = None  # spaCy model: parse captions in the worker (unless cached)
    buckets: Optional[list[tuple[int, int]]] = None  # (width, height) aspect-ratio buckets; None: square crops
    entity_targets: Optional[EntityTargetBuilder] = None  # builds each batch's entity-loss targets in the worker


class ShardStream(IterableDataset):
    """The per-worker pipeline; ``plan`` is set by the DataLoader wrapper before each pass."""

    def __init__(self, config: StreamConfig):
        super().__init__()
        self.config = config
        self.plan: Optional[PassPlan] = None

    def __len__(self) -> int:
        if self.config.data.epoch_batches is None:
            raise TypeError("the number of batches is only known when epoch_batches is set")
        return self.config.data.epoch_batches

    def __iter__(self) -> Iterator[Batch]:
        if self.plan is None:
            raise RuntimeError("iterate the DataLoader from WebDatasetDataModule.train_dataloader(), not the dataset")
        info = get_worker_info()
        physical, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if num_workers != self.plan.num_workers:
            raise RuntimeError(f"plan made for {self.plan.num_workers} workers but the DataLoader runs {num_workers}")
        worker = (physical + self.plan.first_worker) % num_workers
        return self._worker_batches(worker, self.plan.workers[worker])

    def worker_quota(self, worker: int) -> Optional[int]:
        """Batches this logical worker makes this pass: its share of ``epoch_batches``, or of the equal split
        under several ranks (sample_slices.py); None: until its data ends."""
        total = self.config.data.epoch_batches
        if self.config.sizes is not None:
            return self.slot_share(worker).quota
        if total is None:
            return None
        workers = self.plan.num_workers
        return total // workers + (1 if worker < total % workers else 0)

    def slot_share(self, worker: int) -> SlotShare:
        c, p = self.config, self.plan
        spans = p.samples if p.samples is not None else [(0, sum(c.sizes))]
        return slot_share(spans, p.world_size, p.num_workers, c.data.batch_size, p.world_size > 1,
                          p.rank * p.num_workers + worker)

    def _shard_stream(self, worker: int) -> Iterator[Any]:
        """The worker's segments (sample_slices.Segment) in reading order; ``ROUND_END`` between repeat rounds."""
        c, p = self.config, self.plan
        if c.data.resampled:
            rng = random.Random(f"resample/{c.seed}/{p.epoch}/{p.rank}/{worker}")
            while True:
                yield Segment(rng.choice(range(len(c.shards))))
        if c.sizes is None:  # epoch_batches: whole shards, rank- then worker-strided, repeated in rounds
            for round_index in itertools.count():
                order = epoch_shard_numbers(len(c.shards), c.seed, p.epoch, c.shuffle_shards, round_index)
                yield from (Segment(shard) for shard in assign_shards(order, p.rank, p.world_size, worker, p.num_workers))
                if c.data.epoch_batches is None:
                    return
                yield ROUND_END
        share = self.slot_share(worker)
        order = epoch_shard_numbers(len(c.shards), c.seed, p.epoch, c.shuffle_shards)
        yield from first_round(share, order, c.sizes)
        if share.quota is None:
            return
        repeat = segments_of(share.slice, order, c.sizes)  # a slot short of its quota reads its slice again
        while True:
            yield ROUND_END
            yield from repeat

    def _raw_samples(self, worker: int, counts: list[int], place: dict[str, int]) -> Iterator[dict[str, Any]]:
        """The worker's raw samples, each tagged ``__place__`` = (segment number, index in its shard), from
        ``place`` on (``{"shard": segment number, "index", "empty"}``; kept up to date: the next sample to read)."""
        start_number, start_index = place["shard"], place["index"]
        segments = itertools.islice(enumerate(self._shard_stream(worker)), start_number, None)  # skipped: no I/O
        reader = _ShardReader()
        for number, segment in segments:
            if segment is ROUND_END:
                place.update(shard=number + 1, index=0)
                yield ROUND_END
                continue
            url = self.config.shards[segment.shard]
            first = max(segment.start, start_index) if number == start_number else segment.start
            produced = first - segment.start
            try:
                for index, sample in reader.read(url, first, segment.stop):  # the samples before: read, never decoded
                    produced += 1
                    sample["__place__"] = (number, index)
                    place.update(shard=number, index=index + 1)
                    yield sample
                if segment.stop is not None and segment.start + produced < segment.stop:
                    raise SampleError("bad_shard", f"{url} ends before sample {segment.stop} of its counted samples; "
                                                   f"was it changed after it was counted?")
            except SampleError as error:
                counts[_REASON_INDEX[error.reason]] += 1
            place.update(shard=number + 1, index=0, empty=0 if produced else place["empty"] + 1)
            if place["empty"] > max(len(self.config.shards), 1) * 2:
                raise RuntimeError(f"no readable sample in the last {place['empty']} shards (last: {url})")

    def _fetch(self, worker: int, places: Sequence[Sequence[int]]) -> list[dict[str, Any]]:
        """The raw samples at these places (read from their shards only), in the order given."""
        wanted: dict[int, set[int]] = {}
        for number, index in places:
            wanted.setdefault(int(number), set()).add(int(index))
        found: dict[tuple[int, int], dict[str, Any]] = {}
        segments = dict(itertools.islice(enumerate(self._shard_stream(worker)), max(wanted, default=-1) + 1))
        for number, indices in wanted.items():
            try:
                for index, sample in enumerate(iter_tar_samples(self.config.shards[segments[number].shard])):
                    if index in indices:
                        sample["__place__"] = (number, index)
                        found[number, index] = sample
                    if index >= max(indices):
                        break
            except SampleError:
                pass
        missing = [tuple(p) for p in places if (int(p[0]), int(p[1])) not in found]
        if missing:
            raise RuntimeError(f"cannot resume the data position: samples {missing[:3]} of the saved shuffle buffer "
                               f"are no longer in their shards; were the shards changed?")
        return [found[int(number), int(index)] for number, index in places]

    def _stream(self, worker: int, counts: list[int], start: WorkerPosition) -> tuple[ShuffleBuffer, dict[str, int], int]:
        """The worker's shuffled raw stream positioned at ``start.cursor``: from the saved snapshot
        (cost independent of the position: only the partial shard and the buffered samples are read),
        else by replaying the stream up to the cursor without decoding. Returns (stream, place, cursor)."""
        c, p = self.config, self.plan
        rng = random.Random(f"shuffle/{c.seed}/{p.epoch}/{p.rank}/{worker}")
        snapshot = start.snapshot
        if snapshot is None or start.cursor == 0:
            place = {"shard": 0, "index": 0, "empty": 0}
            raw = ShuffleBuffer(self._raw_samples(worker, counts, place), c.data.shuffle_buffer, rng)
            # Fast-forward without decoding: the skips in this prefix were counted by the earlier run.
            return raw, place, sum(1 for _ in itertools.islice(raw, start.cursor))
        version, internal, gauss = snapshot["rng"]
        rng.setstate((version, tuple(internal), gauss))
        place = dict(snapshot["place"])
        raw = ShuffleBuffer(self._raw_samples(worker, counts, place), c.data.shuffle_buffer, rng,
                            buffer=self._fetch(worker, snapshot["buffer"]), draining=self._fetch(worker, snapshot["draining"]))
        return raw, place, start.cursor

    def _decode(self, raw: Mapping[str, Any]) -> dict[str, Any]:
        c = self.config
        key = raw["__key__"]
        check_download_status(raw)
        caption_key, caption = training_caption(raw, c.data, c.seed, self.plan.epoch)  # data.caption_mix's draw
        sample: dict[str, Any] = {"key": key, "caption": caption}
        if c.data.precomputed_keys:
            sample.update(decode_precomputed(raw, c.data.precomputed_keys, caption_key))
        if "latent_moments" not in c.data.precomputed_keys:  # with cached latents the image is never decoded
            rng = sample_rng(c.seed, self.plan.epoch, key)
            sample["pixel_values"], decoded_hw, sample["crop_top_left"] = preprocess_image_with_geometry(
                find_image_member(raw), c.data.resolution, c.data.center_crop, c.data.random_flip, rng, c.buckets
            )  # (3, H, W), H x W the bucket's with buckets; SDXL's size/crop conditioning: (h, w) and (top, left) pixels
            sample["original_size"] = original_size(raw, decoded_hw)
        return sample

    def _group(self, sample: Mapping[str, Any]) -> tuple[int, ...]:
        """The batch group of a decoded sample: its bucket's (height, width) -- of the pixels, or of the cached
        latents, which the cache wrote at the bucket's size -- with buckets; one group without."""
        if self.config.buckets is None:
            return ()
        image = sample["pixel_values"] if "pixel_values" in sample else sample["latent_moments"]
        return tuple(int(v) for v in image.shape[-2:])

    def _restore_groups(self, worker: int, start: WorkerPosition) -> dict[tuple[int, ...], list[tuple[Any, dict[str, Any]]]]:
        """The bucket contents saved in ``start.snapshot`` (samples taken from the stream but not yet batched),
        re-read by place and decoded again (a pure function of seed, epoch and key)."""
        saved = (start.snapshot or {}).get("groups") or []
        groups: dict[tuple[int, ...], list[tuple[Any, dict[str, Any]]]] = {}
        for places in saved:
            for raw in self._fetch(worker, places):
                try:
                    sample = self._decode(raw)
                except SampleError as error:
                    raise RuntimeError(f"cannot resume the data position: bucketed sample {raw['__key__']} no longer "
                                       f"decodes ({error}); were the shards changed?") from error
                groups.setdefault(self._group(sample), []).append((raw["__place__"], sample))
        return groups

    def _worker_batches(self, worker: int, start: WorkerPosition) -> Iterator[Batch]:
        c, p = self.config, self.plan
        quota = self.worker_quota(worker)
        if quota is not None and start.batches >= quota:
            return
        counts = [0] * len(SKIP_REASONS)
        raw, place, cursor = self._stream(worker, counts, start)
        # Samples waiting for their batch, per group (bucket): a batch is made of one group only. Without
        # buckets there is one group, emptied by every batch, so a snapshot never holds any.
        groups = self._restore_groups(worker, start)

        def snapshot() -> dict[str, Any]:  # where the stream stands now, for WorkerPosition.snapshot
            waiting = [[list(place_) for place_, _ in groups[g]] for g in sorted(groups) if groups[g]]
            return {"place": dict(place), **raw.state(), "groups": waiting}

        reported = list(counts)
        batches = start.batches

        def finish(samples: list[tuple[Any, dict[str, Any]]], cursor_after: int, counts_after: list[int],
                   stream_state: dict[str, Any]) -> Batch:
            batch = with_entities(collate_samples([sample for _, sample in samples]), c.entity_parser, c.entity_targets)
            batch.skipped = torch.tensor([n - r for n, r in zip(counts_after, reported)], dtype=torch.long)
            reported[:] = counts_after
            batch.position = {
                "epoch": p.epoch,
                "rank": p.rank,
                "worker": worker,
                "num_workers": p.num_workers,
                "cursor": cursor_after,
                "worker_batches": batches,
                "snapshot": stream_state,
            }
            return batch

        # A full batch is held until the next good sample is found (or the data ends), so skips that
        # follow it travel with it and its cursor points exactly where the next batch starts. It
        # reports the counts as they stood *before* that sample was pulled (``counts_at_cursor``):
        # a broken shard met while pulling it is replayed, and counted, by a resumed run. The groups
        # do not change between the batch and that sample, so the snapshot names what they hold then.
        held: Optional[list[tuple[Any, dict[str, Any]]]] = None
        counts_at_cursor = list(counts)
        state_at_cursor: Optional[dict[str, Any]] = None  # the stream's snapshot while a batch is held
        failures_in_a_row = 0
        for raw_sample in raw:
            try:
                sample = self._decode(raw_sample)
            except SampleError as error:
                counts[_REASON_INDEX[error.reason]] += 1
                cursor += 1
                counts_at_cursor = list(counts)
                if held is not None:
                    state_at_cursor = snapshot()
                failures_in_a_row += 1
                if failures_in_a_row > _MAX_CONSECUTIVE_FAILURES:
                    raise RuntimeError(
                        f"{failures_in_a_row} samples in a row were unusable (counts {dict(zip(SKIP_REASONS, counts))}); "
                        f"check caption_keys {list(c.data.caption_keys)} and precomputed_keys {list(c.data.precomputed_keys)}"
                    ) from error
                continue
            failures_in_a_row = 0
            if held is not None:
                yield finish(held, cursor, counts_at_cursor, state_at_cursor)
                held = None
            group = self._group(sample)
            pending = groups.setdefault(group, [])
            pending.append((raw_sample["__place__"], sample))
            cursor += 1
            counts_at_cursor = list(counts)
            if len(pending) == c.data.batch_size:
                del groups[group]
                batches += 1
                if quota is not None and batches == quota:
                    yield finish(pending, cursor, counts_at_cursor, snapshot())
                    return
                held = pending
                state_at_cursor = snapshot()
        # End of this worker's data: everything met so far is reported with its last batch. Partly filled
        # groups follow as smaller batches, one per group in group order (with buckets: by bucket height,
        # then width), so every sample of the epoch is trained on once and every batch stays one bucket.
        if held is not None:
            yield finish(held, cursor, list(counts), snapshot())
        for group in sorted(groups):
            pending = groups.pop(group)
            if pending:
                batches += 1
                yield finish(pending, cursor, list(counts), snapshot())

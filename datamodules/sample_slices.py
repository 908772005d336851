"""How an epoch's samples are divided among the (rank, worker) slots that read them, and what is left of an epoch
after part of it was read: small pure functions over positions in the epoch's global order.

The global order. It depends on (seed, epoch) only, never on the number of ranks or workers: the shard list
shuffled (``shards.epoch_shard_order``), each shard's samples in file order, so position ``p`` names one
(shard, index) through the shards' sample counts (``shard_counts.py``). A pass reads a list of *spans*
``[start, stop)`` of it: the whole epoch, or what a checkpoint left of it.

Slots. Slot ``rank * num_workers + worker`` gets a contiguous *slice* of the pass's samples (contiguous: a worker
reads its shards sequentially, at most two of them partly). Two ways to cut:

* equal (several ranks): every rank makes exactly ``Q = T // (world_size * batch_size)`` batches, of which its
  worker ``w`` makes ``Q // num_workers`` (+1 for ``w < Q % num_workers``), and a slot's slice holds its quota x
  batch_size samples. The ``T - world_size * Q * batch_size`` samples past the last slice (fewer than
  world_size x batch_size: the epoch's stated remainder) are the *spare*, cut into one piece per slot; a slot
  reads its piece right after its slice, so the first samples skipped at read time (corrupt, failed download,
  empty caption) are replaced by samples no other slot reads. A slot that still runs short reads its own slice
  again (the stream's repeat rounds), as ``epoch_batches`` always did: no rank can end an epoch alone.
  Why quotas per rank rather than per-slot floors: the remainder stays below one batch per rank, not one per
  worker. Why a slot's own slice again rather than the epoch's order wrapped around: a repeat then stays on the
  rank that was short and in shards it has just read, where a wrapped order would hand it another rank's
  samples (the same sample on two GPUs in one epoch) from shards it has to open for one sample each.
* exact (one rank): ``T`` cut into slices of whole batches (the first workers one more) with no quota: every
  sample once, and only the epoch's last batch partial (a worker's last one too when it skipped samples). A lone
  rank waits on no one, so nothing is dropped and nothing repeated.

What is left. A worker's position (``stream.WorkerPosition.snapshot``) names the next sample it would read (its
*place*: segment number in its stream, index in the shard) and the samples it had taken but not yet trained on
(shuffle buffer, bucket lists). The samples of a pass left after a checkpoint are, per slot, the unread part of
its first round plus those waiting samples; :func:`remaining_spans` puts them back in global order, so a run on
another number of ranks or workers re-divides exactly them: no sample twice, none skipped.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Iterable, Mapping, Optional, Sequence

Span = tuple[int, int]  # [start, stop) of positions in the epoch's global order


def span_total(spans: Sequence[Sequence[int]]) -> int:
    return sum(int(stop) - int(start) for start, stop in spans)


def take_spans(spans: Sequence[Sequence[int]], start: int, stop: int) -> list[Span]:
    """Items ``start`` to ``stop`` (exclusive) of the concatenation of ``spans``, as spans."""
    taken: list[Span] = []
    offset = 0
    for a, b in spans:
        a, b = int(a), int(b)
        low, high = max(a, a + start - offset), min(b, a + stop - offset)
        if low < high:
            taken.append((low, high))
        offset += b - a
        if offset >= stop:
            break
    return taken


def merge_spans(spans: Iterable[Sequence[int]]) -> list[Span]:
    """Sorted, with overlapping and touching spans joined; empty ones dropped."""
    merged: list[list[int]] = []
    for a, b in sorted((int(a), int(b)) for a, b in spans if int(b) > int(a)):
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    return [(a, b) for a, b in merged]


# ---------------------------------------------------------------- slots


@dataclass(frozen=True)
class SlotShare:
    """What one (rank, worker) reads in a pass: its slice, its piece of the spare, and its batch quota."""

    slice: list[Span]
    spare: list[Span]
    quota: Optional[int]  # batches to make; None: until its data ends (exact)


def rank_batches(total: int, world_size: int, batch_size: int) -> int:
    """Batches every rank makes in an equal pass over ``total`` samples."""
    return total // (world_size * batch_size)


def slot_share(spans: Sequence[Sequence[int]], world_size: int, num_workers: int, batch_size: int, equal: bool,
               slot: int) -> SlotShare:
    """The share of slot ``slot`` = ``rank * num_workers + worker`` (see the module docstring)."""
    total, slots = span_total(spans), world_size * num_workers
    if not equal:  # whole batches per slot, the first slots one more: only the epoch's last batch is partial
        batches = -(-total // batch_size)

        def start(s: int) -> int:
            return min(total, batch_size * (s * (batches // slots) + min(s, batches % slots)))

        return SlotShare(take_spans(spans, start(slot), start(slot + 1)), [], None)
    per_rank = rank_batches(total, world_size, batch_size)
    rank, worker = divmod(slot, num_workers)

    def quota(w: int) -> int:
        return per_rank // num_workers + (1 if w < per_rank % num_workers else 0)

    first = (rank * per_rank + sum(quota(w) for w in range(worker))) * batch_size
    used = world_size * per_rank * batch_size
    spare = total - used
    return SlotShare(take_spans(spans, first, first + quota(worker) * batch_size),
                     take_spans(spans, used + spare * slot // slots, used + spare * (slot + 1) // slots), quota(worker))


def slot_shares(spans: Sequence[Sequence[int]], world_size: int, num_workers: int, batch_size: int,
                equal: bool) -> list[SlotShare]:
    """Every slot's share, indexed ``rank * num_workers + worker``."""
    return [slot_share(spans, world_size, num_workers, batch_size, equal, s) for s in range(world_size * num_workers)]


# ---------------------------------------------------------------- positions -> shards


@dataclass(frozen=True)
class Segment:
    """A run of samples of one shard that a worker reads in one go: indices ``start`` to ``stop`` (None: to the
    shard's end) of shard ``shard`` (its number in the resolved shard list); ``position``: the global position of
    ``start`` (None for whole-shard streams, which are not position-addressed)."""

    shard: int
    start: int = 0
    stop: Optional[int] = None
    position: Optional[int] = None


def epoch_offsets(order: Sequence[int], sizes: Sequence[int]) -> list[int]:
    """The global position of the first sample of each shard of ``order`` (shard numbers in epoch order)."""
    offsets, position = [], 0
    for shard in order:
        offsets.append(position)
        position += sizes[shard]
    return offsets


def segments_of(spans: Sequence[Sequence[int]], order: Sequence[int], sizes: Sequence[int],
                offsets: Optional[Sequence[int]] = None) -> list[Segment]:
    """The spans cut at shard boundaries: one segment per (span, shard) piece, in span order."""
    offsets = epoch_offsets(order, sizes) if offsets is None else offsets
    segments = []
    for a, b in spans:
        a, b = int(a), int(b)
        i = bisect.bisect_right(offsets, a) - 1
        while a < b:
            shard = order[i]
            end = offsets[i] + sizes[shard]
            if a < end:
                stop = min(b, end)
                segments.append(Segment(shard, a - offsets[i], stop - offsets[i], a))
                a = stop
            i += 1
    return segments


# ---------------------------------------------------------------- what is left


def unread_spans(first_round: Sequence[Segment], place: Mapping[str, int]) -> list[Span]:
    """The positions of ``first_round`` (a worker's segments, numbered from 0 in its stream) at or after
    ``place`` = ``{"shard": segment number, "index": next index in that segment's shard}``."""
    number, index = int(place["shard"]), int(place["index"])
    unread = []
    for k, segment in enumerate(first_round):
        if k < number:
            continue
        first = max(segment.start, index) if k == number else segment.start
        if first < segment.stop:
            unread.append((segment.position + first - segment.start, segment.position + segment.stop - segment.start))
    return unread


def waiting_positions(first_round: Sequence[Segment], places: Iterable[Sequence[int]]) -> list[int]:
    """The global positions of taken-but-unused samples named by place; places past the first round are
    repeats of samples already used and are left out."""
    positions = []
    for number, index in places:
        if int(number) < len(first_round):
            segment = first_round[int(number)]
            positions.append(segment.position + int(index) - segment.start)
    return positions


def remaining_spans(workers: Iterable[tuple[Sequence[Segment], Optional[Mapping[str, int]], Iterable[Sequence[int]]]]
                    ) -> list[Span]:
    """The samples of a pass not yet used, in global order, from every worker's (first-round segments, place
    or None if it had not started, places of its waiting samples)."""
    left: list[Span] = []
    for first_round, place, waiting in workers:
        if place is None:
            left += [(s.position, s.position + s.stop - s.start) for s in first_round]
            continue
        left += unread_spans(first_round, place)
        left += [(p, p + 1) for p in waiting_positions(first_round, waiting)]
    return merge_spans(left)


def first_round(share: SlotShare, order: Sequence[int], sizes: Sequence[int],
                offsets: Optional[Sequence[int]] = None) -> list[Segment]:
    """What a slot reads before it repeats anything: its slice, then its piece of the spare."""
    offsets = epoch_offsets(order, sizes) if offsets is None else offsets
    return segments_of(share.slice, order, sizes, offsets) + segments_of(share.spare, order, sizes, offsets)


def pass_remaining(ranks: Sequence[Mapping], spans: Sequence[Sequence[int]], order: Sequence[int],
                   sizes: Sequence[int], batch_size: int) -> Optional[list[Span]]:
    """What is left of a pass over ``spans``, from every rank's saved position (the datamodule's state: its
    ``num_workers``, ``world_size`` and per worker ``[cursor, batches, snapshot]``). None when it cannot be
    known: the ranks disagree on the layout, or a worker that had made batches saved no snapshot (a checkpoint
    older than snapshots)."""
    num_workers, world_size = int(ranks[0]["num_workers"]), int(ranks[0]["world_size"])
    if len(ranks) != world_size or any((int(r["num_workers"]), int(r["world_size"])) != (num_workers, world_size)
                                       for r in ranks):
        return None
    offsets = epoch_offsets(order, sizes)
    workers = []
    for rank, saved in enumerate(ranks):
        positions = saved.get("workers") or []
        for worker in range(num_workers):
            share = slot_share(spans, world_size, num_workers, batch_size, world_size > 1, rank * num_workers + worker)
            segments = first_round(share, order, sizes, offsets)
            position = positions[worker] if worker < len(positions) else [0, 0]
            snapshot = position[2] if len(position) > 2 else None
            if not int(position[1]):  # no batch of it was trained on: all of its share is left
                workers.append((segments, None, ()))
                continue
            if snapshot is None:
                return None
            waiting = [*snapshot.get("buffer", ()), *snapshot.get("draining", ()),
                       *(place for group in snapshot.get("groups") or () for place in group)]
            workers.append((segments, snapshot["place"], waiting))
    return remaining_spans(workers)

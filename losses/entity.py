"""Entity-guided regularization loss over the UNet's cross-attention probabilities.

LLM4GEN adds to the diffusion loss a term that makes each attribute's cross-attention map sit on its
entity's map; the paper does not publish the formula. This follows SynGen (Rassin et al., 2023):

    for each (attribute a, entity e) pair of a caption and each captured UNet layer:
        map(w)    = sum of w's tokens' attention probabilities per pixel, normalized over pixels
        positive  = JS(map(a), map(e))                                    pull a onto its entity
        negative  = mean over the caption's other entities o of  ln2 - JS(map(a), map(o))
                                                                          push a off the others
    loss = mean over pairs and layers of (positive + negative_weight * negative)

Divergence: Jensen-Shannon, not SynGen's symmetric KL. KL is unbounded, so the negative term (which
*maximizes* a divergence) can run away by driving an attribute's map to zero on some pixels, and it
blows up wherever a map has near-zero mass. JS is bounded by ln 2 and finite for disjoint maps, so
`ln2 - JS` is a similarity in [0, ln 2] that reaches 0 once the maps no longer overlap: both terms are
non-negative, comparable in scale, and safe to log. Its gradient equals that of `-JS`.

"Other entities" of a pair are the caption's entities other than the pair's entity, leaving out any
entity the same attribute is also bound to ("the car and the bus are red" does not push "red" off the
bus). A pair with no other entity has negative = 0. Pairs are pooled over the whole batch: samples
without pairs add nothing, and a batch without any pair gives exactly 0 for every term, computed
through the graph (`torch.where`), so `.backward()` works and yields zero gradients.

Maps are computed in float32 whatever the attention dtype (bf16 sums over 4096 pixels lose precision).
Memory of the negative term: (batch, pairs, words, pixels) floats per layer; at 64x64 with 20 pairs and
40 words that is ~13 MB per sample, so capture the 16x16/32x32 layers for large batches.
"""

from __future__ import annotations

import dataclasses

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields

import torch

from llm4gen.losses.entity_parser import EntityGroup, entity_words
from llm4gen.losses.token_alignment import fused_word_token_positions

_LN2 = math.log(2.0)
_EPS = 1e-12


@dataclass
class EntityTargets:
    """Per-sample targets of the entity loss, padded into tensors.

    Rows of `token_membership` follow `entity_words(groups)` of each sample, then padding.
    Collate per-sample targets with `collate_entity_targets` (not torch's default_collate: samples
    differ in word and pair counts).
    """

    token_membership: torch.Tensor  # (batch, words, tokens) float, 1 where the token belongs to the word
    word_mask: torch.Tensor  # (batch, words) bool, the word exists and kept at least one token
    is_entity: torch.Tensor  # (batch, words) bool
    pairs: torch.Tensor  # (batch, pairs, 2) long, (attribute word, entity word) row indices
    pair_mask: torch.Tensor  # (batch, pairs) bool

    def __post_init__(self) -> None:
        batch, words, _ = _expect_shape("token_membership", self.token_membership, 3)
        for name in ("word_mask", "is_entity"):
            if tuple(getattr(self, name).shape) != (batch, words):
                raise ValueError(
                    f"{name} has shape {tuple(getattr(self, name).shape)}, expected (batch, words) = "
                    f"{(batch, words)} from token_membership"
                )
        _, pairs, two = _expect_shape("pairs", self.pairs, 3)
        if self.pairs.shape[0] != batch or two != 2:
            raise ValueError(f"pairs has shape {tuple(self.pairs.shape)}, expected ({batch}, pairs, 2)")
        if tuple(self.pair_mask.shape) != (batch, pairs):
            raise ValueError(f"pair_mask has shape {tuple(self.pair_mask.shape)}, expected {(batch, pairs)}")

    @property
    def batch_size(self) -> int:
        return self.token_membership.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.token_membership.shape[2]

    @property
    def num_pairs(self) -> int:
        return int(self.pair_mask.sum())

    def to(self, device) -> EntityTargets:
        return EntityTargets(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})


def _expect_shape(name: str, tensor: torch.Tensor, ndim: int) -> tuple[int, ...]:
    if not isinstance(tensor, torch.Tensor) or tensor.ndim != ndim:
        shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise ValueError(f"{name} must be a {ndim}-d tensor, got {shape}")
    return tuple(tensor.shape)


def build_entity_targets(
    groups_batch: Sequence[Sequence[EntityGroup]],
    positions_batch: Sequence[Sequence[Sequence[int]]],
    num_tokens: int,
) -> EntityTargets:
    """Targets from each sample's parsed groups and its words' token positions in the fused sequence.

    `positions_batch[b][i]` are the positions of `entity_words(groups_batch[b])[i]` (as returned by
    `fused_word_token_positions`); a word with no position (lost to truncation) is masked out with
    every pair it is in.
    """
    if len(groups_batch) != len(positions_batch):
        raise ValueError(f"got {len(groups_batch)} parsed captions but {len(positions_batch)} position lists")
    samples = []
    for sample, (groups, positions) in enumerate(zip(groups_batch, positions_batch)):
        words = entity_words(groups)
        if len(words) != len(positions):
            raise ValueError(
                f"sample {sample}: {len(words)} words (entity_words of its groups) but {len(positions)} "
                "position lists; align exactly the words entity_words returns, in that order"
            )
        for word, word_positions in zip(words, positions):
            bad = [p for p in word_positions if not 0 <= p < num_tokens]
            if bad:
                raise ValueError(
                    f"sample {sample}: word {word.text!r} has token positions {bad} outside "
                    f"[0, {num_tokens}); num_tokens must be the fused length (77 + LLM max length)"
                )
        row = {(word.start, word.end): i for i, word in enumerate(words)}
        kept = [len(p) > 0 for p in positions]
        pairs = []
        for group in groups:
            entity = row[(group.entity.start, group.entity.end)]
            for attribute in group.attributes:
                pair = (row[(attribute.start, attribute.end)], entity)
                if kept[pair[0]] and kept[entity] and pair[0] != entity and pair not in pairs:
                    pairs.append(pair)
        entities = {row[(group.entity.start, group.entity.end)] for group in groups}
        samples.append((positions, kept, entities, pairs))

    batch = len(samples)
    max_words = max((len(s[0]) for s in samples), default=0)
    max_pairs = max((len(s[3]) for s in samples), default=0)
    token_membership = torch.zeros(batch, max_words, num_tokens)
    word_mask = torch.zeros(batch, max_words, dtype=torch.bool)
    is_entity = torch.zeros(batch, max_words, dtype=torch.bool)
    pairs_tensor = torch.zeros(batch, max_pairs, 2, dtype=torch.long)
    pair_mask = torch.zeros(batch, max_pairs, dtype=torch.bool)
    for b, (positions, kept, entities, pairs) in enumerate(samples):
        for i, word_positions in enumerate(positions):
            token_membership[b, i, list(word_positions)] = 1.0
            word_mask[b, i] = kept[i]
            is_entity[b, i] = i in entities
        if pairs:
            pairs_tensor[b, : len(pairs)] = torch.tensor(pairs, dtype=torch.long)
            pair_mask[b, : len(pairs)] = True
    return EntityTargets(token_membership, word_mask, is_entity, pairs_tensor, pair_mask)


def drop_leading_tokens(targets: EntityTargets, count: int) -> EntityTargets:
    """The targets in a context without its first ``count`` tokens (a connector that replaces CLIP: words
    align to the LLM's tokens alone). A word left with no token is masked out, with every pair it is in."""
    if not 0 <= count <= targets.num_tokens:
        raise ValueError(f"cannot drop {count} leading tokens from targets over {targets.num_tokens} tokens")
    membership = targets.token_membership[:, :, count:]
    word_mask = targets.word_mask & (membership.sum(dim=-1) > 0)
    in_pair = torch.gather(word_mask, 1, targets.pairs.flatten(1)).view(targets.pairs.shape)
    return EntityTargets(membership, word_mask, targets.is_entity, targets.pairs,
                         targets.pair_mask & in_pair.all(dim=-1))


def only_rows(targets: EntityTargets, rows: torch.Tensor) -> EntityTargets:
    """The targets of the samples where ``rows`` (batch,) bool is True; the others keep no word and no pair (the
    loss does not apply to them: outside its timestep window, or their caption was dropped)."""
    rows = rows.to(torch.bool)
    return EntityTargets(targets.token_membership * rows[:, None, None].to(targets.token_membership.dtype),
                         targets.word_mask & rows[:, None], targets.is_entity, targets.pairs,
                         targets.pair_mask & rows[:, None])


def keep_leading_tokens(targets: EntityTargets, count: int) -> EntityTargets:
    """The targets over the first ``count`` context tokens only: a masked context ends at its batch's longest
    caption. Every word's tokens must lie there (positions past it are padding, never a word's)."""
    if count >= targets.num_tokens:
        return targets
    if targets.token_membership[:, :, count:].any():
        raise ValueError(f"entity targets place words past context token {count}, where the context holds only "
                         f"padding: were they built for another tokenizer or prefix?")
    return dataclasses.replace(targets, token_membership=targets.token_membership[:, :, :count])


def collate_entity_targets(targets: Sequence[EntityTargets]) -> EntityTargets:
    """Concatenate targets along the batch, padding words and pairs (a DataLoader collate piece)."""
    if not targets:
        raise ValueError("collate_entity_targets needs at least one EntityTargets")
    num_tokens = {t.num_tokens for t in targets}
    if len(num_tokens) != 1:
        raise ValueError(f"cannot collate targets with different token counts {sorted(num_tokens)}")
    max_words = max(t.token_membership.shape[1] for t in targets)
    max_pairs = max(t.pairs.shape[1] for t in targets)

    def pad(tensor: torch.Tensor, dim: int, size: int) -> torch.Tensor:
        shape = list(tensor.shape)
        shape[dim] = size - shape[dim]
        return torch.cat([tensor, tensor.new_zeros(shape)], dim=dim)

    return EntityTargets(
        token_membership=torch.cat([pad(t.token_membership, 1, max_words) for t in targets]),
        word_mask=torch.cat([pad(t.word_mask, 1, max_words) for t in targets]),
        is_entity=torch.cat([pad(t.is_entity, 1, max_words) for t in targets]),
        pairs=torch.cat([pad(t.pairs, 1, max_pairs) for t in targets]),
        pair_mask=torch.cat([pad(t.pair_mask, 1, max_pairs) for t in targets]),
    )


def build_entity_targets_from_captions(
    captions: Sequence[str],
    groups_batch: Sequence[Sequence[EntityGroup]],
    clip_tokenizer,
    llm_tokenizer,
    clip_max_length: int = 77,
    llm_max_length: int = 256,
    llm_prefix: str = "pre ",
) -> EntityTargets:
    """Align each caption's words in the fused [CLIP, LLM] sequence and build its targets."""
    words_batch = [entity_words(groups) for groups in groups_batch]
    positions = fused_word_token_positions(
        captions, words_batch, clip_tokenizer, llm_tokenizer, clip_max_length, llm_max_length, llm_prefix
    )
    return build_entity_targets(groups_batch, positions, clip_max_length + llm_max_length)


@dataclass
class EntityLossOutput:
    total: torch.Tensor  # () positive + negative_weight * negative
    positive: torch.Tensor  # () mean JS(attribute, its entity)
    negative: torch.Tensor  # () mean of ln2 - JS(attribute, other entity)
    num_pairs: int


def word_attention_maps(attention_probs: torch.Tensor, token_membership: torch.Tensor) -> torch.Tensor:
    """Each word's spatial map: its tokens' probabilities summed, normalized over pixels.

    attention_probs (batch, pixels, tokens), token_membership (batch, words, tokens)
    -> (batch, words, pixels); a word with no token gets an all-zero map.
    """
    maps = torch.einsum("bpt,bwt->bwp", attention_probs, token_membership)
    return maps / maps.sum(dim=-1, keepdim=True).clamp_min(_EPS)


def jensen_shannon(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """JS divergence (nats, in [0, ln 2]) between distributions over the last dim; finite at zeros."""
    m = 0.5 * (p + q)
    log_m = m.clamp_min(_EPS).log()
    kl_pm = (p * (p.clamp_min(_EPS).log() - log_m)).sum(-1)
    kl_qm = (q * (q.clamp_min(_EPS).log() - log_m)).sum(-1)
    return 0.5 * (kl_pm + kl_qm)


def _as_layer_list(attention_probs) -> list[torch.Tensor]:
    if isinstance(attention_probs, torch.Tensor):
        return [attention_probs]
    if isinstance(attention_probs, Mapping):
        return list(attention_probs.values())
    return list(attention_probs)


def entity_loss(
    attention_probs: Sequence[torch.Tensor] | Mapping[str, torch.Tensor] | torch.Tensor,
    targets: EntityTargets,
    negative_weight: float = 1.0,
) -> EntityLossOutput:
    """The entity-guided regularization loss (see module docstring).

    attention_probs: one tensor per captured UNet cross-attention layer (a list, a name -> tensor
    mapping, or a single tensor), each (batch, pixels, tokens), softmaxed over tokens and averaged over
    heads; pixel counts may differ per layer, tokens must equal targets.num_tokens (77 + LLM length).
    """
    layers = _as_layer_list(attention_probs)
    if not layers:
        raise ValueError("entity_loss needs at least one layer of attention probabilities, got none")
    for index, layer in enumerate(layers):
        if not isinstance(layer, torch.Tensor) or layer.ndim != 3:
            shape = tuple(layer.shape) if isinstance(layer, torch.Tensor) else type(layer).__name__
            raise ValueError(f"attention layer {index} must be (batch, pixels, tokens), got {shape}")
        if layer.shape[0] != targets.batch_size or layer.shape[2] != targets.num_tokens:
            raise ValueError(
                f"attention layer {index} has shape {tuple(layer.shape)}, expected (batch={targets.batch_size}, "
                f"pixels, tokens={targets.num_tokens}) to match the entity targets"
            )

    num_pairs_count = targets.num_pairs  # read where the targets live (CPU from a DataLoader): no GPU sync
    targets = targets.to(layers[0].device)
    pair_mask = targets.pair_mask  # (batch, pairs)
    attribute_index, entity_index = targets.pairs[..., 0], targets.pairs[..., 1]  # (batch, pairs)
    other_entities = _other_entity_mask(targets)  # (batch, pairs, words)
    other_count = other_entities.sum(-1)  # (batch, pairs)
    num_pairs = pair_mask.sum()
    denominator = num_pairs.clamp_min(1).float()

    positive_terms, negative_terms = [], []
    for layer in layers:
        maps = word_attention_maps(layer.float(), targets.token_membership.float())  # (batch, words, pixels)
        attribute_maps = _gather_rows(maps, attribute_index)  # (batch, pairs, pixels)
        entity_maps = _gather_rows(maps, entity_index)  # (batch, pairs, pixels)
        positive = jensen_shannon(attribute_maps, entity_maps)  # (batch, pairs)
        similarity = _LN2 - jensen_shannon(attribute_maps.unsqueeze(2), maps.unsqueeze(1))  # (b, pairs, words)
        similarity = torch.where(other_entities, similarity, torch.zeros_like(similarity))
        negative = similarity.sum(-1) / other_count.clamp_min(1)  # (batch, pairs)
        zero = torch.zeros_like(positive)
        positive_terms.append(torch.where(pair_mask, positive, zero).sum() / denominator)
        negative_terms.append(torch.where(pair_mask, negative, zero).sum() / denominator)

    positive = torch.stack(positive_terms).mean()
    negative = torch.stack(negative_terms).mean()
    return EntityLossOutput(
        total=positive + negative_weight * negative,
        positive=positive,
        negative=negative,
        num_pairs=num_pairs_count,
    )


def _gather_rows(maps: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """maps (batch, words, pixels), index (batch, pairs) -> (batch, pairs, pixels)."""
    return maps.gather(1, index.unsqueeze(-1).expand(-1, -1, maps.shape[-1]))


def _other_entity_mask(targets: EntityTargets) -> torch.Tensor:
    """(batch, pairs, words): entities the pair's attribute is pushed away from."""
    batch, words = targets.word_mask.shape
    attribute_index, entity_index = targets.pairs[..., 0], targets.pairs[..., 1]
    # bound[b, a, e]: attribute word a is paired with entity word e in sample b
    bound = torch.zeros(batch, words, words, dtype=torch.bool, device=targets.pairs.device)
    b_index, p_index = targets.pair_mask.nonzero(as_tuple=True)
    bound[b_index, attribute_index[b_index, p_index], entity_index[b_index, p_index]] = True
    bound_to_attribute = bound.gather(1, attribute_index.unsqueeze(-1).expand(-1, -1, words))  # (b, pairs, w)
    candidate = (targets.is_entity & targets.word_mask).unsqueeze(1)  # (batch, 1, words)
    word_ids = torch.arange(words, device=targets.pairs.device)
    is_attribute = word_ids.view(1, 1, -1) == attribute_index.unsqueeze(-1)
    return candidate & ~bound_to_attribute & ~is_attribute & targets.pair_mask.unsqueeze(-1)

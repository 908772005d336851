"""Decoded samples -> one :class:`~llm4gen.datamodules.batch.Batch`, and what the data side adds for the entity
loss (parsed entities, aligned targets) in the worker that made the batch."""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch

from llm4gen.configs.choices import SHAPES_GRAMMAR
from llm4gen.datamodules.batch import Batch
from llm4gen.datamodules.cache_codec import JSON_MEMBERS
from llm4gen.datamodules.entity_targets import EntityTargetBuilder
from llm4gen.losses.entity import EntityTargets
from llm4gen.losses.entity_parser import EntityParser, groups_to_json
from llm4gen.shapes.world import entity_groups



def pad_llm_features(features: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Unpadded per-sample ``(tokens_i, dim)`` -> ``(batch, max_tokens, dim)`` zeros-padded + bool mask."""
    dims = {f.shape[1] for f in features}
    if len(dims) != 1:
        raise ValueError(f"llm_features in one batch have different widths {sorted(dims)}; the cache mixes LLMs")
    longest = max(f.shape[0] for f in features)
    padded = features[0].new_zeros((len(features), longest, dims.pop()))  # (batch, tokens, dim)
    mask = torch.zeros((len(features), longest), dtype=torch.bool)  # (batch, tokens)
    for i, f in enumerate(features):
        padded[i, : f.shape[0]] = f
        mask[i, : f.shape[0]] = True
    return padded, mask


def collate_samples(samples: Sequence[Mapping[str, Any]]) -> Batch:
    """Decoded samples -> one :class:`~llm4gen.datamodules.batch.Batch`."""
    first = samples[0]
    fields: dict[str, Any] = {"keys": [s["key"] for s in samples], "captions": [s["caption"] for s in samples]}
    if "pixel_values" in first:
        # np.stack, not torch.stack: torch's parallel copy wakes its intra-op thread pool, which with
        # num_workers=0 fights the training step for the cores (measured 100x slower on 2 busy cores).
        fields["pixel_values"] = torch.from_numpy(np.stack([s["pixel_values"].numpy() for s in samples]))
    if "latent_moments" in first:
        shapes = {tuple(s["latent_moments"].shape) for s in samples}
        if len(shapes) != 1:
            raise ValueError(f"latents in one batch have different shapes {sorted(shapes)}; cache one resolution")
        fields["latent_moments"] = torch.stack([s["latent_moments"] for s in samples])
    if "llm_features" in first:
        fields["llm_features"], fields["llm_mask"] = pad_llm_features([s["llm_features"] for s in samples])
    for name in ("clip_features", "clip_pooled"):
        if name in first:
            fields[name] = torch.stack([s[name] for s in samples])
    for name in ("original_size", "crop_top_left"):  # SDXL's add_time_ids read them
        if name in first:
            fields[name] = torch.tensor([s[name] for s in samples], dtype=torch.long)
    for name in JSON_MEMBERS:
        if name in first:
            fields[name] = [s[name] for s in samples]
    return Batch(**fields)


_PARSERS: dict[str, Any] = {}


def targets_of_batch(builder: EntityTargetBuilder, batch: Batch) -> EntityTargets:
    """The batch's entity-loss targets: from its cached positions (no tokenizer runs) or aligned now."""
    cached = batch.entity_positions
    if cached is None:
        return builder(batch.captions, batch.entities)
    lengths = {c["num_tokens"] for c in cached}
    if len(lengths) != 1:
        raise ValueError(f"cached entity positions of one batch index different context lengths {sorted(lengths)}")
    return builder(batch.captions, batch.entities, [c["positions"] for c in cached], lengths.pop())


def with_entities(batch: Batch, parser: Optional[str], targets: Optional[EntityTargetBuilder]) -> Batch:
    """What the data side adds for the entity loss, in the worker that made the batch: each caption's entity
    groups (unless cached), then the loss's targets (from cached alignments when the batch has them). A
    hand-made batch gets them through this function too."""
    if parser and batch.entities is None:
        batch.entities = parse_entities(parser, batch.captions)
    if targets is not None and batch.entities is not None:
        batch.entity_targets = targets_of_batch(targets, batch)
        batch.entity_positions = None  # read into the targets
    return batch


def entity_parser(model: str) -> EntityParser:
    """The parser ``model.objective.entity_parser`` names: a spaCy pipeline, or ``"shapes"``, the shapes
    benchmark's own caption grammar (shapes/world.py), exact on its captions."""
    return EntityParser(grammar=entity_groups) if model == SHAPES_GRAMMAR else EntityParser(model)


def parse_entities(model: str, captions: Sequence[str]) -> list[list[dict]]:
    """Entity groups of each caption as JSON, parsed in the worker that made the batch (one spaCy
    pipeline per process, loaded on first use): parsing never runs inside the training step."""
    if model not in _PARSERS:
        _PARSERS[model] = entity_parser(model)
    return [groups_to_json(groups) for groups in _PARSERS[model].parse_many(captions)]



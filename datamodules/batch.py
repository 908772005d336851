"""The training batch: what the datamodule's collate produces and the LightningModule consumes.

Every field is named, typed and shaped here; the optional ones are None when the data does not carry them.
A training batch holds pixels or cached VAE moments (conditioning alone needs only captions), and optionally cached text features, SDXL's size
conditioning, parsed entities and the entity loss's targets. Entity targets are built on the data side only
(``datamodules/entity_targets.py``, in the worker that made the batch): the model never tokenizes a caption
for the loss.

Lightning moves a batch to the device field by field (its ``apply_to_collection`` reads dataclasses), and
the DataLoader pins it through :meth:`Batch.pin_memory`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

import torch

from llm4gen.losses.entity import EntityTargets


@dataclass
class Batch:
    captions: list[str]                               # (batch,) the text each image was trained with
    keys: list[str] = dataclasses.field(default_factory=list)  # (batch,) sample keys in the shards
    pixel_values: Optional[torch.Tensor] = None       # (batch, 3, H, W) float in [-1, 1]
    latent_moments: Optional[torch.Tensor] = None     # (batch, 2 * C, h, w) cached VAE mean and log-variance
    llm_features: Optional[torch.Tensor] = None       # (batch, L, llm_dim) cached, zero past each caption
    llm_mask: Optional[torch.Tensor] = None           # (batch, L) bool, True at a caption's tokens
    clip_features: Optional[torch.Tensor] = None      # (batch, 77, clip_dim) cached CLIP hidden states
    clip_pooled: Optional[torch.Tensor] = None        # (batch, pooled_dim) cached pooled embedding (SDXL)
    original_size: Optional[torch.Tensor] = None      # (batch, 2) long, (height, width) before resize (SDXL)
    crop_top_left: Optional[torch.Tensor] = None      # (batch, 2) long, the crop's corner (SDXL)
    entities: Optional[list[list[dict]]] = None       # (batch,) parsed entity groups, as JSON
    entity_positions: Optional[list[dict]] = None     # (batch,) cached word -> token alignments, read by the data side
    entity_targets: Optional[EntityTargets] = None    # the entity loss's targets
    skipped: Optional[torch.Tensor] = None            # (skip reasons,) long: samples skipped since the last batch
    position: Optional[dict[str, Any]] = None         # where the stream stood (datamodule bookkeeping)

    def __post_init__(self) -> None:
        if (self.llm_features is None) != (self.llm_mask is None):
            raise ValueError("cached llm_features come with their llm_mask (batch, L); got one without the other")
        n = len(self.captions)
        for name in ("pixel_values", "latent_moments", "llm_features", "clip_features", "clip_pooled",
                     "original_size", "crop_top_left"):
            value = getattr(self, name)
            if value is not None and value.shape[0] != n:
                raise ValueError(f"batch field {name} has {value.shape[0]} rows for {n} captions")

    def __len__(self) -> int:
        return len(self.captions)

    def pin_memory(self) -> "Batch":
        """The DataLoader's ``pin_memory=True`` calls this: every tensor field pinned."""
        return dataclasses.replace(self, **{f.name: v.pin_memory() for f in dataclasses.fields(self)
                                            if isinstance(v := getattr(self, f.name), torch.Tensor)})

    def for_model(self) -> "Batch":
        """The batch without the datamodule's bookkeeping (skip counts, stream position)."""
        return dataclasses.replace(self, skipped=None, position=None)

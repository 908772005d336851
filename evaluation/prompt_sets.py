"""The fixed evaluation prompt sets of the shapes benchmark.

Six sets: ``seen_1``, ``seen_2``, ``seen_3`` (only colour-shape combinations that training data
contains) and ``heldout_1``, ``heldout_2``, ``heldout_3`` (every scene holds at least one combination
from ``datamodules.shapes.HELD_OUT``), by object count. Record ``i`` of a set depends only on the set's
name and ``i`` (so ``prompt_set(name, 10)`` is the first 10 of the full set), cycles through the
phrasings that fit its object count, and carries the sampling seed an image for it is drawn with.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Optional

from datamodules.shapes import Scene, caption, phrasings_for, sample_scene

PROMPT_SETS: tuple[str, ...] = ("seen_1", "seen_2", "seen_3", "heldout_1", "heldout_2", "heldout_3")
SET_SIZE = 48           # records in a full set
SEED_BASE = 10_000      # image seeds: SEED_BASE * (set index + 1) + record index


@dataclass(frozen=True)
class PromptRecord:
    id: str                 # "<set>-<index:03d>"
    set: str
    text: str
    scene: Scene            # with positions: the ground truth renders from it
    seed: int               # the sampling seed of this record's image
    split: str              # seen | heldout
    n_objects: int
    phrasing: str

    def to_dict(self) -> dict:
        return {"id": self.id, "set": self.set, "text": self.text, "scene": self.scene.to_dict(),
                "seed": self.seed, "split": self.split, "n_objects": self.n_objects, "phrasing": self.phrasing}

    @classmethod
    def from_dict(cls, data: dict) -> "PromptRecord":
        return cls(data["id"], data["set"], data["text"], Scene.from_dict(data["scene"]), data["seed"],
                   data["split"], data["n_objects"], data["phrasing"])


def prompt_set(name: str, n: Optional[int] = None) -> list[PromptRecord]:
    """The first ``n`` (default ``SET_SIZE``) records of prompt set ``name``."""
    if name not in PROMPT_SETS:
        raise ValueError(f"unknown prompt set {name!r}; expected one of {PROMPT_SETS}")
    n = SET_SIZE if n is None else n
    if n < 1:
        raise ValueError(f"a prompt set needs at least 1 record, got n={n}")
    split, count = name.rsplit("_", 1)
    n_objects = int(count)
    phrasings = phrasings_for(n_objects)
    records = []
    for i in range(n):
        scene = sample_scene(random.Random(f"prompt-set/{name}/{i}"), split, n_objects)
        phrasing = phrasings[i % len(phrasings)]
        records.append(PromptRecord(
            id=f"{name}-{i:03d}", set=name, text=caption(scene, phrasing), scene=scene,
            seed=SEED_BASE * (PROMPT_SETS.index(name) + 1) + i, split=split, n_objects=n_objects,
            phrasing=phrasing))
    return records

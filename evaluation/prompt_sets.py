"""The fixed evaluation prompt sets of the shapes benchmark.

Six legacy sets (``PROMPT_SETS``; what "all" means): ``seen_1``, ``seen_2``, ``seen_3`` (only
colour-shape combinations that training data contains) and ``heldout_1``, ``heldout_2``, ``heldout_3``
(every scene holds at least one combination from ``shapes.world.HELD_OUT``), by object count, 48
records each. Record ``i`` of a set depends only on the set's name and ``i`` (so ``prompt_set(name, 10)``
is the first 10 of the full set), cycles through the short phrasings that fit its object count, and
carries the sampling seed an image for it is drawn with.

Four evidence sets (``EVIDENCE_SETS``), seen-split scenes drawn apart from the legacy ones:

- ``phrased_2``, ``phrased_3``: 16 scenes of 2 / 3 objects, each in every short phrasing (``list``,
  ``colored``, ``relative``, ``beside``, ``dense``: 80 records); the records of one scene are adjacent
  and share its ``scene_id``, so the phrasings can be compared on the same scenes.
- ``verbose_2``, ``verbose_3``: 64 scenes of 2 / 3 objects in the ``verbose`` phrasing (long
  descriptions that run past CLIP's 77 tokens); each record carries its ``mentions``
  (``losses.token_alignment.mentions_in_clip_window`` with the embedded CLIP tokenizer): the objects in text order,
  their spans, ``last_clip_token`` and ``in_clip_window``, so a score can be split into objects CLIP
  sees and objects only the LLM sees.

Every record has its own seed (``SEED_BASE * (set index in ALL_PROMPT_SETS + 1) + record index``) and a
``scene_id`` (``"<set>/<scene index>"``, the scene's sampling key) shared by every phrasing of one scene.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Optional

from llm4gen.datamodules.synthetic import clip_tokenizer
from llm4gen.datamodules.synthetic import mentions_in_clip_window
from llm4gen.shapes.world import (
    VERBOSE,
    Scene,
    caption,
    phrasings_for,
    sample_scene,
)

PROMPT_SETS: tuple[str, ...] = ("seen_1", "seen_2", "seen_3", "heldout_1", "heldout_2", "heldout_3")
EVIDENCE_SETS: tuple[str, ...] = ("phrased_2", "phrased_3", "verbose_2", "verbose_3")
ALL_PROMPT_SETS: tuple[str, ...] = PROMPT_SETS + EVIDENCE_SETS
SET_SIZE = 48           # records in a full legacy set
PHRASED_SCENES = 16     # scenes of a phrased_* set (each in every short phrasing)
VERBOSE_SCENES = 64     # scenes (= records) of a verbose_* set
SEED_BASE = 10_000      # image seeds: SEED_BASE * (index in ALL_PROMPT_SETS + 1) + record index


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
    scene_id: str = ""      # "<set>/<scene index>": shared by every record (phrasing) of one scene
    mentions: Optional[list] = None  # verbose records: mentions_in_clip_window(text, CLIP tokenizer)

    def to_dict(self) -> dict:
        data = {"id": self.id, "set": self.set, "text": self.text, "scene": self.scene.to_dict(),
                "seed": self.seed, "split": self.split, "n_objects": self.n_objects, "phrasing": self.phrasing,
                "scene_id": self.scene_id}
        if self.mentions is not None:
            data["mentions"] = self.mentions
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "PromptRecord":
        # records written before scene_id existed held one scene each: their id identifies it
        return cls(data["id"], data["set"], data["text"], Scene.from_dict(data["scene"]), data["seed"],
                   data["split"], data["n_objects"], data["phrasing"], data.get("scene_id", data["id"]),
                   data.get("mentions"))


def set_size(name: str) -> int:
    """The records of the full set ``name``."""
    if name in PROMPT_SETS:
        return SET_SIZE
    if name.startswith("phrased_"):
        return PHRASED_SCENES * len(phrasings_for(int(name.rsplit("_", 1)[1])))
    if name.startswith("verbose_"):
        return VERBOSE_SCENES
    raise ValueError(f"unknown prompt set {name!r}; expected one of {ALL_PROMPT_SETS}")


DRAW_SEED_STRIDE = 1_000  # a fresh draw's image seeds: the set's own plus draw * this (sets hold < 1000 records)


def prompt_set(name: str, n: Optional[int] = None, draw: int = 0) -> list[PromptRecord]:
    """The first ``n`` (default: the full set, ``set_size(name)``) records of prompt set ``name``. ``draw`` > 0:
    the same set's recipe (object counts, split, phrasings) over freshly drawn scenes and image seeds, for a
    replication on scenes no earlier evaluation saw; draw 0 is the set as it always was."""
    if name not in ALL_PROMPT_SETS:
        raise ValueError(f"unknown prompt set {name!r}; expected one of {ALL_PROMPT_SETS}")
    n = set_size(name) if n is None else n
    if n < 1:
        raise ValueError(f"a prompt set needs at least 1 record, got n={n}")
    kind, count = name.rsplit("_", 1)
    n_objects = int(count)
    split = "seen" if name in EVIDENCE_SETS else kind
    if draw < 0:
        raise ValueError(f"draw must be 0 (the fixed set) or a positive draw number, got {draw}")
    seed_base = SEED_BASE * (ALL_PROMPT_SETS.index(name) + 1) + DRAW_SEED_STRIDE * draw
    key = f"prompt-set/{name}" + (f"/draw{draw}" if draw else "")
    phrasings = phrasings_for(n_objects)
    tokenizer = None
    if kind == "verbose":
        tokenizer = clip_tokenizer()
    records = []
    for i in range(n):
        if kind == "phrased":   # every short phrasing of one scene, adjacent
            scene_index, phrasing = divmod(i, len(phrasings))[0], phrasings[i % len(phrasings)]
        elif kind == "verbose":
            scene_index, phrasing = i, VERBOSE
        else:                   # a legacy set: one scene per record, the phrasings cycled
            scene_index, phrasing = i, phrasings[i % len(phrasings)]
        scene = sample_scene(random.Random(f"{key}/{scene_index}"), split, n_objects)
        text = caption(scene, phrasing)
        records.append(PromptRecord(
            id=f"{name}-{i:03d}", set=name, text=text, scene=scene, seed=seed_base + i, split=split,
            n_objects=n_objects, phrasing=phrasing, scene_id=f"{key.removeprefix('prompt-set/')}/{scene_index}",
            mentions=mentions_in_clip_window(text, tokenizer) if tokenizer is not None else None))
    return records

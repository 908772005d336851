"""Which caption a sample trains on.

Without ``data.caption_mix``: the first of ``data.caption_keys`` the sample holds (``transforms.extract_caption``).
With it (``{dense.txt: 0.5, txt: 0.5}``): a draw per sample over the mix's keys the sample holds, their weights
renormalised over those present, so a sample with no dense caption trains on its original and one with both
gets each half the time. The draw is a pure function of (seed, epoch, sample key), like the sample's crop and
flip (``transforms.sample_rng``) but from its own random stream, so a mix changes no augmentation, the choice
differs from epoch to epoch, and a resumed run draws exactly what an uninterrupted one drew.
"""

from __future__ import annotations

import random
from typing import Mapping, Optional, Sequence

from llm4gen.configs.schema import DataConfig
from llm4gen.datamodules.transforms import SampleError, extract_caption


def training_caption(raw: Mapping[str, object], data: DataConfig, seed: int, epoch: int) -> tuple[Optional[str], str]:
    """(the caption key drawn, the caption) of a raw sample; the key is None without ``data.caption_mix``.
    Raises ``SampleError`` (missing_caption / empty_caption) when the sample holds none of the keys."""
    if not data.caption_mix:
        return None, extract_caption(raw, data.caption_keys)
    return draw_caption(raw, data.caption_mix, seed, epoch)


def draw_caption(raw: Mapping[str, object], mix: Mapping[str, float], seed: int, epoch: int) -> tuple[str, str]:
    """One draw of ``mix`` (caption key -> weight) over the keys ``raw`` holds with text; see the module doc."""
    present = {key: text for key, text in captions_held(raw, list(mix)).items() if mix[key] > 0}
    if not present:
        raise SampleError("missing_caption", f"the sample holds only caption_mix keys weighted 0 "
                                             f"({[k for k in mix if mix[k] <= 0]})")
    key = weighted_choice(list(present), [float(mix[k]) for k in present], caption_draw(seed, epoch, str(raw["__key__"])))
    return key, present[key]


def captions_held(raw: Mapping[str, object], keys: Sequence[str]) -> dict[str, str]:
    """The caption under each of ``keys`` the sample holds with text, in ``keys`` order (what a feature cache
    encodes for a mix). Raises ``SampleError``: empty_caption when the keys present are all blank, else
    missing_caption, when it holds none."""
    held: dict[str, str] = {}
    blank = False
    for key in keys:
        try:
            held[key] = extract_caption(raw, [key])
        except SampleError as error:
            blank = blank or error.reason == "empty_caption"
    if not held:
        raise SampleError("empty_caption" if blank else "missing_caption", f"none of the caption keys {list(keys)} "
                                                                           f"holds text")
    return held


def caption_draw(seed: int, epoch: int, sample_key: str) -> float:
    """The uniform number in [0, 1) that picks a sample's caption in one epoch."""
    return random.Random(f"caption/{seed}/{epoch}/{sample_key}").random()


def weighted_choice(keys: Sequence[str], weights: Sequence[float], u: float) -> str:
    """The key whose share of ``sum(weights)`` covers ``u`` in [0, 1), shares laid out in ``keys`` order."""
    total = sum(weights)
    if not keys or total <= 0:
        raise ValueError(f"weighted_choice needs keys with a positive total weight, got {dict(zip(keys, weights))}")
    bound = 0.0
    for key, weight in zip(keys, weights):
        bound += weight / total
        if u < bound:
            return key
    return keys[-1]  # u within rounding of 1

"""Paired comparisons of two arms on the same (prompt, noise) draws, with scene-clustered bootstrap CIs.

Two arms of the shapes experiment sample every prompt with the same noise seed, so their outcomes on
one object of one image pair up; a paired difference removes the noise both share (per-image
correlations of 0.6-0.8 between arms). Outcomes are not independent, though: one scene is drawn with
several seeds and, in the phrased sets, in several phrasings, so the unit of resampling is the scene.

    observations = [Observation(key=(seed, set, prompt, object), cluster=scene_id, seed=seed, value=1.0), ...]
    paired_difference(arm_d, arm_b) -> Difference(mean, low, high, per_seed, n, clusters)

All pure: the bootstrap draws from its own seeded generator, so the same inputs give the same interval.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Hashable, Sequence

import numpy as np

BOOTSTRAP_SAMPLES = 2000
CONFIDENCE = 0.95


@dataclass(frozen=True)
class Observation:
    key: Hashable        # what pairs two arms' observations: (seed, set, prompt index, object index)
    cluster: Hashable    # the resampling unit (the scene)
    seed: int            # the training seed (and noise seed) it belongs to
    value: float         # e.g. 1.0 if the object is drawn bound, else 0.0


@dataclass
class Difference:
    mean: float                       # mean over the paired observations of (a - b)
    low: float                        # percentile bootstrap CI over clusters
    high: float
    per_seed: dict[int, float] = field(default_factory=dict)  # the mean difference within each seed
    n: int = 0                        # paired observations
    clusters: int = 0

    def to_dict(self) -> dict:
        return {"mean": self.mean, "low": self.low, "high": self.high, "n": self.n, "clusters": self.clusters,
                "per_seed": {str(k): v for k, v in self.per_seed.items()}}

    @classmethod
    def from_dict(cls, d: dict) -> "Difference":
        """The inverse of :meth:`to_dict` (a report's results.json)."""
        return cls(d["mean"], d["low"], d["high"], {int(k): v for k, v in d["per_seed"].items()}, d["n"], d["clusters"])

    @property
    def positive_in_every_seed(self) -> bool:
        return bool(self.per_seed) and all(v > 0 for v in self.per_seed.values())


def cluster_bootstrap(values: Sequence[float], clusters: Sequence[Hashable], samples: int = BOOTSTRAP_SAMPLES,
                      confidence: float = CONFIDENCE, seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high): the mean of ``values`` and a percentile bootstrap interval that resamples whole
    clusters with replacement (each resample's statistic: the mean over the observations it holds)."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        raise ValueError("cluster_bootstrap needs at least one observation")
    labels, index = np.unique(np.asarray([hash_label(c) for c in clusters]), return_inverse=True)
    sums = np.bincount(index, weights=values, minlength=len(labels))
    counts = np.bincount(index, minlength=len(labels)).astype(np.float64)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(labels), size=(samples, len(labels)))
    statistics = sums[draws].sum(1) / counts[draws].sum(1)
    tail = (1 - confidence) / 2
    low, high = np.quantile(statistics, [tail, 1 - tail])
    return float(values.mean()), float(low), float(high)


def hash_label(cluster: Hashable) -> str:
    """A sortable label for any hashable cluster id (np.unique needs one type)."""
    return repr(cluster)


def paired_difference(a: Sequence[Observation], b: Sequence[Observation], samples: int = BOOTSTRAP_SAMPLES,
                      seed: int = 0) -> Difference:
    """``a - b`` over the observations both arms hold (matched by key); raises ValueError when an
    observation of one arm has no partner in the other (the arms were not sampled on the same draws)."""
    b_by_key = {o.key: o for o in b}
    if len(b_by_key) != len(b):
        raise ValueError("arm b holds two observations with one key")
    missing = [o.key for o in a if o.key not in b_by_key]
    if missing or len(a) != len(b):
        raise ValueError(f"the arms do not pair: {len(a)} vs {len(b)} observations, e.g. {missing[:3]} "
                         f"only in the first; compare arms sampled on the same prompts and seeds")
    differences = [o.value - b_by_key[o.key].value for o in a]
    mean, low, high = cluster_bootstrap(differences, [o.cluster for o in a], samples, seed=seed)
    per_seed: dict[int, list[float]] = {}
    for o, d in zip(a, differences):
        per_seed.setdefault(o.seed, []).append(d)
    return Difference(mean, low, high, {s: float(np.mean(v)) for s, v in sorted(per_seed.items())},
                      n=len(differences), clusters=len({o.cluster for o in a}))

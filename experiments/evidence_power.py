"""How many evaluation scenes a paired difference needs for a given CI half-width, from an earlier study's
per-object outcomes (protocol v4's "Evaluation sets"; ``python -m llm4gen.cli.shapes_evidence size``).

A difference is a ratio over scenes: mean = sum_c S_c / sum_c n_c, with S_c the summed per-object differences of
scene c (every seed of it) and n_c its objects. Linearised, Var(mean) = sum_c u_c^2 / N^2 with u_c = S_c - mean n_c
and N = sum_c n_c; drawing K' scenes from the same recipe instead of K scales it by K / K', so the 95% half-width
is 1.96 * sqrt(Var K / K'). Scenes of a set that hold no object of the subset (a verbose scene with every object
inside CLIP's window) count in K with u_c = 0: they are drawn, and cost, like the others.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from llm4gen.evaluation.prompt_sets import prompt_set
from llm4gen.experiments.evidence_rules import SUBSETS, compare, select
from llm4gen.experiments.evidence_tasks import ObjectRecord

Z95 = 1.959964


@dataclass(frozen=True)
class SceneVariance:
    """What one study says of ``a - b`` on a subset: the mean, the scenes drawn, the linearised variance."""
    mean: float
    scenes: int          # scenes the subset's sets drew (K)
    variance: float      # Var(mean) at those scenes
    bootstrap_half_width: float  # the study's own percentile bootstrap, for comparison

    def half_width(self, scenes: int) -> float:
        """The 95% half-width predicted for ``scenes`` scenes of the same recipe."""
        return Z95 * math.sqrt(self.variance * self.scenes / scenes)

    def scenes_for(self, half_width: float) -> int:
        """The fewest scenes whose predicted half-width is at most ``half_width``."""
        return math.ceil(self.scenes * self.variance * (Z95 / half_width) ** 2)


def scene_variance(records: list[ObjectRecord], a: str, b: str, subset: str) -> SceneVariance:
    """``a - b`` on ``subset`` (share bound), paired per object, its variance over scenes."""
    first = {(r.seed, r.set, r.prompt, r.object): r for r in select(records, a, subset)}
    second = select(records, b, subset)
    if not first or not second:
        raise ValueError(f"the records hold no {a} - {b} pair on {subset}")
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for r in second:
        partner = first[(r.seed, r.set, r.prompt, r.object)]
        sums[r.scene] = sums.get(r.scene, 0.0) + (partner.category == "bound") - (r.category == "bound")
        counts[r.scene] = counts.get(r.scene, 0) + 1
    total = sum(counts.values())
    mean = sum(sums.values()) / total
    variance = sum((sums[c] - mean * counts[c]) ** 2 for c in sums) / total ** 2
    sets = {r.set for r in second}
    drawn = len({r.scene for r in records if r.arm == b and r.set in sets})  # scenes with none of the subset too
    diff = compare(records, a, b, subset)
    return SceneVariance(mean, drawn, variance, (diff.high - diff.low) / 2)


def size_table(studies: dict[str, list[ObjectRecord]], comparisons: list[tuple[str, str, str]],
               planned: dict[str, int], target: float = 0.04) -> str:
    """A markdown table: per comparison and study, the mean, the half-width at the study's scenes (predicted and
    bootstrapped), the scenes a ``target`` half-width needs and the half-width predicted at ``planned[subset]``."""
    lines = [f"| difference | study | mean | scenes | half-width (predicted / bootstrap) | scenes for <= {target} | "
             f"planned scenes | predicted half-width there |", "|---|---|---|---|---|---|---|---|"]
    for a, b, subset in comparisons:
        for study, records in studies.items():
            try:
                v = scene_variance(records, a, b, subset)
            except ValueError:
                continue
            lines.append(f"| ({a}) - ({b}), {subset} | {study} | {v.mean:+.3f} | {v.scenes} | {v.half_width(v.scenes):.4f} / "
                         f"{v.bootstrap_half_width:.4f} | {v.scenes_for(target)} | {planned.get(subset, '-')} | "
                         + (f"{v.half_width(planned[subset]):.4f}" if subset in planned else "-") + " |")
    return "\n".join(lines) + "\n\nSubsets: " + "; ".join(f"`{s}`: {SUBSETS[s][0]}" for s in
                                                          dict.fromkeys(s for _, _, s in comparisons)) + "."


def planned_scenes(protocol, subsets: tuple[str, ...] = ("outside", "seen_1", "short", "post_nominal")) -> dict[str, int]:
    """Scenes the protocol's sets draw for each subset's sets (a phrased set's scenes: its records / its phrasings)."""
    def scenes(names):
        return sum(len({r.scene_id for r in prompt_set(name, protocol.set_size(name), protocol.scene_draw)})
                   for name in names)

    sets = {"outside": ("verbose_2", "verbose_3"), "inside": ("verbose_2", "verbose_3"), "seen_1": ("seen_1",),
            "short": ("phrased_2", "phrased_3"), "post_nominal": ("phrased_2", "phrased_3"),
            "pre_nominal": ("phrased_2", "phrased_3")}
    return {subset: scenes(sets[subset]) for subset in subsets}

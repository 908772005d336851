"""The shapes benchmark's exact pixel analyzer (``evaluation.shapes``, from the shapes benchmark) as a
scorer: no model to load. Each image is scored against the scene its prompt asks for
(``parse_prompt``); the set's numbers are T2I-CompBench-style means over images (``aggregate``):
``binding`` (share of prompt objects found with all their attributes), ``all_bound`` (every object
bound: the product over objects), ``exact`` (all bound, nothing extra) and the per-category
``color`` / ``shape`` / ``size`` accuracies."""

from __future__ import annotations

import importlib
from dataclasses import asdict

from evaluation.scorers import Scorer, load_images

REPORTED = ("binding", "all_bound", "exact", "color", "shape", "size", "any_correct")


class ShapesScorer(Scorer):
    name = "shapes"
    kinds = ("shapes",)

    def load(self) -> None:
        importlib.import_module("evaluation.shapes")  # pure numpy: no model to fetch

    def score_images(self, images: list, prompts: list[str]) -> dict[str, float]:
        """Means over the images whose prompt the benchmark's grammar reads (others are skipped; none
        readable gives ``{}``), plus ``parsed``: the share that was read."""
        from evaluation.shapes import aggregate, score

        scores = []
        for image, prompt in zip(images, prompts):
            try:
                scores.append(score(image, prompt))
            except ValueError:  # not a shapes prompt
                continue
        if not scores:
            return {}
        summary = aggregate(scores)
        return {**{k: summary[k] for k in REPORTED}, "parsed": len(scores) / len(prompts)}

    def score(self, prompt_set, records):
        from evaluation.shapes import aggregate, score

        per_image = [score(image, r.prompt) for image, r in zip(load_images(records), records)]
        summary = aggregate(per_image)
        details = [{k: v for k, v in asdict(s).items() if k != "detected"} for s in per_image]
        return {f"shapes_{k}": summary[k] for k in REPORTED}, details

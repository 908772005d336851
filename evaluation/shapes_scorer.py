"""The shapes benchmark's exact pixel analyzer (``evaluation.shapes``, from the shapes benchmark) as a
scorer: no model to load. Each image is scored against the scene its prompt asks for
(``parse_prompt``); the set's numbers are T2I-CompBench-style means over images (``aggregate``):
``binding`` (share of prompt objects found with all their attributes), ``all_bound`` (every object
bound: the product over objects), ``exact`` (all bound, nothing extra) and the per-category
``color`` / ``shape`` / ``size`` accuracies. A set's values (``score``) also give what became of the
prompt objects, ``classify_objects``' shares ``shapes_bound``, ``shapes_wrong_size``,
``shapes_leaked_color`` (a binding failure), ``shapes_foreign_color``, ``shapes_leaked_shape``,
``shapes_misdrawn_shape``, ``shapes_missing_object`` (summing to 1), and ``shapes_swap_rate``: pairs of
drawn objects that took each other's colour, over all drawn pairs (None, JSON null, when no image of
the set has two drawn objects). Each image's details carry its ``categories``, ``swapped_pairs`` and
``drawn_pairs``.

It scores the benchmark's own sets (``--shapes``) and a plain prompt file (``--prompts``) whose every line the
caption grammar reads (``shapes.world.parse_prompt``: "a red circle and a small blue square", any phrasing
the benchmark writes); a file with a prompt it cannot read is refused before anything is generated
(``cannot_score``), naming the lines."""

from __future__ import annotations

import importlib
from dataclasses import asdict

from llm4gen.evaluation.scorers import Scorer, load_images
from llm4gen.evaluation.shapes import OUTCOMES, aggregate, score
from llm4gen.shapes.world import parse_prompt

REPORTED = ("binding", "all_bound", "exact", "color", "shape", "size", "any_correct")
# a set's values only (``score``): the validation logs of ``score_images`` keep REPORTED, all floats
ERRORS = (*OUTCOMES, "swap_rate")


def unreadable_prompts(prompts: list[str]) -> list[int]:
    """The indices of the prompts the benchmark's caption grammar cannot read (no shape, a plural shape, ...)."""
    unreadable = []
    for i, prompt in enumerate(prompts):
        try:
            parse_prompt(prompt)
        except ValueError:
            unreadable.append(i)
    return unreadable


class ShapesScorer(Scorer):
    name = "shapes"
    kinds = ("shapes", "prompts")

    def cannot_score(self, prompt_set) -> str | None:
        if prompt_set.kind == "shapes":
            return None
        if prompt_set.kind != "prompts":
            return (f"the shapes analyzer scores shapes-world captions (--shapes sets, or a --prompts file of them), "
                    f"not a {prompt_set.kind} set; use that set's own scorer")
        unreadable = unreadable_prompts(prompt_set.prompts)
        if not unreadable:
            return None
        shown = "; ".join(f"line {i + 1}: {prompt_set.prompts[i]!r}" for i in unreadable[:3])
        return (f"{len(unreadable)} of its {len(prompt_set.prompts)} prompts are not shapes-world captions the "
                f"caption grammar reads ({shown}{'; ...' if len(unreadable) > 3 else ''}); the analyzer scores prompts "
                f"like 'a red circle and a small blue square' (shapes.world.parse_prompt): fix or drop those lines, "
                f"or score the file with clip_score or blip_vqa")

    def load(self) -> None:
        importlib.import_module("llm4gen.evaluation.shapes")  # pure numpy: no model to fetch

    def score_images(self, images: list, prompts: list[str]) -> dict[str, float]:
        """Means over the images whose prompt the benchmark's grammar reads (others are skipped; none
        readable gives ``{}``), plus ``parsed``: the share that was read."""
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

    def verdicts(self, images: list, prompts: list[str]) -> list[str]:
        """Per image, what the analyzer found: "bound 1/2" (objects drawn with every attribute right, of
        those asked for), "" for a prompt the grammar cannot read."""
        marks = []
        for image, prompt in zip(images, prompts):
            try:
                result = score(image, prompt)
            except ValueError:
                marks.append("")
                continue
            marks.append(f"bound {round(result.binding * result.n_objects)}/{result.n_objects}")
        return marks

    def score(self, prompt_set, records):
        per_image = [score(image, r.prompt) for image, r in zip(load_images(records), records)]
        summary = aggregate(per_image)
        details = [{k: v for k, v in asdict(s).items() if k != "detected"} for s in per_image]
        return {f"shapes_{k}": summary[k] for k in (*REPORTED, *ERRORS)}, details

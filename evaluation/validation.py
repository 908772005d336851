"""Cheap scores of the validation samples during training, logged beside the loss.

``ValidationImages`` (lightning_modules/callbacks.py) hands each validation grid's images and prompts
here; the scores go to the logger (``logs/metrics.csv``) as ``val/<metric>`` at that step and into
``trainer.callback_metrics``, so the run's ``final_metrics.json`` and a sweep's ``summary.csv``
carry the last ones. Configured by ``validation.metrics`` (``shapes``: the shapes analyzer;
``clip_score``: CLIPScore with ``validation.clip_model``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from llm4gen.configs.choices import VALIDATION_METRICS
from llm4gen.evaluation.scorers import DEFAULT_CLIP, ClipScoreScorer
from llm4gen.evaluation.shapes_scorer import ShapesScorer

# The scores a validation line prints, in this order, with their short names.
HEADLINE = (("shapes_binding", "binding"), ("shapes_any_correct", "one object right"), ("clip_score", "CLIPScore"))


def score_line(scores: dict[str, float], sets=(("val/", ""), ("val/seen_", "seen: "))) -> str:
    """``val/...`` scores in one line: "binding 0.344, one object right 0.625; seen: binding 0.500, ..."."""
    parts = []
    for prefix, label in sets:
        values = [f"{name} {scores[prefix + key]:.3f}" for key, name in HEADLINE if prefix + key in scores]
        if values:
            parts.append(label + ", ".join(values))
    return "; ".join(parts)


def cost_line(scores: dict[str, float], base: dict[str, float], prefix: str) -> str:
    """The connector at its initial weights against the base alone on one prompt set: "binding 0.500 vs the
    base's 0.531 (-0.031), ..." for each headline score both have under ``prefix``."""
    values = [f"{name} {scores[prefix + key]:.3f} vs the base's {base[prefix + key]:.3f} "
              f"({scores[prefix + key] - base[prefix + key]:+.3f})"
              for key, name in HEADLINE if prefix + key in scores and prefix + key in base]
    return ", ".join(values)


class ValidationScorer:
    def __init__(self, metrics: Sequence[str] = (), clip_model: str | None = None):
        unknown = [m for m in metrics if m not in VALIDATION_METRICS]
        if unknown:
            raise ValueError(f"validation.metrics has {unknown}; expected any of {list(VALIDATION_METRICS)}")
        self.metrics, self.clip_model = list(metrics), clip_model
        self.clip = None
        self.shapes = None

    def load(self) -> None:
        """Loads what the metrics need (at fit start: a missing CLIP fails before training)."""
        if "clip_score" in self.metrics and self.clip is None:
            self.clip = ClipScoreScorer(self.clip_model or DEFAULT_CLIP)
            self.clip.load()
        if "shapes" in self.metrics and self.shapes is None:
            self.shapes = ShapesScorer()
            self.shapes.load()

    def __call__(self, images: list, prompts: list[str]) -> dict[str, float]:
        if not self.metrics:
            return {}
        self.load()
        scores: dict[str, float] = {}
        if self.clip is not None:
            scores["val/clip_score"] = self.clip.score_images(images, list(prompts))[0]
        if self.shapes is not None:
            scores.update({f"val/shapes_{k}": v for k, v in self.shapes.score_images(images, list(prompts)).items()})
        return scores

    def marks(self, images: list, prompts: list[str]) -> list[str] | None:
        """A short per-image verdict for the grid (the shapes analyzer's), or None without one."""
        if self.shapes is None:
            return None
        marks = self.shapes.verdicts(images, list(prompts))
        return marks if any(marks) else None

    @staticmethod
    def log_scores(trainer, scores: dict[str, float]) -> None:
        """To the logger at the trainer's step and into ``trainer.callback_metrics``."""
        if scores:
            if trainer.logger is not None:
                trainer.logger.log_metrics(scores, step=trainer.global_step)
            trainer.callback_metrics.update({k: torch.tensor(float(v)) for k, v in scores.items()})

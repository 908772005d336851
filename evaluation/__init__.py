"""Evaluation: the compositional shapes benchmark's exact analyzer and its fixed prompt sets."""

from datamodules.shapes import Scene, ShapeObject, parse_prompt
from evaluation.prompt_sets import PROMPT_SETS, PromptRecord, prompt_set
from evaluation.shapes import DetectedObject, ImageScore, aggregate, analyze, score, score_objects

__all__ = [
    "PROMPT_SETS", "DetectedObject", "ImageScore", "PromptRecord", "Scene", "ShapeObject", "aggregate",
    "analyze", "parse_prompt", "prompt_set", "score", "score_objects",
]

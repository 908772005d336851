"""Evaluation: the compositional shapes benchmark's exact analyzer and its fixed prompt sets."""

from llm4gen.evaluation.prompt_sets import PROMPT_SETS, PromptRecord, prompt_set
from llm4gen.evaluation.shapes import (
    DetectedObject,
    ImageScore,
    aggregate,
    analyze,
    score,
    score_objects,
)
from llm4gen.shapes.world import Scene, ShapeObject, parse_prompt

__all__ = [
    "PROMPT_SETS", "DetectedObject", "ImageScore", "PromptRecord", "Scene", "ShapeObject", "aggregate",
    "analyze", "parse_prompt", "prompt_set", "score", "score_objects",
]

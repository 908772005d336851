"""The shapes benchmark's files: ground truth and prompt lists for the prompt sets, and the scores of a folder
of images (its command line: ``python -m llm4gen.cli.shapes_benchmark``).

``score_directory`` reads DIR/prompts.jsonl (one {"file", "text", "set"?} per image) and aggregates per set.
"""

from __future__ import annotations

import json
import os
from typing import Optional

from PIL import Image

from llm4gen.evaluation.prompt_sets import PROMPT_SETS, prompt_set
from llm4gen.evaluation.shapes import ImageScore, aggregate, score
from llm4gen.shapes.world import render_scene

TABLE_METRICS = ("binding", "all_bound", "exact", "color", "shape", "size", "missing", "extra")


def render(directory: str, resolution: int = 32, per_set: Optional[int] = None, sets=None) -> str:
    """Writes each record's ground-truth image and DIR/prompts.jsonl; returns the jsonl path."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "prompts.jsonl")
    with open(path, "w") as handle:
        for name in sets or PROMPT_SETS:
            for record in prompt_set(name, per_set):
                file = f"{record.id}.png"
                render_scene(record.scene, resolution).save(os.path.join(directory, file))
                handle.write(json.dumps({"file": file, **record.to_dict()}) + "\n")
    return path


def write_prompt_files(directory: str, per_set: Optional[int] = None, sets=None) -> list[str]:
    """DIR/<set>.txt (one prompt a line, in record order) and DIR/<set>.jsonl (the full records)."""
    os.makedirs(directory, exist_ok=True)
    written = []
    for name in sets or PROMPT_SETS:
        records = prompt_set(name, per_set)
        with open(os.path.join(directory, f"{name}.txt"), "w") as handle:
            handle.writelines(r.text + "\n" for r in records)
        with open(os.path.join(directory, f"{name}.jsonl"), "w") as handle:
            handle.writelines(json.dumps(r.to_dict()) + "\n" for r in records)
        written.append(os.path.join(directory, f"{name}.txt"))
    return written


def score_directory(directory: str) -> dict:
    """{set: aggregate(...)} over the images DIR/prompts.jsonl lists, scored against their text."""
    with open(os.path.join(directory, "prompts.jsonl")) as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    by_set: dict[str, list[ImageScore]] = {}
    for row in rows:
        with Image.open(os.path.join(directory, row["file"])) as image:
            by_set.setdefault(row.get("set", "all"), []).append(score(image, row["text"]))
    return {name: aggregate(group) for name, group in by_set.items()}


def markdown_table(results: dict) -> str:
    header = ["set", "images", *TABLE_METRICS]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for name, r in results.items():
        lines.append(f"| {name} | {r['n_images']} | " + " | ".join(f"{r[m]:.3f}" for m in TABLE_METRICS) + " |")
    return "\n".join(lines)

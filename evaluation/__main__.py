"""Command line of the shapes benchmark: render ground truth for the prompt sets, score a folder.

    python -m evaluation prompts DIR [--per-set N] [--sets ...]   # DIR/<set>.txt (a prompt a line) + <set>.jsonl
    python -m evaluation render DIR [--resolution 32] [--per-set N] [--sets seen_1 heldout_2 ...]
    python -m evaluation score DIR      # DIR/prompts.jsonl: one {"file", "text", "set"?} per image

``score`` prints a markdown table per prompt set and writes DIR/scores.json (``aggregate`` per set).
"""

from __future__ import annotations

import argparse
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


def main(argv: Optional[list[str]] = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m evaluation", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    render_cmd = commands.add_parser("render", help="write ground-truth images of the prompt sets and prompts.jsonl")
    render_cmd.add_argument("directory")
    render_cmd.add_argument("--resolution", type=int, default=32)
    render_cmd.add_argument("--per-set", type=int, default=None, help="records per set (default: the full set)")
    render_cmd.add_argument("--sets", nargs="*", default=None, choices=PROMPT_SETS)
    prompts_cmd = commands.add_parser("prompts", help="write each prompt set as DIR/<set>.txt and DIR/<set>.jsonl")
    prompts_cmd.add_argument("directory")
    prompts_cmd.add_argument("--per-set", type=int, default=None)
    prompts_cmd.add_argument("--sets", nargs="*", default=None, choices=PROMPT_SETS)
    score_cmd = commands.add_parser("score", help="score the images listed in DIR/prompts.jsonl against their text")
    score_cmd.add_argument("directory")
    args = parser.parse_args(argv)
    if args.command == "prompts":
        for path in write_prompt_files(args.directory, args.per_set, args.sets):
            print(path)
        return {}
    if args.command == "render":
        path = render(args.directory, args.resolution, args.per_set, args.sets)
        print(f"wrote ground truth at {args.resolution} px and {path}")
        return {}
    results = score_directory(args.directory)
    print(markdown_table(results))
    with open(os.path.join(args.directory, "scores.json"), "w") as handle:
        json.dump(results, handle, indent=2)
    print(f"wrote {os.path.join(args.directory, 'scores.json')}")
    return results


if __name__ == "__main__":
    main()

"""The shapes benchmark's command line: render ground truth for the prompt sets, score a folder.

    python -m llm4gen.cli.shapes_benchmark prompts DIR [--per-set N] [--sets ...]   # DIR/<set>.txt (a prompt a line) + <set>.jsonl
    python -m llm4gen.cli.shapes_benchmark render DIR [--resolution 32] [--per-set N] [--sets seen_1 heldout_2 ...]
    python -m llm4gen.cli.shapes_benchmark score DIR      # DIR/prompts.jsonl: one {"file", "text", "set"?} per image

``score`` prints a markdown table per prompt set and writes DIR/scores.json (``aggregate`` per set).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional

from llm4gen.evaluation.benchmark_files import markdown_table, render, score_directory, write_prompt_files
from llm4gen.evaluation.prompt_sets import PROMPT_SETS


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llm4gen.cli.shapes_benchmark", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
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
        return 0
    if args.command == "render":
        path = render(args.directory, args.resolution, args.per_set, args.sets)
        print(f"wrote ground truth at {args.resolution} px and {path}")
        return 0
    results = score_directory(args.directory)
    print(markdown_table(results))
    with open(os.path.join(args.directory, "scores.json"), "w") as handle:
        json.dump(results, handle, indent=2)
    print(f"wrote {os.path.join(args.directory, 'scores.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

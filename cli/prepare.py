"""Write WebDataset shards from a folder or table of (image, caption): `python prepare.py --help`.

The command line of tools/prepare.py (``run_prepare``); locally over worker processes, or one chunk per SLURM
array task."""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path
from typing import Sequence

from llm4gen.configs.errors import entry_point
from llm4gen.tools.prepare import DEFAULT_CHUNK_SIZE, PrepareConfig, run_prepare
from llm4gen.tools.prepare_images import DEFAULT_JPEG_QUALITY, DEFAULT_SAMPLES_PER_SHARD, ShardSettings
from llm4gen.tools.prepare_sources import PrepareError, SourceSpec, detect_source_kind


class OneParagraphParser(argparse.ArgumentParser):
    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}. Run `{self.prog} --help` for the options.\n")


def parse_bytes(text: str) -> int:
    """'500MB', '1GiB', '2000000' -> bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)\s*", text.lower())
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size; write e.g. 500MB, 1GiB or 2000000")
    number, unit = float(match.group(1)), match.group(2).rstrip("b")
    scale = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
             "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}[unit]
    return int(number * scale)


def build_parser() -> argparse.ArgumentParser:
    parser = OneParagraphParser(
        prog="prepare.py",
        description="Write WebDataset tar shards (KEY.jpg, KEY.json, KEY.txt), manifest.json and report.json "
                    "from a folder of images with .txt captions, or a CSV/TSV/JSONL/parquet table of "
                    "(image path, caption). Reruns with the same arguments resume.")
    parser.add_argument("source", nargs="?", metavar="SOURCE", help="folder of images + .txt sidecars, folder of .tar shards (img2dataset), or a .csv/.tsv/.jsonl/.parquet file")
    parser.add_argument("--output", "-o", metavar="DIR", required=True, help="output folder (shards/, chunks/, manifest.json, report.json)")
    shards = parser.add_argument_group("shards and images")
    shards.add_argument("--samples-per-shard", type=int, metavar="N", default=DEFAULT_SAMPLES_PER_SHARD,
                        help=f"samples per tar shard (default {DEFAULT_SAMPLES_PER_SHARD})")
    shards.add_argument("--max-shard-bytes", type=parse_bytes, metavar="SIZE", default=None,
                        help="also start a new shard before a file would exceed this size (e.g. 1GB)")
    shards.add_argument("--min-size", type=int, metavar="PX", default=0, help="skip images whose shorter side is below this")
    shards.add_argument("--resize-to", type=int, metavar="PX", default=None,
                        help="downscale so the shorter side is this many pixels (never upscales)")
    shards.add_argument("--jpeg-quality", type=int, metavar="Q", default=DEFAULT_JPEG_QUALITY,
                        help=f"quality of re-encoded JPEGs (default {DEFAULT_JPEG_QUALITY})")
    shards.add_argument("--reencode-jpeg", action="store_true",
                        help="re-encode every image, even upright RGB JPEGs that could be kept byte for byte")
    table = parser.add_argument_group("table sources")
    table.add_argument("--image-column", metavar="NAME", default="image")
    table.add_argument("--caption-column", metavar="NAME", default="caption")
    table.add_argument("--key-column", metavar="NAME", default=None, help="default: the image file's stem")
    table.add_argument("--image-root", metavar="DIR", default=None, help="folder relative image paths start from (default: the table's folder)")
    table.add_argument("--on-duplicate", choices=("skip", "refuse"), default="skip",
                       help="skip: later inputs with a used key are skipped as duplicate_key; refuse: stop before writing")
    work = parser.add_argument_group("parallel work and resume")
    work.add_argument("--workers", type=int, metavar="N", default=1, help="local processes, one chunk each at a time")
    work.add_argument("--num-chunks", type=int, metavar="N", default=None,
                      help="split the inputs into this many chunks (default: $SLURM_ARRAY_TASK_COUNT, else one per --chunk-size inputs)")
    work.add_argument("--chunk-size", type=int, metavar="N", default=DEFAULT_CHUNK_SIZE, help="inputs per chunk when --num-chunks is not set")
    work.add_argument("--chunk-index", type=int, metavar="I", default=None,
                      help="process only this chunk (default: from $SLURM_ARRAY_TASK_ID, else all unfinished chunks)")
    work.add_argument("--merge", action="store_true", help="only merge finished chunks into manifest.json and report.json")
    work.add_argument("--overwrite", action="store_true", help="delete an earlier output made with other settings and start over")
    work.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    return parser


def slurm_array(environ: dict) -> tuple[int, int] | None:
    """(this task's 0-based position, task count) in a SLURM job array, or None outside one.
    Arrays may start above 0 and use a step (--array=1-9:2), hence MIN and STEP."""
    if "SLURM_ARRAY_TASK_ID" not in environ:
        return None
    try:
        task = int(environ["SLURM_ARRAY_TASK_ID"])
        first = int(environ.get("SLURM_ARRAY_TASK_MIN", 0))
        step = int(environ.get("SLURM_ARRAY_TASK_STEP", 1)) or 1
        count = int(environ["SLURM_ARRAY_TASK_COUNT"])
    except (KeyError, ValueError) as err:
        raise PrepareError(f"SLURM_ARRAY_TASK_ID is set but the array variables are unusable ({err}); "
                           f"pass --chunk-index and --num-chunks explicitly") from None
    return (task - first) // step, count


def config_from_args(args: argparse.Namespace, environ: dict) -> PrepareConfig:
    """Validate the arguments together; every error says which value is wrong and what would do."""
    positive = {"--samples-per-shard": args.samples_per_shard, "--workers": args.workers,
                "--chunk-size": args.chunk_size}
    for name in ("num_chunks", "resize_to", "max_shard_bytes"):
        if getattr(args, name) is not None:
            positive["--" + name.replace("_", "-")] = getattr(args, name)
    for flag, value in positive.items():
        if value < 1:
            raise PrepareError(f"{flag} must be a positive integer, got {value}")
    if args.min_size < 0:
        raise PrepareError(f"--min-size must be 0 (no filter) or a positive number of pixels, got {args.min_size}")
    if not 1 <= args.jpeg_quality <= 100:
        raise PrepareError(f"--jpeg-quality must be between 1 and 100 (95 is a good default), got {args.jpeg_quality}")
    shard_settings = ShardSettings(args.samples_per_shard, args.max_shard_bytes, args.min_size, args.resize_to,
                                   args.jpeg_quality, not args.reencode_jpeg)
    if args.merge:
        return PrepareConfig(None, args.output, shard_settings, merge_only=True, quiet=args.quiet)
    if args.source is None:
        raise PrepareError("SOURCE is missing: give a folder of images with .txt captions or a "
                           ".csv/.tsv/.jsonl/.parquet file (only --merge runs without one)")
    kind = detect_source_kind(Path(args.source))
    if kind in ("folder", "shards") and (args.key_column or args.image_root):
        raise PrepareError("--key-column and --image-root apply to table sources; a folder's keys come "
                           "from the file names, a shard's from its samples")
    if args.image_root is not None and not Path(args.image_root).is_dir():
        raise PrepareError(f"--image-root {args.image_root!r} is not a folder")
    chunk_index, num_chunks = args.chunk_index, args.num_chunks
    array = slurm_array(environ)
    if array is not None:
        chunk_index = array[0] if chunk_index is None else chunk_index
        num_chunks = array[1] if num_chunks is None else num_chunks
    if chunk_index is not None and num_chunks is None:
        raise PrepareError(f"--chunk-index {chunk_index} needs --num-chunks, so every task splits the "
                           f"inputs the same way")
    if chunk_index is not None and chunk_index < 0:
        raise PrepareError(f"--chunk-index must be >= 0, got {chunk_index}")
    if args.overwrite and chunk_index is not None:
        raise PrepareError("--overwrite cannot be combined with --chunk-index or a SLURM array: one task "
                           "would delete the others' shards; clear the output folder before submitting")
    source = SourceSpec(str(args.source), kind, args.image_column, args.caption_column, args.key_column,
                        args.image_root)
    return PrepareConfig(source, args.output, shard_settings, num_chunks, args.chunk_size, chunk_index,
                         args.workers, args.on_duplicate, False, args.overwrite, args.quiet)


@entry_point("prepare.py")
def main(argv: Sequence[str] | None = None, environ: dict | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = config_from_args(args, dict(os.environ) if environ is None else environ)
    run_prepare(config)
    return 0


if __name__ == "__main__":
    sys.exit(main())

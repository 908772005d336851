"""Dense captions for WebDataset shards from a vision-language model: `python recaption.py --help`.

    python recaption.py SHARDS --model MODEL --output DIR [--prompt TEXT] [--batch-size 16] [--processes 8]
    python recaption.py --merge --output DIR          # manifest.json and report.json of a finished job
    python recaption.py --preview 16 --output DIR     # preview.png (contact sheet) and word_counts.png

Train on the result with ``data.shards=DIR "data.caption_mix={dense.txt: 0.5, txt: 0.5}"``. The work is
tools/recaption.py's ``run_recaption``; this file is its command line.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

from llm4gen.cli.prepare import OneParagraphParser, slurm_array
from llm4gen.configs import choices
from llm4gen.configs.errors import entry_point
from llm4gen.tools.recaption import RecaptionJob, merge_job, run_recaption
from llm4gen.tools.recaption_model import DEFAULT_PROMPT, PROMPT_FORMATS, GenerationSettings, RecaptionError
from llm4gen.tools.recaption_preview import write_preview


def build_parser() -> argparse.ArgumentParser:
    parser = OneParagraphParser(
        prog="recaption.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shards", nargs="?", metavar="SHARDS",
                        help="input shards: a folder of .tar (prepare.py's, img2dataset's, an earlier job's output), a "
                             "brace pattern or a manifest.json; never modified")
    parser.add_argument("--output", "-o", required=True, metavar="DIR",
                        help="folder for the companion shards, job.json, manifest.json and report.json")
    model = parser.add_argument_group("the model and what it is asked")
    model.add_argument("--model", metavar="MODEL", help="a vision-language model's folder, or a hub id already in "
                                                       "your Hugging Face cache (nothing is downloaded)")
    model.add_argument("--revision", default=None, help="the hub revision to read from the cache")
    model.add_argument("--trust-remote-code", action="store_true", help="allow a model that ships its own code")
    model.add_argument("--prompt", default=DEFAULT_PROMPT, help="the instruction (default: the paper's, in our words)")
    model.add_argument("--prompt-format", default="auto", choices=PROMPT_FORMATS,
                       help="chat: the instruction inside the model's chat template; raw: the text as given (with the "
                            "image token where the model expects it, or a Florence-2 task token); auto: chat when the "
                            "model has a template")
    model.add_argument("--key", default=choices.DENSE_CAPTION_KEY, dest="caption_key",
                       help="the member the new caption goes to (default %(default)s; the record beside it: .json)")
    model.add_argument("--caption-keys", default=",".join(choices.CAPTION_KEYS),
                       help="where each sample's original caption is read, first present wins (default %(default)s)")
    decoding = parser.add_argument_group("decoding")
    decoding.add_argument("--max-new-tokens", type=int, default=GenerationSettings.max_new_tokens)
    decoding.add_argument("--min-words", type=int, default=RecaptionJob.min_words,
                          help="shorter captions are not written, counted as too_short (default %(default)s)")
    decoding.add_argument("--max-words", type=int, default=RecaptionJob.max_words,
                          help="longer captions are not written, counted as too_long (default %(default)s)")
    decoding.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    decoding.add_argument("--temperature", type=float, default=GenerationSettings.temperature)
    decoding.add_argument("--top-p", type=float, default=GenerationSettings.top_p)
    decoding.add_argument("--repetition-penalty", type=float, default=GenerationSettings.repetition_penalty)
    decoding.add_argument("--seed", type=int, default=GenerationSettings.seed, help="the sampling seed")
    work = parser.add_argument_group("batches, devices, parallel work")
    work.add_argument("--batch-size", type=int, default=RecaptionJob.batch_size, help="images per generate call")
    work.add_argument("--dtype", default="auto", choices=("auto", *choices.DTYPES),
                      help="auto: bfloat16 on a GPU, float32 on the CPU")
    work.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    work.add_argument("--processes", type=int, default=1, help="local processes, one per GPU (process i on cuda:i)")
    work.add_argument("--part", type=int, default=None,
                      help="this task's range of the shards (default: $SLURM_ARRAY_TASK_ID's position, else 0)")
    work.add_argument("--num-parts", type=int, default=None,
                      help="how many ranges the shards are split into (default: $SLURM_ARRAY_TASK_COUNT, else 1)")
    work.add_argument("--max-shards", type=int, default=None,
                      help="caption at most this many unfinished shards per process, then stop (time-limited jobs)")
    work.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    after = parser.add_argument_group("a finished job")
    after.add_argument("--merge", action="store_true", help="only write manifest.json and report.json")
    after.add_argument("--preview", type=int, metavar="N", default=None,
                       help="write preview.png (the first N samples: image, original and dense caption, word counts) "
                            "and word_counts.png into --output")
    return parser


def job_from_args(args: argparse.Namespace, environ: dict) -> RecaptionJob:
    if args.shards is None or args.model is None:
        raise RecaptionError("give the input SHARDS and --model (or --merge / --preview N with --output of a job): "
                             "python recaption.py /data/laion-part --model llava-hf/llava-1.5-7b-hf --output "
                             "/data/laion-part-dense")
    part, num_parts = args.part, args.num_parts
    array = slurm_array(environ)
    if array is not None:
        part = array[0] if part is None else part
        num_parts = array[1] if num_parts is None else num_parts
    if (part is None) != (num_parts is None):
        raise RecaptionError(f"--part {part} and --num-parts {num_parts}: give both, so every task splits the shards "
                             f"the same way (or neither, in a SLURM array: its variables decide)")
    generation = GenerationSettings(args.max_new_tokens, args.do_sample, args.temperature, args.top_p,
                                    args.repetition_penalty, args.seed)
    return RecaptionJob(
        shards=args.shards, output=args.output, model=args.model, prompt=args.prompt, prompt_format=args.prompt_format,
        caption_key=args.caption_key, caption_keys=tuple(k.strip() for k in args.caption_keys.split(",") if k.strip()),
        min_words=args.min_words, max_words=args.max_words, generation=generation, batch_size=args.batch_size,
        dtype=args.dtype, device=args.device, revision=args.revision, trust_remote_code=args.trust_remote_code,
        part=part or 0, num_parts=num_parts or 1, processes=args.processes, max_shards=args.max_shards,
        quiet=args.quiet)


@entry_point("recaption.py")
def main(argv: Optional[Sequence[str]] = None, environ: Optional[dict] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.preview is not None:
        sheet, histogram = write_preview(args.output, args.preview)
        print(f"contact sheet: {sheet}\nword counts: {histogram}")
        return 0
    if args.merge:
        merge_job(args.output)
        return 0
    summary = run_recaption(job_from_args(args, dict(os.environ) if environ is None else environ))
    return 1 if summary["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())

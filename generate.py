"""Generate images from a trained run.

    python generate.py --checkpoint runs/tiny/checkpoints/last.ckpt --prompt "a red circle" \
        --output-dir out/ --seed 0

Prompt i is sampled with seed ``seed + i``, so the same command writes identical images. The negative
prompt (default empty) goes through CLIP, the LLM and the CAM, as in training's caption dropout.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path


def slug(text: str, length: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:length] or "prompt"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a training checkpoint (.ckpt)")
    parser.add_argument("--prompt", action="append", required=True, help="repeat for several prompts")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--negative-prompt", default="")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--guidance-scale", type=float, default=7.5)
    parser.add_argument("--scheduler", default="DDIMScheduler", help="a diffusers scheduler class name")
    parser.add_argument("--no-ema", action="store_true", help="use the trained weights, not their EMA")
    parser.add_argument("--device", default="cuda" if _cuda() else "cpu")
    return parser.parse_args(argv)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def main(argv=None) -> int:
    args = parse_args(argv)
    if not Path(args.checkpoint).is_file():
        print(f"error: --checkpoint {args.checkpoint!r} is not a file", file=sys.stderr)
        return 2
    from evaluation.sampler import SamplingSettings, load_sampler

    settings = SamplingSettings(args.steps, args.guidance_scale, args.scheduler, args.negative_prompt)
    sampler = load_sampler(checkpoint=args.checkpoint, settings=settings, device=args.device, use_ema=not args.no_ema)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    images = sampler.generate(args.prompt, [args.seed + i for i in range(len(args.prompt))])
    for i, (prompt, image) in enumerate(zip(args.prompt, images)):
        path = out / f"{i:03d}-seed{args.seed + i}-{slug(prompt)}.png"
        image.save(path)
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

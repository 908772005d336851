"""Generate images from a trained run.

    python generate.py --checkpoint runs/tiny/checkpoints/last.ckpt --prompt "a red circle" \
        --output-dir out/ --seed 0

    python generate.py --release /models/llm4gen-sd15 --config configs/llm4gen_sd15.yaml \
        --prompt "a red circle" --output-dir out/

``--release`` takes a folder in the authors' release layout (``projector.pth`` + ``unet/``, see
adapters/release.py; ``export.py`` writes one from a run); the base SD1.5 (VAE, CLIP, scheduler) and the
LLM come from ``--config`` and its overrides. Prompt i is sampled with seed ``seed + i``, so the same command writes identical images. The negative
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
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="a training checkpoint (.ckpt)")
    source.add_argument("--release", help="a release-layout folder (projector.pth + unet/); needs --config")
    parser.add_argument("--config", help="with --release: the experiment YAML giving the base SD and the LLM")
    parser.add_argument("overrides", nargs="*", help="with --release: dotted.key=value config overrides")
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


def load_release_module(release: str, config: str | None, overrides=()):
    """An LLM4GenModule holding a release-layout folder's CAM and UNet over the config's base and LLM."""
    from omegaconf import OmegaConf

    from adapters.release import release_overrides
    from configs.schema import load_config
    from lightning_modules.llm4gen import LLM4GenModule

    cfg = load_config(config, [*release_overrides(release), *overrides])
    return LLM4GenModule(OmegaConf.to_container(cfg.model, resolve=True), seed=cfg.seed)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.checkpoint and (args.config or args.overrides):
        print("error: --config and overrides go with --release; a checkpoint carries its own config", file=sys.stderr)
        return 2
    if args.checkpoint and not Path(args.checkpoint).is_file():
        print(f"error: --checkpoint {args.checkpoint!r} is not a file", file=sys.stderr)
        return 2
    import contextlib

    if args.release:
        try:
            module = load_release_module(args.release, args.config, args.overrides)
        except (ValueError, FileNotFoundError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        module = module.to(args.device)
    else:
        from lightning_modules.llm4gen import LLM4GenModule

        module = LLM4GenModule.load_from_checkpoint(args.checkpoint, map_location="cpu").to(args.device)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    with (contextlib.nullcontext() if args.no_ema else module.ema_weights()):
        images = module.generate(args.prompt, [args.seed + i for i in range(len(args.prompt))], args.steps,
                                 args.guidance_scale, args.scheduler, args.negative_prompt)
    for i, (prompt, image) in enumerate(zip(args.prompt, images)):
        path = out / f"{i:03d}-seed{args.seed + i}-{slug(prompt)}.png"
        image.save(path)
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

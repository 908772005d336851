"""Generate images from a trained run.

    python generate.py --checkpoint runs/tiny/checkpoints/last.ckpt --prompt "a red circle" \
        --output-dir out/ --seed 0

    python generate.py --release /models/llm4gen-sd15 --config configs/llm4gen_sd15.yaml \
        --prompt "a red circle" --output-dir out/

``--pipeline`` takes a folder ``export.py`` wrote (an ``LLM4GenPipeline``, pipelines/llm4gen_pipeline.py) and
samples through it: what a recipient of the folder gets. ``--base`` puts the connector of a checkpoint or a
pipeline on another base of its family (a community checkpoint: a diffusers folder, or one ``.safetensors`` /
``.ckpt`` file read with the configs of ``--base-config``), checked against the one it trained on first
(pipelines/bases.py). ``--release`` takes a folder in the authors' release layout (``projector.pth`` + ``unet/``, see
adapters/release.py; ``export.py`` writes one from a run); the base SD1.5 (VAE, CLIP, scheduler) and the
LLM come from ``--config`` and its overrides. Prompt i is sampled with seed ``seed + i``, so the same command writes identical images. The negative
prompt (default empty) goes through CLIP, the LLM and the CAM, as in training's caption dropout.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from omegaconf import OmegaConf

from llm4gen.adapters.release import release_overrides
from llm4gen.configs.checks import check_scheduler_name
from llm4gen.configs.errors import UserError, entry_point
from llm4gen.configs.schema import load_config
from llm4gen.encoders.sources import check_source
from llm4gen.evaluation.grids import captioned_grid
from llm4gen.launch.preflight import check_init_from, check_sources, model_widths
from llm4gen.lightning_modules.checkpoint_files import load_checkpoint_checked
from llm4gen.lightning_modules.llm4gen import LLM4GenModule
from llm4gen.lightning_modules.safe_loading import TRUST_FLAG, TRUST_HELP, trusted_checkpoints
from llm4gen.lightning_modules.sampler import Sampler, SamplingSettings, check_another_base, load_sampler


def slug(text: str, length: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:length] or "prompt"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="a training checkpoint (.ckpt)")
    source.add_argument("--release", help="a release-layout folder (projector.pth + unet/); needs --config")
    source.add_argument("--pipeline", help="an exported LLM4GenPipeline folder (export.py --format diffusers)")
    parser.add_argument("--config", help="with --release: the experiment YAML giving the base SD and the LLM")
    parser.add_argument("--base", help="with --checkpoint or --pipeline: another base of the connector's family to "
                                       "sample on, a diffusers folder or one .safetensors/.ckpt file (checked first)")
    parser.add_argument("--base-config", help="with a single-file --base: a local diffusers folder of its family whose "
                                              "configs it is read with (default: the base the connector trained on)")
    parser.add_argument("overrides", nargs="*", help="with --release: dotted.key=value config overrides")
    parser.add_argument("--prompt", action="append", required=True, help="repeat for several prompts")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--negative-prompt", default="")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--guidance-scale", type=float, default=7.5)
    parser.add_argument("--scheduler", default="DDIMScheduler", help="a diffusers scheduler class name")
    parser.add_argument("--no-ema", action="store_true", help="use the trained weights, not their EMA")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument(TRUST_FLAG, action="store_true", help=f"--checkpoint: {TRUST_HELP}")
    return parser.parse_args(argv)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def check_sampling_args(args: argparse.Namespace) -> None:
    """The sampling options of generate.py and attention_maps.py, before any model loads."""
    if args.steps < 1:
        raise UserError(f"--steps {args.steps}: expected a number of denoising steps >= 1 (e.g. 30)")
    if args.guidance_scale < 0:
        raise UserError(f"--guidance-scale {args.guidance_scale}: expected a number >= 0 (1 turns guidance off; "
                        f"7.5 is usual)")

    check_scheduler_name(args.scheduler, "--scheduler")


def check_checkpoint_sources(checkpoint: dict) -> None:
    """The frozen models the checkpoint's config names must exist here before any of them loads."""
    model = checkpoint["hyper_parameters"]["model"]
    check_source(model["base"]["pretrained"], "the checkpoint's model.base.pretrained")
    check_source(model["llm"]["pretrained"], "the checkpoint's model.llm.pretrained")
    if model["llm"].get("tokenizer"):
        check_source(model["llm"]["tokenizer"], "the checkpoint's model.llm.tokenizer")


def load_release_module(release: str, config: str | None, overrides=()):
    """An LLM4GenModule holding a release-layout folder's CAM and UNet over the config's base and LLM."""
    cfg = load_config(config, [*release_overrides(release), *overrides])
    check_sources(cfg)
    check_init_from(cfg.model.adapter.init_from, model_widths(cfg))  # projector.pth read and checked before weights load
    return LLM4GenModule(OmegaConf.to_object(cfg.model), seed=cfg.seed)


@entry_point("generate.py")
def main(argv=None) -> int:
    args = parse_args(argv)
    with trusted_checkpoints(args.trust_checkpoint):
        return generate(args)


def generate(args: argparse.Namespace) -> int:
    if not [p for p in args.prompt if p.strip()]:
        raise UserError("--prompt is empty: give at least one non-empty prompt")
    if (args.checkpoint or args.pipeline) and (args.config or args.overrides):
        raise UserError("--config and overrides go with --release; a checkpoint or pipeline carries its own config")
    if (args.base or args.base_config) and args.release:
        raise UserError("--base goes with --checkpoint or --pipeline; --release takes its base from --config")
    if args.base_config and not args.base:
        raise UserError("--base-config goes with a single-file --base")
    check_sampling_args(args)
    device = args.device or ("cuda" if _cuda() else "cpu")

    settings = SamplingSettings(args.steps, args.guidance_scale, args.scheduler, args.negative_prompt)
    if args.pipeline:
        try:
            if args.base:  # before any weights load
                check_another_base(args.base, args.base_config, pipeline=args.pipeline)
            sampler = load_sampler(pipeline=args.pipeline, settings=settings, device=device, base=args.base,
                                   base_config=args.base_config)
        except (FileNotFoundError, ValueError) as err:
            raise UserError(f"--pipeline: {err}") from None
    elif args.release:
        try:
            module = load_release_module(args.release, args.config, args.overrides)
        except (ValueError, FileNotFoundError) as err:
            raise UserError(f"--release {args.release}: {err}") from None
        sampler = Sampler({"release": str(args.release), "config": args.config}, settings,
                          module=module.to(device), use_ema=False)
    else:
        checkpoint = load_checkpoint_checked(args.checkpoint)
        check_checkpoint_sources(checkpoint)
        if args.base:  # before the run's module and the base's weights load
            try:
                check_another_base(args.base, args.base_config,
                                   checkpoint_model=checkpoint["hyper_parameters"]["model"])
            except (FileNotFoundError, ValueError) as err:
                raise UserError(str(err)) from None
        sampler = load_sampler(checkpoint=args.checkpoint, settings=settings, device=device, use_ema=not args.no_ema,
                               base=args.base, base_config=args.base_config)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    images = sampler.generate(args.prompt, [args.seed + i for i in range(len(args.prompt))])
    for i, (prompt, image) in enumerate(zip(args.prompt, images)):
        path = out / f"{i:03d}-seed{args.seed + i}-{slug(prompt)}.png"
        image.save(path)
        print(path)
    if len(images) > 1:  # the prompts side by side, as the validation grids show them
        grid = out / "grid.png"
        captioned_grid(images, args.prompt, columns=min(4, len(images)), side=max(128, images[0].size[0])).save(grid)
        print(grid)
    return 0


if __name__ == "__main__":
    sys.exit(main())

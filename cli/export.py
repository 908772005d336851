"""Export a trained run: `python export.py --help`.

    python export.py --checkpoint runs/x/checkpoints/last.ckpt --output runs/x/pipeline                   # diffusers
    python export.py --checkpoint runs/x/checkpoints/last.ckpt --output runs/x/release --format release

``--format diffusers`` (the default) writes an ``LLM4GenPipeline`` folder (pipelines/llm4gen_pipeline.py):
``model_index.json``, every component, and a model card ``README.md`` in the hub's format; anyone loads it
with ``LLM4GenPipeline.from_pretrained(folder)`` or samples it with ``generate.py --pipeline folder``.
``--format release`` writes ``projector.pth`` (the CAM under the released key names) and ``unet/`` (the
trained UNet, or the frozen one the CAM was trained against), the layout of the released LLM4GEN SD1.5
model: load it with ``generate.py --release`` or ``model.adapter.init_from=DIR model.base.unet=DIR/unet``.
EMA weights are exported when the run has them (``--no-ema``: the trained ones). ``--base`` exports the connector
for another base of its family (a diffusers folder, or a community ``.safetensors`` / ``.ckpt`` file read with the
configs of ``--base-config``): checked against the base it trained on before anything loads, named (or, with
``--full``, copied) in place of it; the model card lists the bases it was checked with.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

from llm4gen.cli.generate import check_checkpoint_sources
from llm4gen.configs.errors import UserError, entry_point
from llm4gen.configs.schema import as_plain
from llm4gen.lightning_modules.checkpoint_files import load_checkpoint_checked
from llm4gen.lightning_modules.llm4gen import fused_unet, save_unet_lora
from llm4gen.lightning_modules.safe_loading import TRUST_FLAG, TRUST_HELP, trusted_checkpoints
from llm4gen.lightning_modules.sampler import load_checkpoint_module
from llm4gen.pipelines.bases import base_references, check_model_base, pipeline_on_base
from llm4gen.pipelines.llm4gen_pipeline import pipeline_from_module
from llm4gen.pipelines.references import frozen_references, save_by_reference
from llm4gen.pipelines.model_card import model_card, run_scores


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a training checkpoint (.ckpt)")
    parser.add_argument("--output", required=True, help="the folder to write the export into")
    parser.add_argument("--format", choices=("diffusers", "release"), default="diffusers",
                        help="diffusers: an LLM4GenPipeline folder with a model card (default); release: the "
                             "authors' layout, projector.pth + unet/")
    parser.add_argument("--no-ema", action="store_true", help="export the trained weights, not their EMA")
    parser.add_argument("--base", help="diffusers: export the connector for another base of its family (a diffusers "
                                       "folder, or one .safetensors/.ckpt file), checked against the one it trained "
                                       "on; the folder names it instead")
    parser.add_argument("--base-config", help="with a single-file --base: a local diffusers folder of its family "
                                              "(default: the base the connector trained on)")
    parser.add_argument("--full", action="store_true",
                        help="diffusers: copy the frozen parts (VAE, CLIP, LLM, a frozen UNet) into the folder; by "
                             "default they are referenced by their sources and loaded from there")
    parser.add_argument(TRUST_FLAG, action="store_true", help=f"--checkpoint: {TRUST_HELP}")
    return parser.parse_args(argv)


@entry_point("export.py")
def main(argv=None) -> int:
    args = parse_args(argv)
    with trusted_checkpoints(args.trust_checkpoint):
        return export(args)


def export(args: argparse.Namespace) -> int:
    checked = load_checkpoint_checked(args.checkpoint, what="--checkpoint")  # a file's or a sharded folder's index
    check_checkpoint_sources(checked)
    if args.base and args.format != "diffusers":
        raise UserError("--base goes with --format diffusers (the release layout names no base)")
    base = None
    if args.base:  # it fits, before any weights load
        try:
            family = check_model_base(checked["hyper_parameters"]["model"], args.base, args.base_config).family
        except (FileNotFoundError, ValueError) as err:
            raise UserError(str(err)) from None
        base = (args.base, family, args.base_config or checked["hyper_parameters"]["model"]["base"]["pretrained"])

    module = load_checkpoint_module(args.checkpoint)  # a sharded run's folder too
    if args.format == "diffusers":
        print(export_pipeline(module, Path(args.output), Path(args.checkpoint), step=checked.get("global_step"),
                              use_ema=not args.no_ema, full=args.full, base=base))
        return 0
    try:
        print(module.export_release(args.output, use_ema=not args.no_ema))
    except ValueError as err:  # a run the release layout cannot hold (LoRA)
        raise UserError(str(err)) from None
    return 0


def export_pipeline(module, output: Path, checkpoint: Path, step: int | None = None, use_ema: bool = True,
                    full: bool = False, base: tuple[str, str, str] | None = None) -> Path:
    """The run as an LLM4GenPipeline folder with its model card; the EMA weights when ``use_ema``; the frozen
    parts copied with ``full``, else referenced by their sources (the folder holds what trained); ``step``: the
    checkpoint's optimizer steps, for the model card; ``base``: (another base, its family, the configs of a
    single file), checked already: the folder's base parts are its."""
    lora = module.cfg.unet_training == "lora"
    try:
        with (module.ema_weights() if use_ema else contextlib.nullcontext()):
            pipe = pipeline_from_module(module)
            if lora:  # the pipeline's UNet has the LoRA merged in; unet_lora/ keeps it apart for load_lora_weights
                pipe.register_modules(unet=fused_unet(module.unet))
                save_unet_lora(module.unet, output / "unet_lora")
            if base and full:  # the new base's parts themselves, copied
                pipe = pipeline_on_base(pipe, base[0], base[2], trained_name=module.cfg.base.pretrained)
            references = {} if full else frozen_references(module)
            if base and references:
                references = base_references(references, base[0], base[1], base[2])
            if references:
                save_by_reference(pipe, output, references)
            else:
                pipe.save_pretrained(output, safe_serialization=True)
    except ValueError as err:  # a module the pipeline cannot hold (SDXL, chunked CLIP, no connector)
        raise UserError(str(err)) from None
    run_dir = checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else None
    model = as_plain(module.cfg)
    shown = {name: f"{r['source']}" + (f" ({r['subfolder']})" if r.get("subfolder") else "") for name, r in references.items()}
    checked = [(module.cfg.base.pretrained, "trained on")]
    if base:
        checked.append((base[0], "exported for: its shapes (cross-attention width, CLIP's widths, tokens and "
                                 "positions, SDXL's pooled and time ids" + (", the gated fusion's layers"
                                 if module.fusion is not None else "") + ") checked against the trained base's"))
    (output / "README.md").write_text(model_card(model, step, run_scores(run_dir), references=shown, bases=checked))
    if references:
        print(f"frozen parts referenced, not copied (export.py --full copies them): "
              f"{', '.join(f'{k} <- {v}' for k, v in shown.items())}")
    return output


if __name__ == "__main__":
    sys.exit(main())

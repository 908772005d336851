"""Show where each entity and attribute word of a prompt attends while a trained model generates it.

    python attention_maps.py --checkpoint runs/tiny/checkpoints/last.ckpt \
        --prompt "a red circle and a blue square" --output maps.png [--seed 0] [--steps 30] \
        [--guidance-scale 7.5] [--layers lowest|all|16,32]

Writes one PNG: the generated image, then one heatmap per entity/attribute word the entity parser
finds in the prompt, each labelled with its word. A word's map is the one the entity loss reads (its
CLIP and LLM tokens' attention, summed, normalized over pixels), averaged over every denoising step and
the chosen cross-attention layers, for the prompt's half of the classifier-free-guidance batch.
--layers picks feature-map sides as model.objective.entity_layers does; without it, the layers the
checkpoint's entity loss captured (or the lowest-resolution ones).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

from llm4gen.cli.generate import check_checkpoint_sources, check_sampling_args
from llm4gen.configs.errors import UserError, entry_point
from llm4gen.datamodules.collate import entity_parser
from llm4gen.lightning_modules.checkpoint_files import load_checkpoint_checked
from llm4gen.lightning_modules.safe_loading import TRUST_FLAG, TRUST_HELP, trusted_checkpoints
from llm4gen.lightning_modules.sampler import load_checkpoint_module
from llm4gen.losses.attention_capture import (
    captured_layers,
    cross_attention_layer_names,
    cross_attention_layer_sides,
    install_attention_capture,
    remove_attention_capture,
)
from llm4gen.losses.attention_maps import (
    average_attention,
    positions_in_context,
    render_attention_panels,
    word_maps,
)
from llm4gen.losses.entity_parser import entity_words
from llm4gen.losses.token_alignment import fused_word_token_positions


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a training checkpoint (.ckpt)")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--output", required=True, help="the PNG to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=30, help="denoising steps")
    parser.add_argument("--guidance-scale", type=float, default=7.5)
    parser.add_argument("--layers", default=None,
                        help="lowest | all | comma-separated feature-map sides, e.g. 16,32 (default: the "
                             "checkpoint's model.objective.entity_layers if it trained with the entity loss, "
                             "else lowest)")
    parser.add_argument("--scheduler", default="DDIMScheduler", help="a diffusers scheduler class name")
    parser.add_argument("--panel-size", type=int, default=256, help="side of each panel in the PNG, pixels")
    parser.add_argument("--no-ema", action="store_true", help="use the trained weights, not their EMA")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument(TRUST_FLAG, action="store_true", help=f"--checkpoint: {TRUST_HELP}")
    return parser.parse_args(argv)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def parse_layers(text: str) -> str | list[int]:
    """'lowest' | 'all' | '16,32' -> what cross_attention_layer_names takes."""
    if text in ("lowest", "all"):
        return text
    try:
        sides = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        sides = []
    if not sides:
        raise UserError(f"--layers {text!r}: use lowest, all or comma-separated feature-map sides such as 16,32")
    return sides


def capture_store(module, layers: str | None):
    """The module's attention store on the requested layers: the existing one when it already captures
    them (or when no --layers was given), else capture reinstalled on those layers."""
    store = module.attention_store
    if layers is None and store is not None:
        return store
    wanted = cross_attention_layer_names(module.unet, parse_layers(layers or "lowest"))
    captured = captured_layers(module.unet)
    if store is not None and sorted(captured) == sorted(wanted):
        return store
    if captured:
        remove_attention_capture(module.unet)
    module.attention_store = install_attention_capture(module.unet, wanted, enabled=False)
    return module.attention_store


def generate_with_maps(module, store, prompt: str, seed: int, steps: int, guidance_scale: float, scheduler: str):
    """(image, [maps of each UNet forward]): maps name -> (1, pixels, tokens), the prompt's row only
    (with guidance the UNet sees [negative, prompt]; without it just the prompt)."""
    collected = []

    def keep(_unet, _args, _output):
        collected.append({name: probs.detach()[-1:].float().cpu() for name, probs in store.maps().items()})

    handle = module.unet.register_forward_hook(keep)
    store.enabled = True
    try:
        image = module.generate([prompt], [seed], steps, guidance_scale, scheduler)[0]
    finally:
        store.enabled = False
        handle.remove()
    return image, collected


def check_word_positions(adapter: dict) -> None:
    """A context with no word in it (ELLA's learned queries alone) has no word's map to show: refused before loading."""
    if adapter.get("enabled", True) and adapter.get("kind") == "ella" and not adapter.get("with_clip"):
        raise UserError("attention_maps.py shows where each word of the prompt attends; this checkpoint's connector "
                        "(model.adapter.kind=ella) hands the UNet learned queries alone, which hold no word "
                        "positions (the entity loss is refused for the same reason). Its queries' attention is not a "
                        "word's; train with model.adapter.with_clip=true to see CLIP's words")


@entry_point("attention_maps.py")
def main(argv=None) -> int:
    args = parse_args(argv)
    with trusted_checkpoints(args.trust_checkpoint):
        return attention_maps(args)


def attention_maps(args: argparse.Namespace) -> int:
    if args.layers is not None:
        parse_layers(args.layers)
    if args.panel_size < 16:
        raise UserError(f"--panel-size {args.panel_size}: expected a side of at least 16 pixels (e.g. 256)")
    if not args.prompt.strip():
        raise UserError("--prompt is empty: give the prompt whose words' attention to show")
    checkpoint = load_checkpoint_checked(args.checkpoint)
    check_sampling_args(args)
    check_checkpoint_sources(checkpoint)
    check_word_positions(checkpoint["hyper_parameters"]["model"]["adapter"])

    module = load_checkpoint_module(args.checkpoint, args.device or ("cuda" if _cuda() else "cpu"))
    try:
        store = capture_store(module, args.layers)
    except ValueError as error:  # sides the UNet has no cross-attention layer at
        raise UserError(f"--layers {args.layers!r}: {error}") from None

    words = entity_words(entity_parser(module.cfg.objective.entity_parser).parse(args.prompt))
    clip_tokens = module.clip.tokenizer.model_max_length
    fused = fused_word_token_positions(
        [args.prompt], [words], module.clip.tokenizer, module.llm.tokenizer, clip_max_length=clip_tokens,
        llm_max_length=module.cfg.llm.max_length, llm_prefix=module.llm.prefix)[0]
    layout = module.adapter.layout if module.uses_cam else None  # None: the base reads CLIP alone
    positions = [positions_in_context(p, layout, clip_tokens) for p in fused]
    lost = [word.text for word, p in zip(words, positions) if not p]
    if lost:
        print(f"warning: no token left for {lost} after truncation; not shown", file=sys.stderr)
    shown = [(word, p) for word, p in zip(words, positions) if p]
    if not shown:
        print(f"warning: the entity parser found no entity or attribute word in {args.prompt!r}; "
              "the PNG holds the image only", file=sys.stderr)

    with (contextlib.nullcontext() if args.no_ema else module.ema_weights()):
        image, step_maps = generate_with_maps(module, store, args.prompt, args.seed, args.steps,
                                              args.guidance_scale, args.scheduler)
    attention = average_attention(step_maps, cross_attention_layer_sides(module.unet))[0]  # (tokens, H, W)
    maps = word_maps(attention, [p for _, p in shown])  # (words, H, W)
    canvas = render_attention_panels(image, maps, [word.text for word, _ in shown], args.panel_size,
                                     image_label=f"seed {args.seed}")
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(output)
    print(f"{output}: image + {len(shown)} word maps ({', '.join(w.text for w, _ in shown)}), "
          f"{len(step_maps)} steps x {len(step_maps[0])} layers")
    return 0


if __name__ == "__main__":
    sys.exit(main())

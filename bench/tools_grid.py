"""The grid of docs/using.md: one row per tool on the shapes base (embedded:shapes-sd), the base with the tool beside
a trained connector with the same tool, same seeds, two prompts. A first column shows the tool's input.

    python bench/tools_grid.py --checkpoint runs/tiny/checkpoints/last.ckpt --lora runs/lora_trigger/lora \
        --out docs/plug_and_play.png

The ControlNets, the T2I-Adapter and the IP-Adapter are llm4gen.embedded.tools' untrained ones (random weights
from published configs): their rows show that each tool's conditioning reaches the image under the connector as
under the base, not what a trained tool draws. The LoRA is bench/lora_trigger.py's, trained on the base alone with
the trigger "zwx" (a teal background). img2img and inpainting start from a rendered shapes scene. Prints, per
tool, how far the connector's images are from the base's (mean absolute difference, grey levels).
"""

from __future__ import annotations

import argparse
import contextlib
import random
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

PROMPTS = ["a large red circle", "a small blue square and a large yellow triangle"]
SEEDS = [3, 4]


def scene(seed: int, resolution: int) -> tuple[Image.Image, Image.Image]:
    """A training-split shapes scene: its rendering, and its objects' silhouettes (white on black: a control map)."""
    from llm4gen.shapes.world import BACKGROUND_RGB, render_scene, sample_scene

    image = render_scene(sample_scene(random.Random(seed), "train", n_objects=2), resolution)
    pixels = np.asarray(image)
    silhouette = np.where((pixels != BACKGROUND_RGB).any(-1, keepdims=True), 255, 0).astype(np.uint8)
    return image, Image.fromarray(np.repeat(silhouette, 3, axis=-1))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a run whose connector sits on embedded:shapes-sd")
    parser.add_argument("--lora", help="bench/lora_trigger.py's LoRA folder (its row is left out without it)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", default="docs/plug_and_play.png")
    args = parser.parse_args(argv)

    import diffusers

    from llm4gen.embedded.tools import tiny_controlnet, tiny_t2i_adapter, write_ip_adapter
    from llm4gen.evaluation.grids import captioned_grid
    from llm4gen.lightning_modules.sampler import load_checkpoint_module
    from llm4gen.pipelines import pipeline_from_module, tools

    torch.manual_seed(0)
    ours = pipeline_from_module(load_checkpoint_module(args.checkpoint).eval())
    ours.scheduler = diffusers.DDIMScheduler.from_config(ours.scheduler.config)
    resolution = ours.unet.config.sample_size * ours.vae_scale_factor
    init, control = scene(11, resolution)
    _, second_control = scene(12, resolution)
    mask = np.zeros((resolution, resolution), np.uint8)
    mask[:, resolution // 2:] = 255
    controlnets = [tiny_controlnet(ours.unet, seed=0), tiny_controlnet(ours.unet, seed=10)]
    adapter = tiny_t2i_adapter(ours.unet)
    folder = Path(tempfile.mkdtemp())

    def pair(ours_class, base_class, **parts):
        made = ours_class.from_pipe(ours, **parts)
        return made, getattr(diffusers, base_class).from_pipe(made)

    @contextlib.contextmanager
    def ip_adapter():
        write_ip_adapter(ours.unet, folder)
        ours.load_ip_adapter(str(folder), subfolder="", weight_name="ip_adapter.safetensors",
                             image_encoder_folder="image_encoder")
        try:
            yield ours, diffusers.StableDiffusionPipeline.from_pipe(ours)
        finally:
            ours.unload_ip_adapter()

    @contextlib.contextmanager
    def lora():
        ours.load_lora_weights(args.lora, adapter_name="trigger")
        try:
            yield ours, diffusers.StableDiffusionPipeline.from_pipe(ours)
        finally:
            ours.unload_lora_weights()

    rows = [("no tool", None, lambda: contextlib.nullcontext((ours, diffusers.StableDiffusionPipeline.from_pipe(ours))),
             {}, PROMPTS),
            ("ControlNet (untrained)", control,
             lambda: contextlib.nullcontext(pair(tools.LLM4GenControlNetPipeline, "StableDiffusionControlNetPipeline",
                                                 controlnet=controlnets[0])), dict(image=control), PROMPTS),
            ("two ControlNets (untrained)", second_control,
             lambda: contextlib.nullcontext(pair(tools.LLM4GenControlNetPipeline, "StableDiffusionControlNetPipeline",
                                                 controlnet=controlnets)),
             dict(image=[control, second_control], controlnet_conditioning_scale=[0.5, 0.5]), PROMPTS),
            ("T2I-Adapter (untrained)", control,
             lambda: contextlib.nullcontext(pair(tools.LLM4GenAdapterPipeline, "StableDiffusionAdapterPipeline",
                                                 adapter=adapter)), dict(image=[control] * 2), PROMPTS),
            ("IP-Adapter (untrained)", init, ip_adapter, dict(ip_adapter_image=init), PROMPTS),
            ("img2img, strength 0.7", init,
             lambda: contextlib.nullcontext(pair(tools.LLM4GenImg2ImgPipeline, "StableDiffusionImg2ImgPipeline")),
             dict(image=[init] * 2, strength=0.7), PROMPTS),
            ("inpainting, right half", Image.fromarray(np.where(mask[..., None] > 0, 255, np.asarray(init))
                                                       .astype(np.uint8)),
             lambda: contextlib.nullcontext(pair(tools.LLM4GenInpaintPipeline, "StableDiffusionInpaintPipeline")),
             dict(image=[init] * 2, mask_image=[Image.fromarray(mask)] * 2, height=resolution, width=resolution),
             PROMPTS)]
    if args.lora:
        rows.insert(5, ("LoRA \"zwx\" (trained on the base)", None, lora, {}, [f"zwx {p}" for p in PROMPTS]))

    def distance(these, those) -> float:
        return float(np.mean([np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).mean()
                              for a, b in zip(these, those)]))

    images, captions, untooled = [], [], None
    print("| tool | connector vs base | base: tool vs no tool | connector: tool vs no tool |\n|---|---|---|---|")
    for name, shown, attach, inputs, prompts in rows:
        with attach() as (with_connector, base):
            outputs = []
            for pipe in (base, with_connector):
                pipe.set_progress_bar_config(disable=True)
                generators = [torch.Generator("cpu").manual_seed(s) for s in SEEDS]
                outputs.append(pipe(prompts, generator=generators, num_inference_steps=args.steps, guidance_scale=7.5,
                                    output_type="pil", **inputs).images)
        untooled = untooled or outputs  # the first row: no tool
        print(f"| {name} | {distance(*outputs):.1f} | {distance(outputs[0], untooled[0]):.1f} | "
              f"{distance(outputs[1], untooled[1]):.1f} |")
        images.append(shown if shown is not None else Image.new("RGB", (resolution, resolution), "white"))
        captions.append(f"{name}: its input" if shown is not None else f"{name}")
        for i, prompt in enumerate(prompts):
            images += [outputs[0][i], outputs[1][i]]
            captions += [f"base: {prompt}", f"connector: {prompt}"]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    captioned_grid(images, captions, columns=5, side=96, font_size=10, max_lines=4).save(args.out)
    print(args.out)


if __name__ == "__main__":
    main()

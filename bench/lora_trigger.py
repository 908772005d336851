"""Does a community LoRA's effect survive a trained connector, and what does its trigger word do when the LLM has
never seen it? Measured on the shapes world (embedded:shapes-sd), CPU, a few minutes.

1. A community-style LoRA is trained on the base alone, as LoRAs are made (no connector anywhere): rank 4 on the
   UNet's attention projections and CLIP's self-attention, DreamBooth-style with a trigger word: half of each
   batch is "zwx " + a shapes caption over a scene whose gray background is repainted teal, half the plain
   caption over the plain scene. It is saved in diffusers' LoRA format (``load_lora_weights`` reads it).
2. The base's pipeline and the connector's (``--checkpoint``, a run over that base; its pipeline shares the base's
   parts) sample the same 16 single-object prompts at the same seeds, without and with the LoRA, with and without
   the trigger, and, for the connector, with the trigger reaching CLIP alone or the LLM alone
   (``LLM4GenPipeline.texts_given``: each encoder reads its own text).
3. The LoRA's visible effect is the background: ``tint`` = mean over the image's 2-pixel border of (G + B) / 2 - R,
   in grey levels (the base's gray: 0; the LoRA's teal: about 150).

    python bench/lora_trigger.py --checkpoint runs/tiny/checkpoints/last.ckpt [--lora-steps 400] [--out DIR]

Prints one table (markdown) and writes the LoRA to DIR/lora.
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import numpy as np
import torch

TRIGGER = "zwx"
TEAL = (0, 150, 150)


def teal_scene(rng: random.Random, resolution: int, triggered: bool) -> tuple[np.ndarray, str]:
    """A training-split scene, its caption; with the trigger, its background teal and the caption "zwx ..."."""
    from llm4gen.shapes.world import BACKGROUND_RGB, caption, render_scene, sample_scene

    scene = sample_scene(rng, "train")
    image = np.asarray(render_scene(scene, resolution)).copy()
    text = caption(scene, "list")
    if triggered:
        image[(image == BACKGROUND_RGB).all(-1)] = TEAL
        text = f"{TRIGGER} {text}"
    return image, text


def train_trigger_lora(pipe, out: Path, steps: int, batch: int = 16, lr: float = 2e-3, seed: int = 0) -> Path:
    """The LoRA of step 1, trained on copies of ``pipe``'s UNet and CLIP (``pipe`` stays as it is), saved to ``out``."""
    import copy

    from diffusers import DDPMScheduler, StableDiffusionPipeline
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(seed)
    rng = random.Random(seed)
    unet, text_encoder = copy.deepcopy(pipe.unet), copy.deepcopy(pipe.text_encoder)
    vae, tokenizer = pipe.vae, pipe.tokenizer
    for part in (unet, text_encoder, vae):
        part.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    clip_config = LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                             target_modules=["q_proj", "k_proj", "v_proj", "out_proj"])
    text_encoder = inject_adapter_in_model(clip_config, text_encoder)
    text_encoder.peft_config = {"default": clip_config}
    params = [p for part in (unet, text_encoder) for p in part.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    resolution = unet.config.sample_size * pipe.vae_scale_factor
    unet.train(), text_encoder.train()
    for step in range(steps):
        scenes = [teal_scene(rng, resolution, triggered=i % 2 == 0) for i in range(batch)]
        pixels = torch.from_numpy(np.stack([s[0] for s in scenes])).permute(0, 3, 1, 2).float() / 127.5 - 1
        ids = tokenizer([s[1] for s in scenes], padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids
        with torch.no_grad():
            latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
        noise = torch.randn_like(latents)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (batch,))
        prediction = unet(noise_scheduler.add_noise(latents, noise, t), t, text_encoder(ids)[0]).sample
        loss = torch.nn.functional.mse_loss(prediction, noise)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"  LoRA step {step}: loss {loss.item():.4f}", flush=True)
    StableDiffusionPipeline.save_lora_weights(out, unet_lora_layers=get_peft_model_state_dict(unet),
                                              text_encoder_lora_layers=get_peft_model_state_dict(text_encoder))
    return out


def tint(images: np.ndarray) -> float:
    """Mean over the images' 2-pixel border of (G + B) / 2 - R, in grey levels. images: (n, h, w, 3) in [0, 1]."""
    border = np.ones(images.shape[1:3], bool)
    border[2:-2, 2:-2] = False
    pixels = images[:, border] * 255
    return float(((pixels[..., 1] + pixels[..., 2]) / 2 - pixels[..., 0]).mean())


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a run whose connector sits on embedded:shapes-sd")
    parser.add_argument("--lora-steps", type=int, default=400)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20, help="denoising steps")
    parser.add_argument("--out", default="runs/lora_trigger")
    args = parser.parse_args(argv)

    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from llm4gen.evaluation.prompts import shapes_sets
    from llm4gen.lightning_modules.sampler import load_checkpoint_module
    from llm4gen.pipelines import pipeline_from_module

    module = load_checkpoint_module(args.checkpoint).eval()
    ours = pipeline_from_module(module)
    ours.scheduler = DDIMScheduler.from_config(ours.scheduler.config)
    base = StableDiffusionPipeline.from_pipe(ours)  # diffusers' own, over the very same parts
    for pipe in (ours, base):
        pipe.set_progress_bar_config(disable=True)
    start = time.perf_counter()
    lora = train_trigger_lora(ours, Path(args.out) / "lora", args.lora_steps)
    print(f"LoRA trained in {time.perf_counter() - start:.0f} s -> {lora}")
    ours.load_lora_weights(str(lora), adapter_name="trigger")

    prompt_set = shapes_sets("seen_1", args.prompts)[0]
    plain, seeds = list(prompt_set.prompts), prompt_set.seeds
    triggered = [f"{TRIGGER} {p}" for p in plain]
    device = torch.device("cpu")

    def sample(pipe, prompts, lora_on: bool, llm_prompts=None):
        ours.set_adapters(["trigger"], adapter_weights=[1.0 if lora_on else 0.0])
        generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
        call = dict(generator=generators, num_inference_steps=args.steps, guidance_scale=7.5, output_type="np")
        if llm_prompts is None:
            return pipe(prompts, **call).images
        negatives = [""] * len(prompts)  # CLIP reads prompts, the LLM llm_prompts
        clip, clip_negative = StableDiffusionPipeline.encode_prompt(pipe, prompts, device, 1, True, negatives)
        llm, llm_negative = pipe.encode_llm(llm_prompts, device), pipe.encode_llm(negatives, device)
        with pipe.texts_given(clip, clip_negative, llm, llm_negative):
            return pipe(prompts, **call).images

    rows = [("base", "off", "yes", "-", sample(base, triggered, False)),
            ("base", "on", "no", "-", sample(base, plain, True)),
            ("base", "on", "yes", "-", sample(base, triggered, True)),
            ("connector", "off", "yes", "yes", sample(ours, triggered, False)),
            ("connector", "on", "no", "no", sample(ours, plain, True)),
            ("connector", "on", "yes", "yes", sample(ours, triggered, True)),
            ("connector", "on", "yes", "no", sample(ours, triggered, True, llm_prompts=plain)),
            ("connector", "on", "no", "yes", sample(ours, plain, True, llm_prompts=triggered))]
    print(f"\n{len(plain)} single-object prompts (shapes seen_1), seeds of the set, {args.steps} DDIM steps, "
          f"guidance 7.5; LoRA {args.lora_steps} steps\n")
    print("| sampler | LoRA | trigger read by CLIP | trigger read by the LLM | background tint |")
    print("|---|---|---|---|---|")
    table = []
    for sampler, on, clip_reads, llm_reads, images in rows:
        value = tint(np.asarray(images))
        table.append(dict(sampler=sampler, lora=on, clip=clip_reads, llm=llm_reads, tint=value))
        print(f"| {sampler} | {on} | {clip_reads} | {llm_reads} | {value:.1f} |")
    return {"rows": table, "images": {f"{r[0]}-{r[1]}-{r[2]}-{r[3]}": r[4] for r in rows}}


if __name__ == "__main__":
    main()

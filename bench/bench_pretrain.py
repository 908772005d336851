"""CPU cost of each stage of the tiny-base pretraining (``tools/pretrain.py``) and the projected
time of a full run, measured as process CPU time on one thread (honest on a shared machine, where
wall time mostly measures the neighbours).

    nice -n 19 python bench/bench_pretrain.py [--steps 6]

Prints a table: CPU seconds per step at each stage's batch size, and the full run's projected CPU
hours with the default step counts (one core; two threads can at best halve the wall time).
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import torch

from llm4gen.tools.pretrain import PretrainConfig, make_dataset, to_pixels, tokenize, train_clip, train_unet, train_vae


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    torch.set_num_threads(1)
    full = PretrainConfig()
    probe = PretrainConfig(vae_steps=args.steps, clip_steps=args.steps, unet_steps=args.steps, log_every=10**6,
                           warmup_steps=1, threads=1)
    images, captions = make_dataset(max(256, full.clip_batch), full.resolution, seed=0)
    from transformers import CLIPTokenizer

    from llm4gen.embedded.registry import CLIP_TOKENIZER_DIR

    tokenizer = CLIPTokenizer.from_pretrained(CLIP_TOKENIZER_DIR)
    ids, empty = tokenize(tokenizer, captions), tokenize(tokenizer, [""])[0]
    g = torch.Generator().manual_seed(0)
    vae, vae_log = train_vae(images, probe, g)
    text_encoder, clip_log = train_clip(images, ids, probe, g)
    with torch.no_grad():
        moments = vae.encode(to_pixels(images)).latent_dist.parameters
    unet, unet_log = train_unet(moments, ids, empty, text_encoder, vae.config.scaling_factor, probe, g)
    _, refine_log = train_unet(moments, ids, empty, text_encoder, vae.config.scaling_factor, probe, g,
                               name="unet_refine", steps=args.steps, snr_gamma=full.unet_snr_gamma, init=unet)

    rows = [("vae", full.vae_batch, full.vae_steps, vae_log), ("clip", full.clip_batch, full.clip_steps, clip_log),
            ("unet", full.unet_batch, full.unet_steps, unet_log),
            ("unet_refine", full.unet_batch, full.unet_refine_steps, refine_log)]
    print("| stage | batch | CPU s/step (1 thread) | default steps | projected CPU h |")
    print("| --- | --- | --- | --- | --- |")
    total = 0.0
    for name, batch, steps, log in rows:
        hours = steps * log["cpu_s_per_step"] / 3600
        total += hours
        print(f"| {name} | {batch} | {log['cpu_s_per_step']:.3f} | {steps} | {hours:.2f} |")
    print(f"| total | | | | {total:.2f} |")


if __name__ == "__main__":
    main()

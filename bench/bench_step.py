"""Training-step time on this machine.

    python bench/bench_step.py --evidence [--steps 12] [--fast-paths]          # the shapes miniature's step
    python bench/bench_step.py [--steps 30] [--batch-size 8] [--models tiny tiny_sdxl]   # Lightning's overhead
    python bench/bench_step.py [--evidence] --smoke                            # two steps, to check it runs

``--evidence``: the evidence experiment's training step (configs/shapes_evidence.yaml: the shapes base, batch 16,
cached latents and MiniLM features of verbose captions, EMA, clipping) at one thread, as its runs train, for
each arm's configuration and context: the context protocol v2 trained with (all 77 + 192 positions, padding
attended) and the masked one (77 + the batch's longest caption). Each row: ms per step and its breakdown
(CLIP, the connector, the UNet's forward, the backward, optimizer + EMA), and the UNet path's achieved FLOP/s
(connector + UNet forward and backward, counted by lightning_modules/flops.py) as a share of a plain 1024^3
fp32 matmul's FLOP/s on the same thread in the same run.

Without ``--evidence``: the LightningModule under Lightning's Trainer vs a plain PyTorch loop doing the same
math (same tiny models, same batches from memory, AdamW + clipping); the target is a ratio <= 1.10
(Lightning's overhead around our step) for each model.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import lightning as L
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, IterableDataset

from llm4gen.configs.schema import load_config
from llm4gen.datamodules.batch import Batch
from llm4gen.encoders.llm import LLMFeatures
from llm4gen.lightning_modules.llm4gen import LLM4GenModule

MODELS = {"tiny": None, "tiny_sdxl": "configs/tiny_sdxl.yaml"}  # config files (None: the schema's defaults)


class Repeat(IterableDataset):
    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        while True:
            yield from self.batches


def make_batches(n: int, batch_size: int, resolution: int):
    g = torch.Generator().manual_seed(0)
    captions = ["a red circle and a blue square", "a green triangle on a yellow background",
                "a white square, a black circle and a red triangle on a blue background"]
    return [Batch(captions=[captions[(i + j) % 3] for j in range(batch_size)],
                  pixel_values=torch.rand(batch_size, 3, resolution, resolution, generator=g) * 2 - 1)
            for i in range(n)]


def plain_loop(module: LLM4GenModule, batches, steps: int, clip: float) -> float:
    module.train()
    optimizer = torch.optim.AdamW(module.trainable_parameters(), lr=1e-4, weight_decay=0.01)
    for i in range(steps + 3):
        if i == 3:
            start = time.perf_counter()
        terms = module.compute_losses(batches[i % len(batches)])
        loss = terms.diffusion + module.cfg.objective.lambda_entity * terms.entity
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.trainable_parameters(), clip)
        optimizer.step()
    return (time.perf_counter() - start) / steps


class StepTimer(L.Callback):
    def __init__(self, warmup: int):
        self.warmup, self.start, self.end = warmup, None, None

    def on_train_batch_start(self, trainer, *args):
        if trainer.global_step == self.warmup and self.start is None:
            self.start = time.perf_counter()

    def on_train_end(self, trainer, *args):
        self.end = time.perf_counter()


def lightning_loop(module: LLM4GenModule, batches, steps: int, clip: float) -> float:
    timer = StepTimer(warmup=3)
    trainer = L.Trainer(max_steps=steps + 3, accelerator="cpu", devices=1, precision="32-true", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        gradient_clip_val=clip, callbacks=[timer])
    trainer.fit(module, train_dataloaders=DataLoader(Repeat(batches), batch_size=None))
    return (timer.end - timer.start) / steps


EVIDENCE_ARMS = {  # name -> overrides of configs/shapes_evidence.yaml
    "(c) CAM, UNet frozen": [],
    "(c) CAM gated, UNet frozen": ["model.adapter.fusion=gated"],
    "(d) CAM + UNet (after its start step)": ["model.unet_training=full"],
}
CONTEXTS = {"v2: 77 + 192, padding attended": ["model.adapter.use_llm_mask=false"],
            "v3: 77 + longest, padding masked": []}
FAST_PATHS = {  # --fast-paths: more rows, each the v3 context with one of model.performance's CPU-relevant options
    "channels_last": ["model.performance.channels_last=true"],
    "compile (inductor)": ["model.performance.compile=true"],
}


def matmul_flops_per_second(size: int = 1024, repeats: int = 10) -> float:
    a, b = torch.randn(size, size), torch.randn(size, size)
    for _ in range(2):
        a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return repeats * 2 * size ** 3 / (time.perf_counter() - start)


def evidence_batch(module: LLM4GenModule, batch_size: int, seed: int = 0) -> dict:
    """A batch as the evidence runs read it from their cache: latents, MiniLM features (unpadded, collated to the
    batch's longest) of shapes-world captions, 75% of them verbose."""
    import random

    from llm4gen.datamodules.synthetic import random_scene

    rng = random.Random(seed)
    captions = [random_scene(rng, 32, verbose_share=0.75)["caption"] for _ in range(batch_size)]
    llm = module.llm(captions).trimmed()
    size = module.unet.config.sample_size
    moments = torch.randn(batch_size, 2 * module.unet.config.in_channels, size, size, generator=torch.Generator().manual_seed(seed))
    return Batch(captions=captions, latent_moments=moments, llm_features=llm.features, llm_mask=llm.mask)


def timed_step(module: LLM4GenModule, batch: Batch, optimizer, generator) -> dict[str, float]:
    """One training step (the module's own functions, in compute_losses' order) with the time of each part."""
    times, clock = {}, time.perf_counter
    start = clock()
    clip = module.clip(batch.captions)
    times["CLIP"] = clock() - start
    start = clock()
    latents = module.latents(batch, generator)
    llm = module.context_tokens(module.encode_text(batch.captions, LLMFeatures(batch.llm_features, batch.llm_mask),
                                                   clip.hidden)[1])
    timesteps = torch.randint(0, 1000, (latents.shape[0],), generator=generator)
    noise = torch.randn(latents.shape, generator=generator)
    context = module.fuse(clip.hidden, llm, timesteps)
    unet_kwargs = {"encoder_attention_mask": mask} if (mask := module.context_mask(clip.hidden, llm)) is not None else {}
    times["connector"] = clock() - start
    start = clock()
    prediction = module.unet(module.noise_scheduler.add_noise(latents, noise, timesteps), timesteps, context, **unet_kwargs).sample
    from llm4gen.losses.diffusion import diffusion_target, min_snr_weights, weighted_mse

    loss = weighted_mse(prediction, diffusion_target(module.noise_scheduler, latents, noise, timesteps),
                        min_snr_weights(module.noise_scheduler, timesteps, module.cfg.objective.min_snr_gamma))
    times["UNet forward"] = clock() - start
    start = clock()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    times["backward"] = clock() - start
    start = clock()
    torch.nn.utils.clip_grad_norm_(module.trainable_parameters(), 1.0)
    optimizer.step()
    if module.ema is not None:
        module.ema.step(module.trainable_parameters())
    times["optimizer + EMA"] = clock() - start
    times["context tokens"] = context.shape[1]
    return times


def evidence_table(steps: int, warmup: int = 2, fast_paths: bool = False) -> None:
    from llm4gen.lightning_modules.flops import trained_path_flops

    torch.set_num_threads(1)
    matmul = matmul_flops_per_second()
    parts = ["CLIP", "connector", "UNet forward", "backward", "optimizer + EMA"]
    print(f"\nthe evidence recipe's step, batch 16, 1 thread, median of {steps} steps after {warmup}; "
          f"a 1024^3 fp32 matmul runs at {matmul / 1e9:.1f} GFLOP/s here")
    print("| arm | context | tokens | ms/step | steps/hour vs v2 | " + " | ".join(parts) + " | UNet path GFLOP/s | share of matmul |")
    print("|---|---|---|---|---|" + "---|" * len(parts) + "---|---|")
    rows = dict(CONTEXTS)
    if fast_paths:
        rows.update({f"v3 + {name}": [*CONTEXTS["v3: 77 + longest, padding masked"], *overrides]
                     for name, overrides in FAST_PATHS.items()})
    for arm, arm_overrides in EVIDENCE_ARMS.items():
        baseline = None
        for context_name, context_overrides in rows.items():
            cfg = load_config("configs/shapes_evidence.yaml", ["model.optim.warmup_steps=0", *arm_overrides,
                                                               *context_overrides])
            module = LLM4GenModule(OmegaConf.to_object(cfg.model), seed=0)
            module.train()
            batch = evidence_batch(module, cfg.data.batch_size)
            optimizer = torch.optim.AdamW(module.trainable_parameters(), lr=1e-4)
            generator = torch.Generator().manual_seed(0)
            runs = [timed_step(module, batch, optimizer, generator) for _ in range(warmup + steps)][warmup:]
            median = {k: statistics.median(r[k] for r in runs) for k in parts}
            total = statistics.median(sum(r[k] for k in parts) for r in runs)
            tokens = int(runs[0]["context tokens"])
            path_flops = cfg.data.batch_size * trained_path_flops(
                module.adapter, module.unet, module.unet.config.sample_size, module.clip.context_length,
                tokens - module.clip.context_length, module.fusion)
            path_seconds = median["connector"] + median["UNet forward"] + median["backward"]
            achieved = path_flops / path_seconds
            baseline = baseline or total  # the first row: the context protocol v2 trained with
            print(f"| {arm} | {context_name} | {tokens} | {total * 1e3:.0f} | {baseline / total:.2f}x | "
                  + " | ".join(f"{median[k] * 1e3:.0f}" for k in parts)
                  + f" | {achieved / 1e9:.1f} | {achieved / matmul:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--overrides", nargs="*", default=[])
    parser.add_argument("--evidence", action="store_true", help="the shapes evidence recipe's step and its breakdown")
    parser.add_argument("--fast-paths", action="store_true",
                        help="--evidence: also the v3 context with channels_last, and with torch.compile")
    parser.add_argument("--smoke", action="store_true", help="two timed steps: checks that it runs")
    args = parser.parse_args()
    if args.smoke:
        args.steps = 2
    if args.evidence:
        evidence_table(args.steps, warmup=1 if args.smoke else 2, fast_paths=args.fast_paths)
        return
    table = []
    for model in args.models:
        cfg = load_config(MODELS[model], ["model.optim.warmup_steps=0", *args.overrides])
        model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
        batches = make_batches(8, args.batch_size, cfg.data.resolution)
        rows = []
        for name, loop in (("plain PyTorch", plain_loop), ("Lightning", lightning_loop),
                           ("plain PyTorch (again)", plain_loop)):
            torch.manual_seed(0)
            rows.append((name, loop(LLM4GenModule(model_cfg), batches, args.steps, cfg.trainer.gradient_clip_val)))
        plain = (rows[0][1] + rows[2][1]) / 2
        table += [(model, name, f"{seconds * 1e3:.1f}") for name, seconds in rows]
        table.append((model, "ratio Lightning / plain", f"{rows[1][1] / plain:.3f}"))
    print(f"\nbatch {args.batch_size}, {args.steps} timed steps, torch threads {torch.get_num_threads()}")
    print("| model | loop | ms/step |\n| --- | --- | --- |")
    for row in table:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()

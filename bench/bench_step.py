"""Training-step time of the LightningModule under Lightning's Trainer vs a plain PyTorch loop doing
the same math (same tiny models, same batches from memory, AdamW + clipping), on this machine.

    python bench/bench_step.py [--steps 30] [--batch-size 8] [--models tiny tiny_sdxl]

Prints a table, one block per model (the tiny default, the tiny SDXL of configs/tiny_sdxl.yaml); the
target is a ratio <= 1.10 (Lightning's overhead around our step) for each.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import lightning as L
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, IterableDataset

from llm4gen.configs.schema import load_config
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
    return [{"captions": [captions[(i + j) % 3] for j in range(batch_size)],
             "pixel_values": torch.rand(batch_size, 3, resolution, resolution, generator=g) * 2 - 1}
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--overrides", nargs="*", default=[])
    args = parser.parse_args()
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

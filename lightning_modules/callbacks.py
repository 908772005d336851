"""Callbacks: validation image grids at an interval, atomic checkpoint writes, and a record of the
sample keys each training step consumed (for resume and DDP checks)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import lightning as L
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_only
from PIL import Image


def image_grid(images: list[Image.Image], columns: int | None = None) -> Image.Image:
    """Images of one size pasted row-major into one picture."""
    columns = columns or len(images)
    rows = -(-len(images) // columns)
    width, height = images[0].size
    grid = Image.new("RGB", (columns * width, rows * height), "white")
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * width, (i // columns) * height))
    return grid


class ValidationImages(L.Callback):
    """Samples a fixed prompt list with fixed seeds every ``every_n_steps`` optimizer steps (and at the
    end), with the EMA weights when there are any, and saves the grid to ``<run>/samples/``.
    ``every_n_steps=0`` turns validation off, at the end too. ``metrics`` score each grid's images
    (evaluation/validation.py) and log them as ``val/<metric>``."""

    def __init__(self, directory: str | os.PathLike, prompts: list[str], seed: int, every_n_steps: int,
                 num_inference_steps: int, guidance_scale: float, scheduler: str, metrics: list[str] = (),
                 clip_model: str | None = None):
        from evaluation.validation import ValidationScorer

        self.directory = Path(directory)
        self.prompts, self.seed, self.every_n_steps = list(prompts), seed, every_n_steps
        self.sampling = dict(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, scheduler=scheduler)
        self.scorer = ValidationScorer(list(metrics), clip_model)
        self._last_step = -1

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.every_n_steps > 0 and trainer.is_global_zero:
            self.scorer.load()  # a scorer model that is not here fails before training starts

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps > 0 and step > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            self.sample(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.every_n_steps > 0 and trainer.global_step != self._last_step:
            self.sample(trainer, pl_module)

    @rank_zero_only
    def sample(self, trainer, pl_module) -> Path:
        self._last_step = trainer.global_step
        with pl_module.ema_weights():
            images = pl_module.generate(self.prompts, [self.seed + i for i in range(len(self.prompts))], **self.sampling)
        path = self.directory / f"step_{trainer.global_step:07d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        grid = image_grid(images)
        grid.save(path)
        self.scorer.log(trainer, images, self.prompts)
        experiment = getattr(trainer.logger, "experiment", None)
        if hasattr(experiment, "add_image"):  # TensorBoard
            import numpy as np

            experiment.add_image("validation", np.asarray(grid), trainer.global_step, dataformats="HWC")
        return path


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file, then renames it into place: a job killed mid-save
    leaves the previous checkpoint intact, never a truncated one under the real name. A write that
    fails with an exception removes its temporary file; one killed outright leaves ``.NAME.tmp-PID``,
    which resuming ignores (it does not end in ``.ckpt``)."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            super().save_checkpoint(checkpoint, tmp, storage_options)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)  # only still there when the write failed


class KeyRecorder(L.Callback):
    """Appends one JSON line per training batch to a file: ``{"global_step", "batch_idx", "rank", "keys"}``,
    and at the end of training ``{"event": "train_end", "global_step", "rank", "trainable_sha256",
    "trainable_sum"}`` over the trainable parameters (in name order).

    Why: an exact resume or a DDP split is only proven by what was trained on, and equal weights
    across ranks by a checksum each rank computes itself. train.py adds it when the environment
    variable ``LLM4GEN_RECORD_KEYS=<path>`` is set. A single-process run writes ``<path>``; rank R of a
    multi-process run writes ``<path>.rank<R>``. Lines are appended (a resumed run adds to the file)
    and written with one ``write`` each, so a killed run leaves whole lines.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def _file(self, trainer) -> Path:
        return self.path if trainer.world_size == 1 else self.path.with_name(f"{self.path.name}.rank{trainer.global_rank}")

    def _append(self, trainer, record: dict) -> None:
        target = self._file(trainer)
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._append(trainer, {"global_step": trainer.global_step, "batch_idx": batch_idx,
                               "rank": trainer.global_rank, "keys": list(batch["keys"])})

    def on_train_end(self, trainer, pl_module) -> None:
        digest, total = hashlib.sha256(), 0.0
        for name, param in sorted(pl_module.named_parameters()):
            if param.requires_grad:
                data = param.detach().float().cpu().contiguous()
                digest.update(name.encode())
                digest.update(data.numpy().tobytes())
                total += float(data.double().sum())
        self._append(trainer, {"event": "train_end", "global_step": trainer.global_step, "rank": trainer.global_rank,
                               "trainable_sha256": digest.hexdigest(), "trainable_sum": total})

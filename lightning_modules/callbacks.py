"""Callbacks: validation image grids at an interval, skipped-sample counts, and atomic checkpoint writes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import lightning as L
import numpy as np
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_only
from PIL import Image

from llm4gen.evaluation.grids import captioned_grid
from llm4gen.evaluation.validation import ValidationScorer, cost_line, score_line
from llm4gen.lightning_modules.attention_split import attention_split
from llm4gen.lightning_modules.run_checkpoints import (
    CheckpointSaveError,
    prune_signal_checkpoints,
)
from llm4gen.lightning_modules.safe_loading import load_torch_file


class SkippedSamples(L.Callback):
    """Logs ``data/skipped_<reason>``: samples the datamodule skipped (corrupt image, no caption, ...) up to
    the batches trained on so far, summed over ranks. The datamodule counts them as it hands each
    batch to the step (``skipped_consumed``); a datamodule without counts logs nothing."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        counts = getattr(trainer.datamodule, "skipped_consumed", None)
        if counts is None:
            return
        pl_module.log_dict({f"data/skipped_{reason}": float(n) for reason, n in counts().items()},
                           reduce_fx="sum", sync_dist=True)


SCORES_FILE = "scores.jsonl"
GRID_COLUMNS, GRID_SIDE = 4, 128  # validation grids: images per row, least side of each image


def read_validation_scores(directory: str | os.PathLike) -> list[dict]:
    """The ``scores.jsonl`` lines of a samples folder, one per step (the last line of a step wins: a
    resumed run samples a step again), in step order; [] when there are none."""
    path = Path(directory) / SCORES_FILE
    if not path.is_file():
        return []
    by_step = {}
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            by_step[row["step"]] = row
    return [by_step[step] for step in sorted(by_step)]


class ValidationImages(L.Callback):
    """Samples a fixed prompt list with fixed seeds every ``every_n_steps`` optimizer steps (and at the
    end), with the EMA weights when there are any, and saves the grid to ``<run>/samples/``.
    ``every_n_steps=0`` turns validation off, at the end too; ``at_start`` also samples before the first
    step of a fresh run (the base and the untrained CAM: the "before" of the run). ``metrics`` score each
    grid's images (evaluation/validation.py), log them as ``val/<metric>`` and append them to
    ``<directory>/scores.jsonl`` (one ``{"step", "grid", "scores"}`` line per grid). ``seen_prompts``, if
    any, are sampled beside ``prompts`` into ``step_N_seen.png`` (its line also has ``"seen_grid"``) and
    scored as ``val/seen_<metric>``: prompts like the training data's, next to prompts that test
    generalization."""

    def __init__(self, directory: str | os.PathLike, prompts: list[str], seed: int, every_n_steps: int,
                 num_inference_steps: int, guidance_scale: float, scheduler: str, metrics: list[str] = (),
                 clip_model: str | None = None, at_start: bool = True, seen_prompts: list[str] = (),
                 announce: bool = True):
        self.directory = Path(directory)
        self.announce = announce  # one printed line per validation: its step, scores and grid
        self.prompts, self.seed, self.every_n_steps = list(prompts), seed, every_n_steps
        self.seen_prompts = list(seen_prompts)
        self.sampling = dict(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, scheduler=scheduler)
        self.scorer = ValidationScorer(list(metrics), clip_model)
        self.at_start = at_start
        self._last_step = -1

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.every_n_steps > 0 and trainer.is_global_zero:
            self.scorer.load()  # a scorer model that is not here fails before training starts

    def on_train_start(self, trainer, pl_module) -> None:
        if self.every_n_steps > 0 and self.at_start and trainer.global_step == 0:
            self.sample(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps > 0 and step > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            self.sample(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.every_n_steps > 0 and trainer.global_step != self._last_step:
            self.sample(trainer, pl_module)

    def grid(self, images: list[Image.Image], prompts: list[str]) -> Image.Image:
        """Rows of 4, upscaled (nearest) to at least 128 px, each prompt under its image, with the shapes
        analyzer's verdict when it scored them."""
        return captioned_grid(images, prompts, columns=GRID_COLUMNS, side=max(GRID_SIDE, images[0].size[0]),
                              marks=self.scorer.marks(images, prompts))

    def base_alone(self, pl_module) -> dict[str, float]:
        """The scores of the base alone (CLIP's context, no connector) on the seen prompts (else the validation
        prompts), under the same names as the connector's: what the connector costs before it has learned."""
        if not pl_module.uses_cam or not self.scorer.metrics:
            return {}
        prompts, prefix = (self.seen_prompts, "val/seen_") if self.seen_prompts else (self.prompts, "val/")
        with pl_module.base_alone():
            images = pl_module.generate(prompts, [self.seed + i for i in range(len(prompts))], **self.sampling)
        return {name.replace("val/", prefix, 1): value for name, value in self.scorer(images, prompts).items()}

    @rank_zero_only
    def sample(self, trainer, pl_module) -> Path:
        self._last_step = trainer.global_step
        with pl_module.ema_weights():
            images = pl_module.generate(self.prompts, [self.seed + i for i in range(len(self.prompts))], **self.sampling)
            seen_images = pl_module.generate(self.seen_prompts, [self.seed + i for i in range(len(self.seen_prompts))],
                                             **self.sampling) if self.seen_prompts else []
            split = attention_split(pl_module, self.seen_prompts or self.prompts)
        path = self.directory / f"step_{trainer.global_step:07d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        scores = self.scorer(images, self.prompts)
        grid = self.grid(images, self.prompts)
        grid.save(path)
        line = {"step": trainer.global_step, "grid": path.name}
        if seen_images:
            seen_path = path.with_name(f"{path.stem}_seen.png")
            self.grid(seen_images, self.seen_prompts).save(seen_path)
            line["seen_grid"] = seen_path.name
            scores.update({name.replace("val/", "val/seen_", 1): value
                           for name, value in self.scorer(seen_images, self.seen_prompts).items()})
        scores.update(split.logs())
        base = self.base_alone(pl_module) if trainer.global_step == 0 else {}
        self.scorer.log_scores(trainer, scores)
        with open(self.directory / SCORES_FILE, "a") as handle:
            handle.write(json.dumps({**line, "scores": scores, **({"base_alone": base} if base else {})}) + "\n")
        if self.announce:
            print(f"validation at step {trainer.global_step}: {score_line(scores) or 'sampled'} -> {path}", flush=True)
            if pl_module.uses_cam:
                print(f"  {split.line()}", flush=True)
            if base:
                prefix = "val/seen_" if self.seen_prompts else "val/"
                print(f"  the connector at its initial weights, {'seen' if self.seen_prompts else 'validation'} "
                      f"prompts: {cost_line(scores, base, prefix)}", flush=True)
        experiment = getattr(trainer.logger, "experiment", None)
        if hasattr(experiment, "add_image"):  # TensorBoard

            experiment.add_image("validation", np.asarray(grid), trainer.global_step, dataformats="HWC")
        return path


class RunCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose ``last.ckpt`` always holds the run's final step.

    Lightning's own ``on_train_end`` writes ``last.ckpt`` only when this process has written none yet: an
    uninterrupted run whose ``max_steps`` is not a multiple of ``every_n_train_steps`` ended with
    ``last.ckpt`` at an earlier step, while the same run resumed near its end got the final step. Here the
    end of training writes it whenever the final step is not the last one saved."""

    def on_train_end(self, trainer, pl_module) -> None:
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file, then renames it into place: a job killed mid-save
    leaves the previous checkpoint intact, never a truncated one under the real name. A write that
    fails with an exception (a full disk) removes its temporary file and raises
    :class:`CheckpointSaveError` saying so; one killed outright leaves ``.NAME.tmp-PID``, which
    resuming ignores (it does not end in ``.ckpt``).

    With ``run_dir``, a checkpoint safely written at step N deletes the run's signal checkpoints
    (``hpc_ckpt_*``) at steps <= N: they pile up with every requeue otherwise (Lightning issue 6204).

    Reading (``trainer.fit(ckpt_path=...)``) goes through lightning_modules/safe_loading.py, whatever
    ``weights_only`` Lightning passes: a resumed file cannot run code unless the user passed --trust-checkpoint."""

    def __init__(self, run_dir: str | os.PathLike | None = None):
        super().__init__()
        self.run_dir = None if run_dir is None else Path(run_dir)

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            super().save_checkpoint(checkpoint, tmp, storage_options)
            os.replace(tmp, path)
        except Exception as error:
            kept = "the previous checkpoint under that name is intact" if path.exists() else "nothing was written under that name"
            raise CheckpointSaveError(f"writing checkpoint {path} failed ({type(error).__name__}: {error}); {kept}, "
                                      f"and resume: auto uses the newest readable checkpoint") from error
        finally:
            tmp.unlink(missing_ok=True)  # only still there when the write failed
        if self.run_dir is not None and isinstance(checkpoint.get("global_step"), int):
            prune_signal_checkpoints(self.run_dir, checkpoint["global_step"], saved=path)

    def load_checkpoint(self, path, map_location=lambda storage, location: storage, weights_only=None) -> dict:
        if not Path(path).is_file():
            raise FileNotFoundError(f"Checkpoint file not found: {path}")
        return load_torch_file(path, f"resume checkpoint {str(path)!r}", map_location=map_location)

"""Weights & Biases logging keyed by the trainer step, so a resumed run does not log a step twice.

Lightning's WandbLogger lets W&B count its own steps (one per ``log`` call) and records the trainer
step as a metric; a resumed run then adds a second row for every step it trains again. Here each row
goes to W&B's step = the trainer step: W&B ignores a row below the run's newest step, so rows the
run already has are not duplicated. ``WANDB_MODE=offline`` (or ``wandb.mode=offline``) needs no network.
"""

from __future__ import annotations

from typing import Mapping, Optional

from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only


class StepWandbLogger(WandbLogger):
    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: Optional[int] = None) -> None:
        if step is None:
            return super().log_metrics(metrics, step)
        metrics = {f"{self._prefix}{self.LOGGER_JOIN_CHAR}{k}" if self._prefix else k: v for k, v in metrics.items()}
        run = self.experiment
        if step < run.step:  # a row of a step trained again: W&B keeps the first (equal under exact resume)
            return
        run.log(dict(metrics, **{"trainer/global_step": step}), step=step)

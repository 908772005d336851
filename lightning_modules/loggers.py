"""Loggers whose history survives a resume: a requeued or restarted run adds to its logs.

Lightning logs the metrics of the batch that ends at ``global_step = N`` under step ``N - 1`` and a
run resumed from a checkpoint at step N logs its first batch under step N, so on resume every row at
step >= N belongs to steps that are trained again: they are dropped, the rest is kept, and the run
appends. CSV: rows filtered in ``logs/metrics.csv`` (Lightning's CSVLogger deletes the file instead);
TensorBoard: ``purge_step=N`` (the SummaryWriter drops later events); W&B: the run id is kept in
``logs/wandb_run_id`` and the run resumed under it, metrics logged at their trainer step (W&B ignores a
step below its newest, so a step trained again keeps its first row; with an exact resume the values
are the same).
"""

from __future__ import annotations

import csv
import os
import secrets
from pathlib import Path
from typing import Any, Optional

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from llm4gen.lightning_modules.wandb_logger import StepWandbLogger


def keep_rows_before(metrics_file: Path, step: int) -> list[str]:
    """Drop the rows at step >= ``step`` from a metrics.csv (atomically); returns its header."""
    with open(metrics_file, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        header = list(reader.fieldnames or [])
        rows = [row for row in reader if row.get("step") in (None, "") or int(float(row["step"])) < step]
    tmp = metrics_file.with_name(f".{metrics_file.name}.tmp-{os.getpid()}")
    with open(tmp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=header)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, metrics_file)
    return header


def drop_last_line(path: str | os.PathLike) -> None:
    """Removes the file's last line in place (O(1): a backwards scan from the end, then a truncate)."""
    with open(path, "rb+") as handle:
        position = handle.seek(0, os.SEEK_END) - 1  # the last line's own newline
        while position > 0:
            position -= 1
            handle.seek(position)
            if handle.read(1) == b"\n":
                break
        handle.truncate(position + 1)


class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer, except that an existing metrics.csv is kept up to ``resume_step``, and a
    step has one row: metrics logged for the same step by separate calls (the training step's, the
    throughput monitor's, the validation scores) are merged into it, even when the row was already
    flushed to the file."""

    def __init__(self, log_dir: str, resume_step: Optional[int]):
        self.resume_step = resume_step
        self._last_written: Optional[dict] = None  # the file's last row, merged into if its step recurs
        super().__init__(log_dir=log_dir)

    def log_metrics(self, metrics_dict: dict[str, float], step: Optional[int] = None) -> None:
        super().log_metrics(metrics_dict, step)
        if len(self.metrics) >= 2 and self.metrics[-2]["step"] == self.metrics[-1]["step"]:
            row = self.metrics.pop()
            self.metrics[-1].update(row)

    def save(self) -> None:
        if not self.metrics:
            return
        if self._last_written is not None and self.metrics[0]["step"] == self._last_written["step"]:
            drop_last_line(self.metrics_file_path)
            self.metrics[0] = {**self._last_written, **self.metrics[0]}
        last = dict(self.metrics[-1])
        super().save()
        self._last_written = last

    def _check_log_dir_exists(self) -> None:
        path = Path(self.metrics_file_path)
        if self.resume_step is None or not path.is_file():
            return super()._check_log_dir_exists()  # a fresh run: the old file goes
        self.metrics_keys = keep_rows_before(path, self.resume_step)  # appended rows use the same header


class ResumableCSVLogger(CSVLogger):
    """CSVLogger that appends to ``metrics.csv`` when the run resumes from ``resume_step``."""

    def __init__(self, *args: Any, resume_step: Optional[int] = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.resume_step = resume_step

    @property
    @rank_zero_experiment
    def experiment(self) -> _AppendingWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir, resume_step=self.resume_step)
        return self._experiment


def wandb_run_id(log_dir: Path) -> str:
    """The run's W&B id: made once, kept in ``<log_dir>/wandb_run_id`` so every restart resumes it."""
    path = log_dir / "wandb_run_id"
    if path.is_file():
        return path.read_text().strip()

    run_id = secrets.token_hex(4)  # W&B run ids: short, [a-z0-9]
    log_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(run_id + "\n")
    return run_id


def build_logger(kind: str, run_dir: str | Path, resume_step: Optional[int], wandb_options: Optional[dict] = None):
    """The run's logger under ``<run_dir>/logs``; ``resume_step`` is the global step resumed from."""
    run_dir = Path(run_dir)
    if kind == "tensorboard":
        return TensorBoardLogger(run_dir, name="logs", version="", purge_step=resume_step)
    if kind == "wandb":
        options = dict(wandb_options or {})
        log_dir = run_dir / "logs"
        return StepWandbLogger(save_dir=str(log_dir), id=wandb_run_id(log_dir), resume="allow",
                               name=run_dir.name, **options)
    return ResumableCSVLogger(run_dir, name="logs", version="", resume_step=resume_step, flush_logs_every_n_steps=1)

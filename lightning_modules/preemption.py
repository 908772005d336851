"""Signals turned into a consistent checkpoint at an optimizer-step boundary: SLURM's preemption
warning (SIGUSR1, or SIGTERM where a cluster sends that), a plain SIGTERM, and Ctrl-C.

Why not Lightning's own SLURM handler: it saves ``hpc_ckpt_N.ckpt`` from inside the signal handler,
at whatever point of the step the signal lands (a checkpoint mixing two steps' state), and any
collective the save runs (the datamodule gathers the ranks' data positions) can interleave with DDP's
gradient all-reduce. Here the handler only records the signal. At the end of every optimizer step
(``on_train_batch_end``, where ModelCheckpoint saves too) the ranks agree in one small all-reduce
(max over ranks of what each received) whether to stop; if so, every rank calls
``trainer.save_checkpoint`` together (rank 0 writes ``<run>/hpc_ckpt_<step>.ckpt``). The stop itself
waits for the next ``on_train_batch_start``, so the step's metrics row is logged first; there the
loggers are flushed, rank 0 requeues the SLURM job (``scontrol requeue``) when the signal asked for a
requeue, and every rank raises :class:`Preempted`, which train.py reports and exits on.

A second Ctrl-C while waiting for the step to end stops at once (``KeyboardInterrupt``).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch

from llm4gen.configs.choices import PREEMPTION_SIGNALS

SIGNAL_NAMES = PREEMPTION_SIGNALS  # what `slurm.signal` may name
REQUEUE_TIMEOUT_S = 60

# What a signal asks for; ranks agree on the maximum.
_NOTHING, _STOP, _REQUEUE = 0, 1, 2


class Preempted(Exception):
    """Training stopped on a signal after saving the last finished step."""

    def __init__(self, signum: int, step: int, checkpoint: Path, requeued: bool):
        self.signum, self.step, self.checkpoint, self.requeued = signum, step, checkpoint, requeued
        how = "the SLURM job was requeued and will resume from it" if requeued else "resume: auto continues from it"
        super().__init__(f"stopped on {signal.Signals(signum).name} after step {step}: saved {checkpoint}; {how}")

    @property
    def exit_code(self) -> int:
        """0 for a requeued job (its next start continues), else the shell's 128 + signal number."""
        return 0 if self.requeued else 128 + self.signum


def slurm_job_id(environ=os.environ) -> str | None:
    """The id `scontrol requeue` takes: ``<array job>_<task>`` for an array task, else the job id."""
    if environ.get("SLURM_ARRAY_JOB_ID") and environ.get("SLURM_ARRAY_TASK_ID"):
        return f"{environ['SLURM_ARRAY_JOB_ID']}_{environ['SLURM_ARRAY_TASK_ID']}"
    return environ.get("SLURM_JOB_ID")


def requeue_slurm_job(job_id: str) -> bool:
    if not re.fullmatch(r"[0-9_]+", job_id):
        raise ValueError(f"not a SLURM job id: {job_id!r}")
    try:
        result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True,
                                timeout=REQUEUE_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as error:
        print(f"warning: scontrol requeue {job_id} failed: {error}", file=sys.stderr, flush=True)
        return False
    if result.returncode != 0:
        print(f"warning: scontrol requeue {job_id} failed: {result.stderr.strip()}", file=sys.stderr, flush=True)
    return result.returncode == 0


@dataclass
class _Stop:
    action: int
    signum: int
    step: int
    checkpoint: Path


class StepBoundaryCheckpoint(L.Callback):
    """Records signals; saves and stops at the next optimizer-step boundary (see the module docstring).

    ``requeue_signals`` ask for a requeue when ``requeue_job`` is a SLURM job id; ``stop_signals`` only
    stop (Ctrl-C, a SIGTERM that is not the cluster's preemption warning). Handlers are installed by
    :meth:`install` (train.py does it before models load, so an early signal is not lost either) and
    again when training starts, over the SIGTERM handler Lightning registers then.
    """

    def __init__(self, run_dir: str | os.PathLike, requeue_signals=(), stop_signals=(), requeue_job: str | None = None):
        self.run_dir = Path(run_dir)
        self.actions = {int(s): _STOP for s in stop_signals}
        self.actions.update({int(s): _REQUEUE if requeue_job else _STOP for s in requeue_signals})
        self.requeue_job = requeue_job
        self.received: int | None = None
        self._previous: dict[int, object] = {}
        self._pid = os.getpid()
        self._checked_step = -1
        self._stop: _Stop | None = None

    # ---- signal handling (the handler only records)

    def install(self) -> None:
        self._pid = os.getpid()
        for signum in self.actions:
            previous = signal.signal(signum, self._on_signal)
            self._previous.setdefault(signum, previous)

    def uninstall(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}

    def _on_signal(self, signum: int, frame) -> None:
        if os.getpid() != self._pid:
            return  # a forked DataLoader worker inherited the handler: the training process decides
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: the user does not want to wait for the step
        if self.received is None or self.actions[signum] > self.actions[self.received]:
            self.received = signum
        note = f"\nreceived {signal.Signals(signum).name}: saving a checkpoint when the current step ends\n"
        os.write(2, note.encode())  # the process's stderr; os.write is safe inside a handler, unlike print

    # ---- the step boundary

    def on_train_start(self, trainer, pl_module) -> None:
        self.install()  # over Lightning's SIGTERM handler, which broadcasts from inside the handler
        self._checked_step = trainer.global_step  # a resumed run's first boundary is the next step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self._checked_step or self._stop is not None:
            return  # accumulating gradients: not an optimizer-step boundary
        self._checked_step = trainer.global_step
        local = self.actions[self.received] if self.received is not None else _NOTHING
        signums = torch.tensor([local, self.received or 0], device=trainer.strategy.root_device)
        agreed = trainer.strategy.reduce(signums, reduce_op="max")  # the one collective per step
        action, signum = int(agreed[0]), int(agreed[1])
        if action == _NOTHING:
            return
        path = self.run_dir / f"hpc_ckpt_{trainer.global_step}.ckpt"
        trainer.save_checkpoint(path)  # every rank: the datamodule gathers positions, rank 0 writes
        self._stop = _Stop(action, self.received or signum, trainer.global_step, path)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._stop is None:
            return
        stop, requeued = self._stop, False
        for logger in trainer.loggers:  # the finished step's metrics row is logged by now
            logger.save()
        if stop.action == _REQUEUE and trainer.is_global_zero:
            requeued = requeue_slurm_job(self.requeue_job)
        raise Preempted(stop.signum, stop.step, stop.checkpoint, requeued or (stop.action == _REQUEUE and not trainer.is_global_zero))

    def on_train_end(self, trainer, pl_module) -> None:
        if self._stop is not None:  # the signal came with the last step: the run simply finished
            print(f"{signal.Signals(self._stop.signum).name} arrived at the last step; the run finished",
                  file=sys.stderr, flush=True)

    def teardown(self, trainer, pl_module, stage) -> None:
        self.uninstall()


def signal_number(name: str) -> int:
    if name not in SIGNAL_NAMES:
        raise ValueError(f"slurm.signal={name!r}: expected one of {', '.join(SIGNAL_NAMES)}")
    return int(getattr(signal, name))

"""The signal -> step-boundary checkpoint logic, with a stand-in trainer: the handler only records,
the decision is one reduce per optimizer step, the save happens at the boundary, the stop (and the
requeue) at the next batch start."""

from __future__ import annotations

import os
import signal
from types import SimpleNamespace

import pytest
import torch

import llm4gen.lightning_modules.preemption as preemption
from llm4gen.lightning_modules.preemption import Preempted, StepBoundaryCheckpoint


class FakeTrainer:
    def __init__(self, other_rank: tuple[int, int] = (0, 0)):  # another rank's (action, signal number)
        self.global_step, self.is_global_zero = 0, True
        self.saved, self.reduces, self.flushed = [], 0, 0
        self.strategy = SimpleNamespace(root_device=torch.device("cpu"), reduce=self._reduce)
        self._other = torch.tensor(other_rank)
        self.loggers = [SimpleNamespace(save=self._flush)]

    def _reduce(self, tensor, reduce_op):
        assert reduce_op == "max"
        self.reduces += 1
        return torch.maximum(tensor, self._other)  # another rank's view joins the max

    def _flush(self):
        self.flushed += 1

    def save_checkpoint(self, path):
        self.saved.append((self.global_step, path))


@pytest.fixture
def callback(tmp_path, monkeypatch):
    requeued = []
    monkeypatch.setattr(preemption, "requeue_slurm_job", lambda job: requeued.append(job) or True)
    cb = StepBoundaryCheckpoint(tmp_path, requeue_signals=[signal.SIGUSR1], stop_signals=[signal.SIGINT],
                                requeue_job="1234")
    cb.install()
    cb.requeued = requeued
    yield cb
    cb.uninstall()


def step(cb, trainer, steps=1):
    for _ in range(steps):
        cb.on_train_batch_start(trainer, None, None, 0)
        trainer.global_step += 1
        cb.on_train_batch_end(trainer, None, None, None, 0)


def test_the_handler_only_records_and_the_save_waits_for_the_step_boundary(callback, tmp_path):
    trainer = FakeTrainer()
    step(callback, trainer, 2)
    os.kill(os.getpid(), signal.SIGUSR1)
    assert callback.received == signal.SIGUSR1 and trainer.saved == []  # nothing saved in the handler
    trainer.global_step += 1
    callback.on_train_batch_end(trainer, None, None, None, 0)
    assert trainer.saved == [(3, tmp_path / "hpc_ckpt_3.ckpt")]
    with pytest.raises(Preempted, match="stopped on SIGUSR1 after step 3") as stop:
        callback.on_train_batch_start(trainer, None, None, 0)
    assert stop.value.requeued and stop.value.exit_code == 0 and callback.requeued == ["1234"]
    assert trainer.flushed == 1  # logs flushed before the requeue


def test_one_reduce_per_optimizer_step_not_per_accumulated_batch(callback):
    trainer = FakeTrainer()
    step(callback, trainer, 3)
    callback.on_train_batch_end(trainer, None, None, None, 1)  # an accumulation batch: global_step unchanged
    assert trainer.reduces == 3 and trainer.saved == []


def test_a_signal_on_another_rank_stops_this_one_too(callback, tmp_path):
    trainer = FakeTrainer(other_rank=(1, int(signal.SIGINT)))  # another rank saw Ctrl-C ("stop"), this one nothing
    step(callback, trainer)
    assert trainer.saved == [(1, tmp_path / "hpc_ckpt_1.ckpt")]
    with pytest.raises(Preempted) as stop:
        callback.on_train_batch_start(trainer, None, None, 0)
    assert not stop.value.requeued and stop.value.signum == signal.SIGINT and callback.requeued == []


def test_ctrl_c_stops_without_requeue_and_a_second_one_stops_at_once(callback):
    os.kill(os.getpid(), signal.SIGINT)
    assert callback.received == signal.SIGINT
    with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)
    trainer = FakeTrainer()
    step(callback, trainer)
    with pytest.raises(Preempted) as stop:
        callback.on_train_batch_start(trainer, None, None, 0)
    assert stop.value.exit_code == 130 and callback.requeued == []


def test_uninstall_restores_the_previous_handlers(tmp_path):
    before = signal.getsignal(signal.SIGUSR1)
    cb = StepBoundaryCheckpoint(tmp_path, requeue_signals=[signal.SIGUSR1])
    cb.install()
    assert signal.getsignal(signal.SIGUSR1) == cb._on_signal
    cb.uninstall()
    assert signal.getsignal(signal.SIGUSR1) == before


def test_slurm_job_id_of_an_array_task():
    assert preemption.slurm_job_id({"SLURM_JOB_ID": "9", "SLURM_ARRAY_JOB_ID": "7", "SLURM_ARRAY_TASK_ID": "2"}) == "7_2"
    assert preemption.slurm_job_id({"SLURM_JOB_ID": "9"}) == "9"

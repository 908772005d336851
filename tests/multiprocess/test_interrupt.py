"""Ctrl-C and preemption signals with the real train.py: the run stops at the end of the step in
progress, saves it (``hpc_ckpt_<step>.ckpt``), and ``resume: auto`` continues to the weights, sample
order and metrics history of an uninterrupted run; a later periodic save removes the signal checkpoint.
A checkpoint write that fails partway stops the run with a message and leaves the previous
checkpoint as the one ``resume: auto`` picks."""

from __future__ import annotations

import csv
import signal
import subprocess
import time

import pytest
from lightning.fabric.plugins.io import torch_io

from llm4gen.cli import train
from llm4gen.lightning_modules.run_checkpoints import checkpoint_step

STEPS = 8
OVERRIDES = (f"trainer.max_steps={STEPS}", "checkpoint.every_n_steps=2", "data.num_workers=0")  # as test_resume
pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]


def metrics_steps(run_dir):
    with open(run_dir / "logs" / "metrics.csv", newline="") as handle:
        return [int(row["step"]) for row in csv.DictReader(handle)]


def signal_after_records(argv, env, keys, signum, records, log, timeout_s=240):
    """Start train.py, send ``signum`` once ``records`` training batches are recorded; return its exit code."""
    with open(log, "w") as handle:
        process = subprocess.Popen(argv, env=env, cwd=train.Path(train.__file__).parent, stdout=handle,
                                   stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout_s
    try:
        while not (keys.exists() and len(keys.read_text().splitlines()) >= records):
            assert process.poll() is None, f"train.py ended early:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"no batch {records} within {timeout_s}s:\n{log.read_text()[-3000:]}"
            time.sleep(0.02)
        process.send_signal(signum)
        return process.wait(timeout=timeout_s)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.mark.parametrize("signum, exit_code", [(signal.SIGINT, 130), (signal.SIGUSR1, 128 + signal.SIGUSR1)],
                         ids=["SIGINT", "SIGUSR1"])
def test_a_signal_mid_run_saves_the_finished_step_and_resume_reaches_the_uninterrupted_run(
        tiny_runs, tmp_path, signum, exit_code):
    baseline = tiny_runs.baseline(*OVERRIDES)
    run_dir = tmp_path / "run"
    argv = tiny_runs.argv(run_dir, *OVERRIDES)
    first_keys, resumed_keys = tmp_path / "first.jsonl", tmp_path / "resumed.jsonl"

    code = signal_after_records(argv, tiny_runs.env(first_keys), first_keys, signum, 3, tmp_path / "first.log")

    output = (tmp_path / "first.log").read_text()
    assert code == exit_code, output[-3000:]
    (saved,) = run_dir.glob("hpc_ckpt_*.ckpt")
    step = checkpoint_step(saved)
    trained = [r["global_step"] for r in tiny_runs.batch_records(first_keys)]
    assert saved.name == f"hpc_ckpt_{step}.ckpt" and trained == list(range(step)), (saved, trained)  # no half step
    assert 3 <= step < STEPS
    assert f"stopped on {signal.Signals(signum).name} after step {step}: saved {saved}" in output
    assert metrics_steps(run_dir) == list(range(step))  # every finished step logged and flushed
    assert not (run_dir / "final_metrics.json").exists()

    output = tiny_runs.run(argv, tiny_runs.env(resumed_keys))

    assert tiny_runs.resumed_from(output) == saved
    assert tiny_runs.keys_by_step(first_keys, resumed_keys) == tiny_runs.keys_by_step(baseline / "keys.jsonl")
    final = tiny_runs.load_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    reference = tiny_runs.load_checkpoint(baseline / "checkpoints" / "last.ckpt")
    assert final["global_step"] == STEPS
    assert tiny_runs.max_abs_difference(final["state_dict"], reference["state_dict"]) <= 1e-6
    assert metrics_steps(run_dir) == list(range(STEPS))  # each step exactly once across both starts
    assert list(run_dir.glob("hpc_ckpt_*.ckpt")) == []  # removed by the next periodic save


def test_a_checkpoint_write_failing_partway_stops_the_run_and_keeps_the_previous_one_picked(
        tiny_runs, tmp_path, monkeypatch, capsys):
    real_save, calls = torch_io._atomic_save, []

    def full_disk_at_step_4(checkpoint, filepath):
        calls.append(checkpoint["global_step"])
        if checkpoint["global_step"] < 4:
            return real_save(checkpoint, filepath)
        with open(filepath, "wb") as handle:
            handle.write(b"PK\x03\x04 the first bytes only")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch_io, "_atomic_save", full_disk_at_step_4)
    run_dir = tmp_path / "run"
    argv = tiny_runs.argv(run_dir, *OVERRIDES)[2:]  # train.main in this process: the fault is injected here

    assert train.main(argv) == 1

    err = capsys.readouterr().err
    assert "error: writing checkpoint" in err and "No space left on device" in err, err[-2000:]
    assert calls[-1] == 4
    picked = train.find_resume_checkpoint(run_dir)
    assert checkpoint_step(picked) == 2 and picked.parent.name == "checkpoints"
    assert not [p for p in run_dir.rglob("*") if ".tmp-" in p.name]

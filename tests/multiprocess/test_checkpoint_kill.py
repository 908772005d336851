"""A job killed while it writes a checkpoint: the previous checkpoint survives and the rerun resumes.

Two halves. AtomicCheckpointIO writes to ``.NAME.tmp-PID`` and renames, so a write that dies midway
(simulated here by making the write itself fail after half the bytes) never touches the checkpoint
under the real name. And when a truncated checkpoint does sit in the run folder (a copy cut short, a
writer without the rename), ``find_resume_checkpoint`` skips it with a warning and the rerun
resumes from the newest good one, ending with the weights of an uninterrupted run.
"""

from __future__ import annotations

import io
import os
import shutil
import time

import pytest

from llm4gen.lightning_modules.run_checkpoints import checkpoint_step


def is_readable_checkpoint(path) -> bool:
    return checkpoint_step(path) is not None
import torch
from lightning.fabric.plugins.io import torch_io

from llm4gen.cli import train
from llm4gen.lightning_modules.callbacks import AtomicCheckpointIO
from llm4gen.lightning_modules.run_checkpoints import CheckpointSaveError

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

STEPS = 8
BASELINE = (f"trainer.max_steps={STEPS}", "checkpoint.every_n_steps=2", "data.num_workers=0")  # as in test_resume


def checkpoint_bytes(value: float) -> bytes:
    buffer = io.BytesIO()
    torch.save({"state_dict": {"w": torch.full((1000,), value)}}, buffer)
    return buffer.getvalue()


def test_atomic_save_failing_midway_keeps_the_old_checkpoint_and_no_temporary_file(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.full((1000,), 1.0)}}, path)
    old = path.read_bytes()

    def dies_halfway(checkpoint, filepath):  # disk full or the process dying inside the write
        data = checkpoint_bytes(2.0)
        with open(filepath, "wb") as handle:
            handle.write(data[: len(data) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch_io, "_atomic_save", dies_halfway)
    with pytest.raises(OSError, match="No space left"):
        AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.full((1000,), 2.0)}}, path)

    assert path.read_bytes() == old
    assert torch.load(path, weights_only=False)["state_dict"]["w"][0] == 1.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # the partial temporary file is gone


def test_atomic_save_failing_inside_torch_save_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "step=0000002.ckpt"
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.zeros(3)}}, path)
    old = path.read_bytes()

    def save_raises(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a zip")
        raise RuntimeError("killed inside torch.save")

    monkeypatch.setattr(torch, "save", save_raises)
    with pytest.raises(CheckpointSaveError, match="killed inside torch.save.*previous checkpoint under that name is intact"):
        AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(3)}}, path)

    assert path.read_bytes() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step=0000002.ckpt"]


def test_atomic_save_replaces_the_checkpoint_when_the_write_succeeds(tmp_path):
    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.zeros(3)}}, path)
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(3)}}, path)
    assert torch.equal(torch.load(path, weights_only=False)["state_dict"]["w"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_find_resume_checkpoint_skips_truncated_and_temporary_files(tmp_path, capsys):
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    good = checkpoints / "step=0000004.ckpt"
    good.write_bytes(checkpoint_bytes(4.0))
    truncated = checkpoints / "step=0000006.ckpt"
    truncated.write_bytes(checkpoint_bytes(6.0)[:700])
    stale = checkpoints / ".last.ckpt.tmp-4242"
    stale.write_bytes(checkpoint_bytes(6.0))  # complete, but never renamed: not a checkpoint yet
    empty_hpc = tmp_path / "hpc_ckpt_2.ckpt"
    empty_hpc.write_bytes(b"")
    now = time.time()
    for age, path in enumerate([empty_hpc, stale, truncated, good]):  # the bad ones are the newest
        os.utime(path, (now - age * 10, now - age * 10))

    assert train.find_resume_checkpoint(tmp_path) == good
    warnings = capsys.readouterr().err.splitlines()
    assert sorted(warnings) == sorted([f"warning: skipping unreadable checkpoint {empty_hpc}",
                                       f"warning: skipping unreadable checkpoint {truncated}"])
    assert not is_readable_checkpoint(truncated) and is_readable_checkpoint(good)


def test_find_resume_checkpoint_with_no_readable_checkpoint_starts_fresh(tmp_path, capsys):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"PK\x03\x04 truncated")
    assert train.find_resume_checkpoint(tmp_path) is None
    assert "skipping unreadable checkpoint" in capsys.readouterr().err


def test_rerun_after_a_kill_mid_save_resumes_from_the_last_good_checkpoint(tiny_runs, tmp_path):
    """The run folder a SIGKILL during the step-6 save leaves behind, with a non-atomic writer: a good
    step 4, a truncated step 6 (the newest file) and a half-written temporary file."""
    baseline = tiny_runs.baseline(*BASELINE)
    run_dir = tmp_path / "run"
    checkpoints = run_dir / "checkpoints"
    checkpoints.mkdir(parents=True)
    good = checkpoints / "step=0000004.ckpt"
    shutil.copyfile(baseline / "checkpoints" / "step=0000004.ckpt", good)
    full = (baseline / "checkpoints" / "step=0000006.ckpt").read_bytes()
    truncated = checkpoints / "step=0000006.ckpt"
    truncated.write_bytes(full[: len(full) // 2])
    (checkpoints / ".last.ckpt.tmp-4242").write_bytes(full[: len(full) // 3])
    os.utime(good, (time.time() - 60, time.time() - 60))

    output = tiny_runs.run(tiny_runs.argv(run_dir, *BASELINE), tiny_runs.env(tmp_path / "keys.jsonl"))

    assert f"warning: skipping unreadable checkpoint {truncated}" in output
    assert tiny_runs.resumed_from(output) == good
    assert [r["global_step"] for r in tiny_runs.batch_records(tmp_path / "keys.jsonl")] == [4, 5, 6, 7]
    # Step 6 was saved again, whole (ModelCheckpoint adds -v1 rather than overwrite a name it finds).
    step6 = [p for p in checkpoints.glob("step=0000006*.ckpt") if is_readable_checkpoint(p)]
    assert [tiny_runs.load_checkpoint(p)["global_step"] for p in step6] == [6], sorted(checkpoints.iterdir())
    assert train.find_resume_checkpoint(run_dir).name in {"last.ckpt", "step=0000008.ckpt"}
    final = tiny_runs.load_checkpoint(checkpoints / "last.ckpt")
    reference = tiny_runs.load_checkpoint(baseline / "checkpoints" / "last.ckpt")
    assert final["global_step"] == STEPS
    assert tiny_runs.max_abs_difference(final["state_dict"], reference["state_dict"]) <= 1e-6

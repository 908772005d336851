"""Which checkpoint a run resumes from (by stored step, not file time), pruning of signal
checkpoints once a newer one is safely written, and what a failing write leaves behind."""

from __future__ import annotations

import os
import shutil
import time

import pytest
import torch
from lightning.fabric.plugins.io import torch_io

from llm4gen.lightning_modules.callbacks import AtomicCheckpointIO
from llm4gen.lightning_modules.run_checkpoints import (
    CheckpointSaveError,
    checkpoint_step,
    find_resume_checkpoint,
    prune_signal_checkpoints,
)


def save(path, step):
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"global_step": step, "state_dict": {"w": torch.full((4,), float(step))}}, path)
    return path


def run_folder(root):
    return {
        "step2": save(root / "checkpoints" / "step=0000002.ckpt", 2),
        "step4": save(root / "checkpoints" / "step=0000004.ckpt", 4),
        "last": save(root / "checkpoints" / "last.ckpt", 4),
        "hpc6": save(root / "hpc_ckpt_6.ckpt", 6),
    }


def test_checkpoint_step_reads_the_stored_step_and_none_for_unreadable_files(tmp_path):
    path = save(tmp_path / "a.ckpt", 17)
    assert checkpoint_step(path) == 17
    (tmp_path / "cut.ckpt").write_bytes(path.read_bytes()[:300])
    (tmp_path / "text.ckpt").write_text("not a checkpoint")
    assert checkpoint_step(tmp_path / "cut.ckpt") is None and checkpoint_step(tmp_path / "text.ckpt") is None


def test_a_copied_folder_with_equal_file_times_resumes_from_its_highest_step(tmp_path):
    files = run_folder(tmp_path / "run")
    copy = tmp_path / "copy"
    shutil.copytree(tmp_path / "run", copy, copy_function=shutil.copyfile)  # times are not copied
    stamp = time.time() - 1000
    for path in list(copy.rglob("*.ckpt")):
        os.utime(path, (stamp, stamp))
    assert find_resume_checkpoint(copy) == copy / files["hpc6"].relative_to(tmp_path / "run")


def test_the_newest_file_does_not_win_over_a_higher_step(tmp_path):
    files = run_folder(tmp_path)
    now = time.time()
    os.utime(files["hpc6"], (now - 100, now - 100))
    os.utime(files["step2"], (now, now))  # an old step touched last
    assert find_resume_checkpoint(tmp_path) == files["hpc6"]
    files["hpc6"].unlink()
    assert find_resume_checkpoint(tmp_path) == files["last"]  # equal steps: last.ckpt before step=4


def test_a_checkpoint_written_at_a_higher_step_prunes_older_signal_checkpoints_only(tmp_path):
    save(tmp_path / "hpc_ckpt_3.ckpt", 3)
    save(tmp_path / "hpc_ckpt_6.ckpt", 6)
    save(tmp_path / "hpc_ckpt_9.ckpt", 9)
    io = AtomicCheckpointIO(run_dir=tmp_path)
    io.save_checkpoint({"global_step": 6, "state_dict": {}}, tmp_path / "checkpoints" / "step=0000006.ckpt")
    assert sorted(p.name for p in tmp_path.glob("hpc_ckpt_*")) == ["hpc_ckpt_9.ckpt"]
    io.save_checkpoint({"global_step": 12, "state_dict": {}}, tmp_path / "hpc_ckpt_12.ckpt")
    assert sorted(p.name for p in tmp_path.glob("hpc_ckpt_*")) == ["hpc_ckpt_12.ckpt"]  # only the newest remains


def test_prune_leaves_unreadable_files_and_the_saved_one(tmp_path):
    (tmp_path / "hpc_ckpt_1.ckpt").write_bytes(b"")
    kept = save(tmp_path / "hpc_ckpt_5.ckpt", 5)
    assert prune_signal_checkpoints(tmp_path, 5, saved=kept) == []


def test_a_save_that_fails_partway_keeps_the_previous_checkpoint_picked_and_says_so(tmp_path, monkeypatch):
    io = AtomicCheckpointIO(run_dir=tmp_path)
    io.save_checkpoint({"global_step": 2, "state_dict": {}}, tmp_path / "checkpoints" / "last.ckpt")
    save(tmp_path / "hpc_ckpt_3.ckpt", 3)

    def disk_full(checkpoint, filepath):
        with open(filepath, "wb") as handle:
            handle.write(b"PK\x03\x04 half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch_io, "_atomic_save", disk_full)
    with pytest.raises(CheckpointSaveError, match=r"last.ckpt failed \(OSError: \[Errno 28\] No space left on device\); "
                                                  r"the previous checkpoint under that name is intact"):
        io.save_checkpoint({"global_step": 4, "state_dict": {}}, tmp_path / "checkpoints" / "last.ckpt")
    assert (tmp_path / "hpc_ckpt_3.ckpt").exists()  # a failed save prunes nothing
    assert find_resume_checkpoint(tmp_path) == tmp_path / "hpc_ckpt_3.ckpt"
    assert checkpoint_step(tmp_path / "checkpoints" / "last.ckpt") == 2
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["last.ckpt"]

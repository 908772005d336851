"""The checkpoints of one run folder: which one to resume from, and which signal checkpoints to drop.

A run folder holds periodic checkpoints (``checkpoints/step=NNNNNNN.ckpt``), ``checkpoints/last.ckpt``
and signal checkpoints (``hpc_ckpt_<step>.ckpt``, written at a step boundary on a preemption signal or
Ctrl-C; lightning_modules/preemption.py). Resume picks by content, not file time: the highest
``global_step`` stored in a readable checkpoint wins (a folder copied without its times resumes from
its newest step), then the kind (last.ckpt, a step file, a signal checkpoint), then the file time.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from llm4gen.lightning_modules.nonfinite import nonfinite_tensors
from llm4gen.lightning_modules.checkpoint_files import checkpoint_metadata, is_sharded_checkpoint
from llm4gen.lightning_modules.safe_loading import UntrustedCheckpointError, load_torch_file
from llm4gen.lightning_modules.sharding import consolidated_checkpoint

KIND_ORDER = {"hpc": 0, "step": 1, "last": 2}  # at equal steps, the higher wins


class CheckpointSaveError(OSError):
    """Writing a checkpoint failed (a full disk, a failing file system); nothing replaced the previous one."""


def checkpoint_kind(path: Path) -> str:
    if path.name.startswith("hpc_ckpt_"):
        return "hpc"
    return "last" if path.stem.startswith("last") else "step"


def checkpoint_step(path: str | Path) -> int | None:
    """The ``global_step`` a Lightning checkpoint holds (-1 for a readable one without it), or None
    when the file is not a readable checkpoint; :class:`UntrustedCheckpointError` for one that would run code
    when read (lightning_modules/safe_loading.py): refused, not passed over.

    Cheap: the file is memory-mapped, so only the small pickled index is read, never the tensor data.
    """
    try:
        if is_sharded_checkpoint(path):  # a sharded run's folder: the step is in its metadata
            checkpoint = checkpoint_metadata(path)
        else:
            checkpoint = load_torch_file(path, f"checkpoint {str(path)!r}", mmap=True)
    except UntrustedCheckpointError:
        raise
    except Exception:  # truncated, not a zip, not a checkpoint: all mean "unreadable"
        return None
    if not isinstance(checkpoint, dict):
        return None
    step = checkpoint.get("global_step", -1)  # a bare state dict ranks below any training checkpoint
    return int(step) if isinstance(step, int) else -1


def run_checkpoints(output_dir: str | Path) -> list[Path]:
    output_dir = Path(output_dir)
    return sorted((output_dir / "checkpoints").glob("*.ckpt")) + sorted(output_dir.glob("hpc_ckpt_*.ckpt"))


def nonfinite_in(path: str | Path) -> list[str]:
    """The non-finite trained tensors a checkpoint file (or sharded folder) holds (lightning_modules/nonfinite.py);
    [] for a good one."""
    if is_sharded_checkpoint(path):
        return nonfinite_tensors(consolidated_checkpoint(path))
    return nonfinite_tensors(load_torch_file(path, f"checkpoint {str(path)!r}", mmap=True))


def find_resume_checkpoint(output_dir: str | Path) -> Path | None:
    """The readable checkpoint of a run with the highest stored step (then kind, then file time) whose trained
    state is finite: one holding NaN or inf (written by code that did not check) is passed over, with a warning.
    A file that would run code when read stops the search (UntrustedCheckpointError): a run folder someone else
    can write to is not resumed around it."""
    ranked = []
    for path in run_checkpoints(output_dir):
        step = checkpoint_step(path)
        if step is None:
            print(f"warning: skipping unreadable checkpoint {path}", file=sys.stderr)
            continue
        ranked.append(((step, KIND_ORDER[checkpoint_kind(path)], path.stat().st_mtime), path))
    for _, path in sorted(ranked, key=lambda item: item[0], reverse=True):
        bad = nonfinite_in(path)
        if not bad:
            return path
        print(f"warning: skipping checkpoint {path}: its trained state is not finite ({', '.join(bad[:3])}"
              f"{' ...' if len(bad) > 3 else ''})", file=sys.stderr)
    return None


def prune_signal_checkpoints(output_dir: str | Path, saved_step: int, saved: str | Path) -> list[Path]:
    """Delete the run's signal checkpoints (``hpc_ckpt_*``) at or below ``saved_step``, once the
    checkpoint ``saved`` (of any kind, at that step) is safely written; returns what was deleted."""
    removed = []
    for path in sorted(Path(output_dir).glob("hpc_ckpt_*.ckpt")):
        if path.resolve() == Path(saved).resolve():
            continue
        try:
            step = checkpoint_step(path)
        except UntrustedCheckpointError:  # not this run's: left where it is, for resume to refuse
            continue
        if step is not None and step <= saved_step:
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)  # a sharded one is a folder
            removed.append(path)
    return removed

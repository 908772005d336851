"""train.py with a record of what every training step consumed: a test instrument, not part of the trainer.

    LLM4GEN_RECORD_KEYS=<path> python tests/train_recording_keys.py [train.py arguments]

runs train.py's ``main`` with :class:`KeyRecorder` added to the Trainer's callbacks, appending the sample
keys of every training batch (and a checksum of the trainable weights at the end) to ``<path>``
(``<path>.rank<R>`` per rank under DDP). The cluster and SLURM tests run it (directly, or as
``submit.py --train-script``) to compare interrupted and uninterrupted runs. Without the variable it is
train.py unchanged.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import lightning as L  # noqa: E402

SCRIPT = Path(__file__).resolve()
RECORD_KEYS_ENV = "LLM4GEN_RECORD_KEYS"


class KeyRecorder(L.Callback):
    """Appends one JSON line per training batch to a file: ``{"global_step", "batch_idx", "rank", "keys"}``,
    and at the end of training ``{"event": "train_end", "global_step", "rank", "trainable_sha256",
    "trainable_sum"}`` over the trainable parameters (in name order).

    Why: an exact resume or a DDP split is only proven by what was trained on, and equal weights
    across ranks by a checksum each rank computes itself. ``python tests/train_recording_keys.py``
    (train.py's command line) adds it when ``LLM4GEN_RECORD_KEYS=<path>`` is set. A single-process run writes ``<path>``; rank R of a
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
        # the datamodule consumed this batch (and took its keys out of it) just before this hook
        self._append(trainer, {"global_step": trainer.global_step, "batch_idx": batch_idx,
                               "rank": trainer.global_rank, "keys": trainer.datamodule.last_keys})

    def on_train_end(self, trainer, pl_module) -> None:
        digest, total = hashlib.sha256(), 0.0
        for name, param in sorted(pl_module.named_parameters()):
            if param.requires_grad:
                data = param.detach()
                if hasattr(data, "full_tensor"):  # a sharded (FSDP2) parameter: gathered on every rank
                    data = data.full_tensor()
                data = data.float().cpu().contiguous()
                digest.update(name.encode())
                digest.update(data.numpy().tobytes())
                total += float(data.double().sum())
        self._append(trainer, {"event": "train_end", "global_step": trainer.global_step, "rank": trainer.global_rank,
                               "trainable_sha256": digest.hexdigest(), "trainable_sum": total})


def main(argv=None) -> int:
    from llm4gen.cli import train
    if os.environ.get(RECORD_KEYS_ENV):
        train.build_trainer = functools.partial(train.build_trainer,
                                                extra_callbacks=[KeyRecorder(os.environ[RECORD_KEYS_ENV])])
    return train.main(argv)


if __name__ == "__main__":
    sys.exit(main())

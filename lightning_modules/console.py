"""What a training run prints, at three levels (``train.py --quiet`` / default / ``--verbose``).

By default the library notices known to be harmless here are filtered out, each by its exact message
(llm4gen/noise.py), so every other warning still shows; the progress bar counts steps in a step-limited
run (Lightning's shows "Epoch 4/-2" there); the model table lists the parts and what trains (Lightning's
has a FLOPs column that is 0 without an example input; the FLOPs per sample are in the throughput logs).
``--quiet`` also drops the progress bar, the table and Lightning's info lines (warnings and errors stay);
``--verbose`` filters nothing and shows Lightning's own summary and the libraries' loading bars.
"""

from __future__ import annotations

import logging

from lightning.pytorch.callbacks import Callback, RichProgressBar
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.model_summary import get_human_readable_count

from llm4gen.noise import filter_known_noise

LEVELS = ("quiet", "default", "verbose")
LIGHTNING_LOGGERS = ("lightning.pytorch", "lightning.fabric")


def configure(level: str = "default") -> None:
    """Sets this process's console level (call once, at the start of an entry point)."""
    if level not in LEVELS:
        raise ValueError(f"console level {level!r}: expected one of {', '.join(LEVELS)}")
    filter_known_noise(level != "verbose")
    if level != "verbose":
        from diffusers.utils import logging as diffusers_logging
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()  # "Loading weights" bars of the frozen models
        diffusers_logging.disable_progress_bar()
    for name in LIGHTNING_LOGGERS:  # "GPU available: ...", "`Trainer.fit` stopped: ..."
        logging.getLogger(name).setLevel(logging.WARNING if level == "quiet" else logging.INFO)


def trainer_options(level: str, trainer_args: dict) -> dict:
    """Trainer keyword arguments the level sets, where the config does not set them itself."""
    options = {"enable_model_summary": level == "verbose", "enable_progress_bar": level != "quiet"}
    return {key: value for key, value in options.items() if key not in trainer_args}


class StepProgressBar(RichProgressBar):
    """Lightning's rich bar, described by optimizer steps when the run is limited by ``max_steps``
    ("step 120/300"); by epochs otherwise."""

    def _get_train_description(self, current_epoch: int) -> str:
        trainer = self.trainer
        if trainer.max_steps is not None and trainer.max_steps > 0:
            text = f"step {trainer.global_step}/{trainer.max_steps}"
        elif trainer.max_epochs is not None and trainer.max_epochs > 0:
            text = f"epoch {current_epoch}/{trainer.max_epochs - 1}"
        else:
            text = f"epoch {current_epoch}"
        return f"{text:{len(self.validation_description)}}" if len(self.validation_description) > len(text) else text

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self.progress is not None and self.train_progress_bar_id is not None:
            self.progress.update(self.train_progress_bar_id, description=self._get_train_description(trainer.current_epoch))


def parts_table(module) -> str:
    """The LightningModule's top-level parts: class, parameters and whether they train."""
    rows = []
    for name, part in module.named_children():
        total = sum(p.numel() for p in part.parameters())
        trained = sum(p.numel() for p in part.parameters() if p.requires_grad)
        if total == 0:
            continue
        state = "trains" if trained == total else ("frozen" if trained == 0 else f"{get_human_readable_count(trained)} train")
        rows.append((name, type(part).__name__, get_human_readable_count(total), state))
    total = sum(p.numel() for p in module.parameters())
    trained = sum(p.numel() for p in module.parameters() if p.requires_grad)
    width = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [f"model: {get_human_readable_count(total)} parameters, {get_human_readable_count(trained)} trained"]
    lines += [f"  {n:<{width[0]}}  {c:<{width[1]}}  {p:>{width[2]}}  {s}" for n, c, p, s in rows]
    return "\n".join(lines)


class PartsSummary(Callback):
    """Prints :func:`parts_table` once, when fitting starts (rank zero)."""

    @rank_zero_only
    def on_fit_start(self, trainer, pl_module) -> None:
        print(parts_table(pl_module), flush=True)

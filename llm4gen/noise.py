"""Library notices known to be harmless in this project, each matched by its exact message, so that every
other warning still shows. The entry points filter them from their first import on (``llm4gen.cli``:
diffusers' imports already print one), ``--verbose`` keeps them (lightning_modules/console.py)."""

from __future__ import annotations

import logging
import re
import warnings
from dataclasses import dataclass


@dataclass(frozen=True)
class Noise:
    pattern: str  # a regular expression matched at the start of the message
    why: str      # why it is harmless here


KNOWN_NOISE: tuple[Noise, ...] = (
    Noise(r"Found \d+ module\(s\) in eval mode at the start of training",
          "the frozen VAE, UNet, CLIP and LLM are in eval mode on purpose"),
    Noise(r"The `srun` command is available on your system but is not used",
          "a local run on a machine that has SLURM installed (submit.py launches SLURM jobs)"),
    Noise(r"`isinstance\(treespec, LeafSpec\)` is deprecated",
          "Lightning's own use of torch's pytree API, nothing a user can change"),
    Noise(r"💡 Tip: For seamless cloud logging",
          "an advertisement printed by every Trainer"),
    Noise(r"`\w+ImageProcessor` requires torchvision \(not installed\); falling back to",
          "printed while diffusers imports its IP-adapter loader; the project needs no torchvision"),
)
# The loggers the logged notices come from (the others are warnings, filtered by the warnings module).
NOISY_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
                 "lightning_utilities.core.rank_zero", "transformers.utils.import_utils")


def is_noise(message: str) -> bool:
    return any(re.match(noise.pattern, message) for noise in KNOWN_NOISE)


class NoiseFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not is_noise(record.getMessage())


_FILTER = NoiseFilter()


def filter_known_noise(enabled: bool = True) -> None:
    """Drops :data:`KNOWN_NOISE` from the logs and warnings of this process (``enabled=False`` undoes it)."""
    for name in NOISY_LOGGERS:
        logger = logging.getLogger(name)
        if enabled and _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
        elif not enabled:
            logger.removeFilter(_FILTER)
    if enabled:
        for noise in KNOWN_NOISE:
            warnings.filterwarnings("ignore", message=noise.pattern)
    else:
        patterns = {noise.pattern for noise in KNOWN_NOISE}
        warnings.filters[:] = [f for f in warnings.filters
                               if not (f[0] == "ignore" and getattr(f[1], "pattern", None) in patterns)]

"""Non-finite steps lose nothing.

Nothing in Lightning or torch's optimizers looks at whether a loss or a gradient is finite: one inf loss
(a bad sample, a learning rate too high, a bf16 overflow) and AdamW writes NaN into every weight, every
later checkpoint holds it, and checkpoint rotation deletes the good ones. Here:

- a step whose loss or gradients are not finite, on any rank, changes nothing: every trainable parameter's
  gradient is dropped before clipping and the optimizer (torch's optimizers skip a parameter without a
  gradient: no update, no weight decay, no moment estimate), and the EMA does not step; all ranks agree (the
  flag is summed over them), so under DDP every rank skips the same step, and with gradient accumulation the
  whole accumulated step is skipped;
- skipped steps are counted (``train/skipped_nonfinite``, saved in checkpoints, in the final metrics), and
  ``model.optim.max_nonfinite_steps`` of them in a row stop the run with :class:`NonFiniteStepsError`, which
  names the step, the loss terms that were not finite and the last checkpoint written (a good one);
- no checkpoint is written holding a non-finite trainable weight, EMA weight or optimizer moment
  (:func:`nonfinite_tensors`), and resuming passes over such a checkpoint to the newest good one
  (lightning_modules/run_checkpoints.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import torch
from torch.distributed.tensor import DTensor

from llm4gen.configs.errors import UserError


class NonFiniteStepsError(UserError, RuntimeError):
    """Too many non-finite steps in a row: the run stops, its weights and checkpoints as they were before them."""


@dataclass
class NonFiniteSteps:
    """How many steps were skipped for a non-finite loss or gradient, in all and in a row."""
    skipped: int = 0
    in_a_row: int = 0

    def state_dict(self) -> dict[str, int]:
        return {"skipped": self.skipped, "in_a_row": self.in_a_row}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.skipped, self.in_a_row = int(state["skipped"]), int(state["in_a_row"])


def nonfinite_terms(terms: Mapping[str, torch.Tensor | float]) -> list[str]:
    """The names of the loss terms that are not finite."""
    return [name for name, value in terms.items()
            if not (torch.isfinite(value).all() if isinstance(value, torch.Tensor) else math.isfinite(value))]


def gradients_finite(parameters: Iterable[torch.nn.Parameter]) -> bool:
    """Whether every gradient present is finite (one fused check per dtype and device, no host sync per tensor)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return True
    return bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())


def drop_gradients(parameters: Iterable[torch.nn.Parameter]) -> None:
    """The step changes nothing: no gradient, so the optimizer skips every parameter."""
    for parameter in parameters:
        parameter.grad = None


def nonfinite_tensors(checkpoint: Mapping[str, Any]) -> list[str]:
    """The names of the non-finite tensors a Lightning checkpoint holds in what trains: its ``state_dict``, its
    ``ema`` (shadow parameters) and its optimizer's state (moments); [] for a good one."""
    found = []

    def visit(name: str, value: Any) -> None:
        if isinstance(value, torch.Tensor):
            if isinstance(value, DTensor):  # a sharded run: this rank's shard (the caller reduces over ranks)
                value = value.to_local()
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                found.append(name)
        elif isinstance(value, Mapping):
            for key, item in value.items():
                visit(f"{name}.{key}" if name else str(key), item)
        elif isinstance(value, (list, tuple)):
            for index, item in enumerate(value):
                visit(f"{name}[{index}]", item)

    visit("state_dict", checkpoint.get("state_dict", {}))
    visit("ema", checkpoint.get("ema", {}))
    for index, optimizer in enumerate(checkpoint.get("optimizer_states") or []):
        visit(f"optimizer_states[{index}].state", optimizer.get("state", {}))
    return found

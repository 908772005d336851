"""Parameter groups and their learning-rate schedules (``model.optim``).

What trains falls into two groups with their own learning rate and weight decay: ``adapter`` (the CAM,
and any trainable part that is not the UNet) at ``lr`` / ``weight_decay``, and ``unet`` (a full or LoRA
UNet) at ``unet_lr`` / ``unet_weight_decay`` (``lr`` / ``weight_decay`` when unset). A new CAM wants a
far larger step than a pretrained UNet: one shared rate either leaves the CAM crawling or damages the
UNet (in the shapes experiment a UNet tuned at the CAM's 3e-4 lost 15 points on single objects).

Each group follows the configured diffusers schedule (``get_scheduler``: warmup, then constant, cosine
or linear) from its own start step. ``unet_start_step`` lets the CAM train alone first; before it the
UNet group's gradients are dropped (``hold_back``), so the UNet neither moves nor gathers optimizer
state, and gradient clipping sees the CAM's gradients only, as in a run with a frozen UNet. The groups
are part of the optimizer's and scheduler's state dicts, so a resumed run continues them exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from diffusers.optimization import get_scheduler
from torch import nn

ADAPTER_GROUP, UNET_GROUP = "adapter", "unet"


@dataclass(frozen=True)
class GroupSettings:
    name: str
    lr: float
    weight_decay: float
    start_step: int


def group_settings(optim) -> dict[str, GroupSettings]:
    """The two groups' settings from the ``model.optim`` section (schema.OptimConfig)."""
    unet_lr, unet_decay = optim.unet_lr, optim.unet_weight_decay
    return {
        ADAPTER_GROUP: GroupSettings(ADAPTER_GROUP, optim.lr, optim.weight_decay, 0),
        UNET_GROUP: GroupSettings(UNET_GROUP, optim.lr if unet_lr is None else unet_lr,
                                  optim.weight_decay if unet_decay is None else unet_decay,
                                  int(optim.unet_start_step)),
    }


def parameter_groups(named_parameters: Iterable[tuple[str, nn.Parameter]], optim) -> list[dict]:
    """torch optimizer parameter groups of the trainable parameters, by name: ``unet.*`` to the UNet group,
    everything else to the adapter group; an empty group is left out. Each group carries its ``name`` and
    ``start_step``."""
    settings = group_settings(optim)
    members: dict[str, list[nn.Parameter]] = {ADAPTER_GROUP: [], UNET_GROUP: []}
    for name, parameter in named_parameters:
        if parameter.requires_grad:
            members[UNET_GROUP if name.startswith("unet.") else ADAPTER_GROUP].append(parameter)
    return [{"params": params, "name": group, "lr": settings[group].lr,
             "weight_decay": settings[group].weight_decay, "start_step": settings[group].start_step}
            for group, params in members.items() if params]


def schedule_factor(scheduler: str, warmup_steps: int, total_steps: int, start_step: int = 0) -> Callable[[int], float]:
    """The learning-rate factor at each optimizer step of a group that starts at ``start_step``: 0 before it,
    then diffusers' ``scheduler`` (warmup, then its shape over the remaining steps) counted from there."""
    probe = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)  # diffusers builds a LambdaLR over one factor
    factor = get_scheduler(scheduler, probe, num_warmup_steps=warmup_steps,
                           num_training_steps=max(1, total_steps - start_step)).lr_lambdas[0]
    return lambda step: 0.0 if step < start_step else factor(step - start_step)


def build_lr_scheduler(optimizer: torch.optim.Optimizer, optim, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """One LambdaLR over the optimizer's groups, each with its own start step."""
    factors = [schedule_factor(optim.scheduler, optim.warmup_steps, total_steps, group.get("start_step", 0))
               for group in optimizer.param_groups]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factors)


def hold_back(optimizer: torch.optim.Optimizer, step: int) -> None:
    """Drops the gradients of the groups that have not started at optimizer step ``step``: the optimizer then
    skips their parameters (no update, no weight decay, no moment estimates) and clipping ignores them."""
    for group in optimizer.param_groups:
        if step < group.get("start_step", 0):
            for parameter in group["params"]:
                parameter.grad = None

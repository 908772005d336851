"""The layout of the authors' released LLM4GEN model, read and written.

The SD1.5 release is a folder holding the CAM as ``projector.pth`` (a torch state dict of
``LLMFusionModule``, see ``adapters.cross_adapter.convert_released_state_dict``) and the UNet they
fine-tuned along with it as ``unet/`` (a diffusers ``UNet2DConditionModel`` folder). VAE, CLIP, tokenizer
and scheduler come from the base SD1.5. A run reads it with ``model.adapter.init_from=DIR`` (or
``DIR/projector.pth``) and ``model.base.unet=DIR/unet``; :func:`save_release` writes a trained run the
same way, so tools that read the release read our runs.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from llm4gen.adapters.cross_adapter import to_released_state_dict

RELEASED_PROJECTOR = "projector.pth"
RELEASED_UNET = "unet"


def release_overrides(directory: str | os.PathLike) -> list[str]:
    """Config overrides that load a release-layout folder: its CAM, and its UNet when it has one."""
    directory = Path(directory)
    if not (directory / RELEASED_PROJECTOR).is_file():
        raise FileNotFoundError(f"{str(directory)!r} is not a release-layout folder: it has no {RELEASED_PROJECTOR} "
                                f"(expected {RELEASED_PROJECTOR} and, optionally, {RELEASED_UNET}/ beside it)")
    overrides = [f"model.adapter.init_from={directory / RELEASED_PROJECTOR}"]
    if (directory / RELEASED_UNET / "config.json").is_file():
        overrides.append(f"model.base.unet={directory / RELEASED_UNET}")
    return overrides


def save_release(directory: str | os.PathLike, adapter, unet) -> Path:
    """Writes ``projector.pth`` (released key names) and ``unet/`` (diffusers folder, safetensors)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".{RELEASED_PROJECTOR}.tmp-{os.getpid()}"
    torch.save(to_released_state_dict(adapter), tmp)
    os.replace(tmp, directory / RELEASED_PROJECTOR)
    unet.save_pretrained(directory / RELEASED_UNET)
    return directory

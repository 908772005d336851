"""Community checkpoints distributed as one file (``.safetensors`` / ``.ckpt``, the original LDM / sgm layout):
their tensors' shapes read without their weights, and the base loaded through diffusers' own single-file loading
(``from_single_file``) with the configs of a local diffusers folder of the same family, nothing downloaded."""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
from safetensors import safe_open

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
SDXL_KEY = "conditioner.embedders.1.model."  # SDXL's second text encoder, OpenCLIP's layout (sgm)
SD15_KEY = "cond_stage_model.transformer."  # SD1.x's CLIP (LDM)


def is_single_file(source: str | Path) -> bool:
    return str(source).endswith(SINGLE_FILE_SUFFIXES)


def tensor_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's name and shape in a checkpoint file, without reading its weights: a ``.safetensors`` file's
    header, or a pickled ``.ckpt``'s tensors mapped to the meta device (``{"state_dict": ...}`` unwrapped)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as handle:
            return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    try:  # the pickle's tensors built on the meta device: names and shapes, no data read, no code run
        state = torch.load(path, map_location="meta", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(f"{str(path)!r} holds more than tensors and plain values, which reading it would build "
                         f"by running code ({str(error).splitlines()[0]}); give the base as a .safetensors file "
                         f"or a diffusers folder") from None
    while isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    return {key: tuple(value.shape) for key, value in state.items() if isinstance(value, torch.Tensor)}


def single_file_family(shapes: dict) -> str | None:
    """``sdxl`` or ``sd15`` from the text encoders' keys (None: neither layout)."""
    if any(key.startswith(SDXL_KEY) for key in shapes):
        return "sdxl"
    if any(key.startswith(SD15_KEY) for key in shapes):
        return "sd15"
    return None


def load_single_file_base(path: str | Path, config: str | Path, family: str, dtype: torch.dtype = torch.float32):
    """The base in ``path`` as diffusers' StableDiffusion(XL)Pipeline, its parts' configs (and tokenizers,
    scheduler) read from the local diffusers folder ``config``; ``local_files_only``: nothing is downloaded."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if family == "sdxl":
        return StableDiffusionXLPipeline.from_single_file(str(path), config=str(config), local_files_only=True,
                                                          torch_dtype=dtype, add_watermarker=False)
    return StableDiffusionPipeline.from_single_file(str(path), config=str(config), local_files_only=True,
                                                    torch_dtype=dtype, safety_checker=None,
                                                    requires_safety_checker=False)

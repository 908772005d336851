"""A model folder's weight files, read without loading them: which files hold the weights, whether each
opens, and which tensor names its safetensors headers hold. The preflight uses it so that a folder with a
config and no weights (an interrupted copy), a truncated file or one of another model is refused in a
second, before anything loads and before the run folder is written.

- A folder holds ``*.safetensors`` (or ``*.bin``) files, or a sharded checkpoint's ``*.index.json``, whose
  ``weight_map`` names the shard of every tensor: every shard must be there and hold its tensors.
- A safetensors header is an 8-byte little-endian length and that many bytes of JSON: tensor name -> dtype,
  shape and offsets. Reading it costs a few kilobytes, whatever the file's size.
- The names a diffusers model needs come from its ``config.json``, built on the meta device (no memory, no
  weights): :func:`expected_names`.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Optional

import diffusers
from accelerate import init_empty_weights

WEIGHT_SUFFIXES = (".safetensors", ".bin")
MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit on a header


class WeightFileError(ValueError):
    """A folder's weights are missing, unreadable or not the model's; the message says which file and why."""


def safetensors_names(path: Path) -> set[str]:
    """The tensor names of a safetensors file, from its header alone."""
    try:
        with open(path, "rb") as handle:
            raw = handle.read(8)
            if len(raw) < 8:
                raise WeightFileError(f"{path} is {len(raw)} bytes long: too short for a safetensors file (truncated?)")
            (length,) = struct.unpack("<Q", raw)
            if length > MAX_HEADER:
                raise WeightFileError(f"{path} does not start with a safetensors header (it announces {length} bytes)")
            header = json.loads(handle.read(length))
            size = path.stat().st_size
    except (OSError, ValueError, UnicodeDecodeError) as err:
        if isinstance(err, WeightFileError):
            raise
        raise WeightFileError(f"{path} has no readable safetensors header ({type(err).__name__}): truncated or "
                              f"not a safetensors file?") from None
    names = {name for name in header if name != "__metadata__"}
    end = max((entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"), default=0)
    if 8 + length + end > size:
        raise WeightFileError(f"{path} is {size:,} bytes, but its header places tensors up to byte "
                              f"{8 + length + end:,}: the file is truncated (an interrupted copy?)")
    return names


def weight_names(folder: Path, stem: Optional[str] = None) -> Optional[set[str]]:
    """The tensor names a model folder's weights hold (None where a ``.bin`` holds them: those are pickles,
    read only by loading). ``stem``: the weights' file stem (``diffusion_pytorch_model``, ``model``)."""
    pattern = f"{stem}*" if stem else "*"
    indices = sorted(folder.glob(f"{pattern}.safetensors.index.json"))
    if indices:
        index = json.loads(indices[0].read_text())
        shards: dict[str, set[str]] = {}
        for name, shard in index.get("weight_map", {}).items():
            shards.setdefault(shard, set()).add(name)
        names = set()
        for shard, wanted in shards.items():
            if not (folder / shard).is_file():
                raise WeightFileError(f"{indices[0]} names the shard {shard}, which is not in {folder}")
            held = safetensors_names(folder / shard)
            if not wanted <= held:
                raise WeightFileError(f"{folder / shard} lacks {len(wanted - held)} of the tensors its index gives it "
                                      f"(e.g. {sorted(wanted - held)[0]})")
            names |= held
        return names
    files = sorted(folder.glob(f"{pattern}.safetensors"))
    if files:
        names = set()
        for path in files:
            names |= safetensors_names(path)
        return names
    if sorted(folder.glob(f"{pattern}.bin")):
        return None
    raise WeightFileError(f"{folder} holds no weights file ({stem or 'model'}.safetensors or .bin) beside its "
                          f"config: was the copy interrupted?")


def expected_names(folder: Path, classes: Optional[dict] = None) -> Optional[set[str]]:
    """The state-dict names of the diffusers model (or one of ``classes``, by class name) a folder's
    ``config.json`` describes (its ``_class_name``), built on the meta device; None for any other config."""
    config = json.loads((folder / "config.json").read_text())
    name = str(config.get("_class_name"))
    cls = (classes or {}).get(name) or getattr(diffusers, name, None)
    if cls is None or not hasattr(cls, "from_config"):
        return None
    with init_empty_weights():
        model = cls.from_config(config)
    return set(model.state_dict())


def check_weights(folder: Path, stem: Optional[str] = None, names_from_config: bool = False,
                  classes: Optional[dict] = None) -> None:
    """Raises :class:`WeightFileError` when the folder's weights are missing or unreadable, or (with
    ``names_from_config``, for a diffusers model or one of ``classes``) hold fewer tensors than its config needs.
    A transformers model's names are not checked: its files name tensors by the checkpoint's own layout (tied
    embeddings saved once, an encoder-decoder read encoder-only, RankGen's prefixes), which only loading maps."""
    held = weight_names(folder, stem)
    if not held and held is not None:
        raise WeightFileError(f"{folder}'s weights hold no tensor")
    if names_from_config and held is not None:
        needed = expected_names(folder, classes)
        missing = sorted(needed - held) if needed else []
        if missing:
            raise WeightFileError(f"{folder}'s weights lack {len(missing)} of the {len(needed)} tensors its config.json "
                                  f"needs (e.g. {missing[0]}): the weights of another model, or a partial copy")

"""Checking a training checkpoint file before any model is built from it.

``load_checkpoint_checked(path)`` is what every reader of a checkpoint calls first (generate.py,
attention_maps.py, train.py's ``resume=PATH``, evaluation): it says plainly when the file is missing, is
not a checkpoint at all, is truncated, is some other program's checkpoint, or (given the run's model
config) was written with another configuration, naming the fields that differ. Only the checkpoint
itself is read (memory-mapped); no model weights load.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any, Mapping, Optional

from omegaconf import DictConfig, OmegaConf

from llm4gen.configs.checks import SHARDED
from llm4gen.configs.errors import UserError
from llm4gen.configs.schema import ModelConfig
from llm4gen.lightning_modules.safe_loading import load_torch_file, read_dcp_index

ZIP_MAGIC = b"PK\x03\x04"

# Model settings that decide which weights train and their shapes: a checkpoint written with other
# values cannot be loaded into this model (dotted under the config's `model` section).
ARCHITECTURE_FIELDS = (
    "base.family", "base.pretrained", "base.revision", "llm.pretrained", "llm.revision", "llm.layer",
    "adapter.kind", "adapter.fusion", "adapter.num_heads", "adapter.num_blocks", "adapter.ffn_mult",
    "adapter.use_llm_mask", "unet_training",
    "lora.rank", "lora.target_modules", "ema.enabled",
)


class CheckpointError(UserError):
    """The file is not a usable LLM4GEN training checkpoint for what was asked."""


def checkpoint_problem(path: str | Path) -> Optional[str]:
    """Why the file cannot be a checkpoint (missing, empty, not a zip archive, truncated), or None."""
    path = Path(path)
    if not path.exists():
        return "does not exist"
    if path.is_dir():
        return ("is a folder, not a checkpoint (give a .ckpt file, e.g. runs/x/checkpoints/last.ckpt, or a sharded "
                "run's checkpoint folder, which holds meta.pt)")
    try:
        with open(path, "rb") as handle:
            head = handle.read(4)
    except OSError as error:
        return f"cannot be read ({error.strerror})"
    if not head:
        return "is empty (0 bytes): not a checkpoint"
    if head != ZIP_MAGIC:
        return "is not a checkpoint: torch checkpoints are zip archives and this file is not one"
    try:
        with zipfile.ZipFile(path) as archive:
            if not any(name.endswith("data.pkl") for name in archive.namelist()):
                return "is a zip archive but not a torch checkpoint (no data.pkl inside)"
    except (zipfile.BadZipFile, OSError):
        return ("is truncated or corrupt: it starts like a checkpoint but its end is missing (a save that was "
                "interrupted, or an incomplete copy)")
    return None


META_FILE = "meta.pt"  # Lightning's name for the non-tensor part of a distributed (sharded) checkpoint folder


def is_sharded_checkpoint(path: str | Path) -> bool:
    """A sharded run's checkpoint (lightning_modules/sharding.py): a folder of DCP shards beside ``meta.pt``."""
    return Path(path).is_dir() and (Path(path) / META_FILE).is_file()


def check_resume_layout(path: str | Path, strategy: Any) -> None:
    """A run resumes from the layout its strategy writes: a sharded folder under ``trainer.strategy=fsdp2``, a
    file under any other (the preflight checks the checkpoint it picks; the sharded strategy checks again)."""
    sharded = is_sharded_checkpoint(path)
    if strategy == SHARDED and not sharded:
        raise CheckpointError(f"{path} is not a sharded checkpoint folder (a {META_FILE} beside DCP shards); a run "
                              f"under trainer.strategy={SHARDED} resumes from the folders it writes")
    if strategy != SHARDED and sharded:
        raise CheckpointError(f"{path} is a sharded checkpoint folder, which a run resumes under "
                              f"trainer.strategy={SHARDED} only (trainer.strategy is {strategy!r}); export.py and "
                              f"generate.py read it under any")


def checkpoint_metadata(path: str | Path) -> dict:
    """The non-tensor part of a sharded checkpoint (``global_step``, hyper-parameters, loops, callbacks)."""
    return load_torch_file(Path(path) / META_FILE, f"sharded checkpoint {str(path)!r} (its {META_FILE})")


def sharded_checkpoint_index(path: Path) -> dict[str, Any]:
    """A sharded checkpoint folder without its tensors: its metadata and its ``state_dict`` keys (from the DCP
    index; the values are None)."""
    checkpoint = checkpoint_metadata(path)
    stored = read_dcp_index(path).state_dict_metadata
    checkpoint["state_dict"] = {key.removeprefix("state_dict."): None for key in stored if key.startswith("state_dict.")}
    return checkpoint


def read_checkpoint(path: str | Path, what: str = "--checkpoint") -> dict[str, Any]:
    """The checkpoint's contents (tensors memory-mapped; a sharded folder's index alone, its tensors are read by
    ``sharding.consolidated_checkpoint``), or CheckpointError saying what is wrong."""
    if is_sharded_checkpoint(path):
        try:
            checkpoint = sharded_checkpoint_index(Path(path))
        except UserError:  # a file that would run code when read: refused as such
            raise
        except Exception as error:  # the DCP reader's errors share no class
            raise CheckpointError(f"{what} {str(path)!r} is a sharded checkpoint folder that cannot be read "
                                  f"({error.__class__.__name__}: {str(error).splitlines()[0] if str(error) else ''}): "
                                  f"a save that was interrupted, or an incomplete copy.") from None
        return _checked_contents(path, what, checkpoint)
    problem = checkpoint_problem(path)
    if problem:
        raise CheckpointError(f"{what} {str(path)!r} {problem}.")

    try:
        checkpoint = load_torch_file(path, f"{what} {str(path)!r}", mmap=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, OSError) as error:
        raise CheckpointError(f"{what} {str(path)!r} is truncated or corrupt and cannot be read "
                              f"({error.__class__.__name__}: {str(error).splitlines()[0] if str(error) else ''}).") from None
    return _checked_contents(path, what, checkpoint)


def _checked_contents(path, what: str, checkpoint: Any) -> dict[str, Any]:
    hyper = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
    if not isinstance(hyper, Mapping) or "model" not in hyper or "state_dict" not in checkpoint:
        kind = "a Lightning checkpoint of another model" if isinstance(checkpoint, dict) and "state_dict" in checkpoint \
            else "a torch file but not a training checkpoint"
        raise CheckpointError(f"{what} {str(path)!r} is {kind}: an LLM4GEN checkpoint holds hyper_parameters.model "
                              f"and a state_dict (train.py writes them to <output_dir>/checkpoints/). A trained CAM "
                              f"folder goes to model.adapter.init_from instead.")
    return checkpoint


def config_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """``model.<field>: checkpoint X, config Y`` for every architecture field that differs."""
    saved_cfg, current_cfg = OmegaConf.create(dict(saved)), OmegaConf.create(dict(current))
    defaults = OmegaConf.structured(ModelConfig)  # a field a checkpoint predates meant its default then
    differences = []
    for field in ARCHITECTURE_FIELDS:
        was = OmegaConf.select(saved_cfg, field, default=OmegaConf.select(defaults, field, default=None))
        now = OmegaConf.select(current_cfg, field, default=None)
        was = OmegaConf.to_container(was) if isinstance(was, (DictConfig,)) or hasattr(was, "_content") else was
        now = OmegaConf.to_container(now) if isinstance(now, (DictConfig,)) or hasattr(now, "_content") else now
        if was != now:
            differences.append(f"model.{field}: checkpoint {was!r}, this config {now!r}")
    return differences


def trainable_groups(keys) -> set[str]:
    """Top-level module names of a checkpoint's trainable keys (adapter, unet, ...)."""
    return {key.split(".", 1)[0] for key in keys}


def load_checkpoint_checked(path: str | Path, model_config: Mapping[str, Any] | DictConfig | None = None,
                            what: str = "--checkpoint") -> dict[str, Any]:
    """Reads a training checkpoint and, given the model config it is meant for, refuses one written with
    another configuration, naming the differing fields. Returns the checkpoint dict."""
    checkpoint = read_checkpoint(path, what)
    if model_config is not None:
        current = OmegaConf.to_container(model_config, resolve=True) if isinstance(model_config, DictConfig) \
            else dict(model_config)
        saved = checkpoint["hyper_parameters"]["model"]
        saved = OmegaConf.to_container(saved, resolve=True) if isinstance(saved, DictConfig) else dict(saved)
        differences = config_differences(saved, current)
        if differences:
            raise CheckpointError(f"{what} {str(path)!r} was written with another configuration: "
                                  f"{'; '.join(differences)}. Set these keys to the checkpoint's values, or start "
                                  f"a new run (resume=never, or another output_dir).")
        expected = {"adapter"} | ({"unet"} if current.get("unet_training", "frozen") != "frozen" else set()) \
            | ({"llm"} if (current.get("llm") or {}).get("lora_rank", 0) > 0 else set()) \
            | ({"fusion"} if (current.get("adapter") or {}).get("fusion") == "gated" else set())
        found = trainable_groups(checkpoint["state_dict"])
        if found != expected:
            raise CheckpointError(f"{what} {str(path)!r} holds trainable weights of {sorted(found)}, this config "
                                  f"trains {sorted(expected)}; was it written with another model.unet_training?")
    return checkpoint

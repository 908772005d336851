"""The one preflight: everything a training run is checked for after its config loads and before any
weights do. ``train.py`` runs it, and so do ``submit.py`` and ``sweep.py`` for every run before anything
is queued, so a mistake fails in seconds on the login node instead of on a compute node after the wait.

``preflight(cfg)`` checks, in order: every model source exists (``check_sources``), the run's paths
(the shards exist and can be read, ``output_dir`` can be written, ``model.adapter.init_from`` is a
CrossAdapter folder or a torch file), the validation scheduler is a diffusers class, a feature cache
was made with this run's settings, and the file ``resume`` names is a checkpoint of this configuration.
It returns the checkpoint to resume from, read and checked once. (The config itself, its keys, types,
ranges and agreement with the models' config files, is ``llm4gen.configs.schema.load_config``'s job.)
"""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import DictConfig

from llm4gen.configs.checks import check_scheduler_name
from llm4gen.configs.errors import ConfigError
from llm4gen.datamodules.webdataset_datamodule import resolve_shards
from llm4gen.encoders.sources import check_source
from llm4gen.lightning_modules import run_checkpoints
from llm4gen.lightning_modules.checkpoint_files import load_checkpoint_checked
from llm4gen.tools.feature_cache import check_cache_key

ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default format is a zip archive
PICKLE_MAGIC = b"\x80"     # torch's legacy format starts with a pickle protocol byte


def is_remote(url: str) -> bool:
    return url.startswith("pipe:") or "://" in url


def check_shards(cfg: DictConfig) -> None:
    """``data.shards`` names readable local shards (remote and pipe: shards are read as training goes)."""
    spec = cfg.data.shards
    if cfg.data.synthetic_if_missing and isinstance(spec, str) and not is_remote(spec) \
            and (not os.path.exists(spec) or (os.path.isdir(spec) and not any(Path(spec).glob("*.tar")))):
        return  # train.py writes synthetic shards there

    try:
        urls = resolve_shards(spec if isinstance(spec, str) else list(spec))
    except FileNotFoundError as error:
        raise ConfigError(f"config key 'data.shards' is {spec!r}, which names no shards: {error}. Give a "
                          f"directory of .tar shards, a brace pattern, a manifest.json or a pipe: command "
                          f"(python prepare.py writes shards from images), or set data.synthetic_if_missing=true "
                          f"to write synthetic ones there.") from None
    except (ValueError, OSError) as error:
        raise ConfigError(f"config key 'data.shards' is {spec!r}, which cannot be read: {error}.") from None
    for url in urls:
        if is_remote(url):
            continue
        if not os.path.isfile(url):
            raise ConfigError(f"config key 'data.shards' is {spec!r}, which lists {url!r}: not a file. Every local "
                              f"shard must exist before training starts.")
        if not os.access(url, os.R_OK):
            raise ConfigError(f"config key 'data.shards' is {spec!r}, which lists {url!r}: not readable by this "
                              f"user (check its permissions).")


def check_output_dir(output_dir: str) -> None:
    """``output_dir`` is a folder, or can be made one, and this user may write there."""
    path = Path(output_dir).expanduser()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"config key 'output_dir' is {output_dir!r}, which is a file, not a folder; choose a "
                          f"folder for the run (e.g. runs/my-run).")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"config key 'output_dir' is {output_dir!r}, but {str(existing)!r} is a file, so the "
                          f"folder cannot be made; choose another output_dir.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"config key 'output_dir' is {output_dir!r}, but {str(existing)!r} is not writable by "
                          f"this user; choose a folder you can write to.")


def looks_like_torch_file(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            head = handle.read(4)
    except OSError:
        return False
    return head == ZIP_MAGIC or head[:1] == PICKLE_MAGIC


def check_init_from(init_from: str | None) -> None:
    """A CrossAdapter ``save_pretrained`` folder (config.json beside the weights) or a torch file such as the
    released ``projector.pth``."""
    if not init_from:
        return
    path = Path(init_from).expanduser()
    if not path.exists():
        raise ConfigError(f"config key 'model.adapter.init_from' is {init_from!r}, which does not exist; give a "
                          f"CrossAdapter save_pretrained folder (e.g. runs/x/export/adapter) or the released "
                          f"projector.pth.")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(f"config key 'model.adapter.init_from' is {init_from!r}, a folder without config.json: "
                              f"not a CrossAdapter save_pretrained folder (e.g. runs/x/export/adapter).")
        return
    if not looks_like_torch_file(path):
        raise ConfigError(f"config key 'model.adapter.init_from' is {init_from!r}, which is not a torch file "
                          f"(the released projector.pth is one) nor a CrossAdapter save_pretrained folder.")


def check_run_paths(cfg: DictConfig) -> None:
    check_output_dir(str(cfg.output_dir))
    check_init_from(cfg.model.adapter.init_from)
    check_shards(cfg)


def check_sources(cfg: DictConfig) -> None:
    """Every configured model source must exist before the first one loads."""
    check_source(cfg.model.base.pretrained, "model.base.pretrained")
    check_source(cfg.model.llm.pretrained, "model.llm.pretrained")
    if cfg.model.base.unet:
        check_source(cfg.model.base.unet, "model.base.unet")
    if cfg.model.llm.tokenizer:
        check_source(cfg.model.llm.tokenizer, "model.llm.tokenizer")


def resume_checkpoint(cfg: DictConfig) -> str | None:
    """The checkpoint ``resume`` names: auto, the newest readable one in ``output_dir`` (None for a new run);
    never, None; a path, that file once it is checked to be a checkpoint of this configuration."""
    if cfg.resume == "never":
        return None
    if cfg.resume == "auto":
        found = run_checkpoints.find_resume_checkpoint(Path(cfg.output_dir))
        return str(found) if found else None
    if not Path(cfg.resume).is_file():
        raise ConfigError(f"resume={cfg.resume!r} is not a checkpoint file; use 'auto', 'never' or a path")
    load_checkpoint_checked(cfg.resume, cfg.model, what="resume=")  # a checkpoint, and of this configuration
    return cfg.resume


def preflight(cfg: DictConfig) -> str | None:
    """Every check of a training run before weights load (see the module docstring); returns the
    checkpoint to resume from, or None."""
    check_sources(cfg)
    check_run_paths(cfg)
    check_scheduler_name(cfg.validation.scheduler, "config key 'validation.scheduler'")
    if cfg.data.precomputed_keys:  # a cache made with other settings is refused before models load
        check_cache_key(cfg.data.shards, cfg)
    return resume_checkpoint(cfg)

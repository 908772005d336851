"""Paths a run depends on, checked before any model loads: the training shards exist and can be read,
``output_dir`` can be written, ``model.adapter.init_from`` is a CrossAdapter folder or a torch file.
(``resume=PATH`` is checked by lightning_modules.checkpoint_files, against the run's config.)"""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import DictConfig

from configs.schema import ConfigError

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
    from datamodules.webdataset_datamodule import resolve_shards

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

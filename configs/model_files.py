"""The models' own config files (``config.json``, ``tokenizer_config.json``), read without their weights from a
local folder or the Hugging Face cache: what the config checks compare a run's settings against, and what the
encoders read before they load a model."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

from huggingface_hub import try_to_load_from_cache

from llm4gen.embedded import registry


def unet_cross_attention_sides(unet_config: dict) -> list[int]:
    """Feature-map sides (at the config's ``sample_size``) of a diffusers UNet2DConditionModel's cross-attention
    layers, read from its config.json alone, largest first: down block i works at sample_size / 2^i (every
    block but the last halves the map), the mid block at the deepest side, up block j mirrors down block
    (n - 1 - j). losses.attention_capture.cross_attention_layer_sides finds the same on a built UNet."""
    size = unet_config.get("sample_size")
    down = list(unet_config.get("down_block_types") or ())
    up = list(unet_config.get("up_block_types") or ())
    if not isinstance(size, int) or not down:
        return []
    deepest = len(down) - 1
    sides = {size // 2**i for i, kind in enumerate(down) if "CrossAttn" in kind}
    sides |= {size // 2**(deepest - j) for j, kind in enumerate(up) if "CrossAttn" in kind}
    if "CrossAttn" in str(unet_config.get("mid_block_type", "UNetMidBlock2DCrossAttn")):
        sides.add(size // 2**deepest)
    return sorted(sides, reverse=True)


def model_json(source: str, filename: str, revision: Optional[str] = None) -> Optional[dict]:
    """A model's small JSON file (``unet/config.json``), from a local folder or the Hugging Face cache,
    without downloading anything and without loading weights; None when it is not on this machine."""
    if source.startswith("embedded:"):
        if source not in registry.EMBEDDED_MODELS:
            return None  # check_source names the unknown model
        root = registry.local_path(source)
        path = root / filename if root else None
        if path is None or not path.is_file():  # a built model before its build: its configs are constants
            return registry.config_json(source, filename)
    elif source.startswith(("/", ".", "~")) or os.path.isdir(os.path.expanduser(source)):
        path = Path(source).expanduser() / filename
    else:
        try:

            found = try_to_load_from_cache(source, filename, revision=revision)
        except Exception:  # an id the hub client refuses is reported by check_source later
            return None
        path = Path(found) if isinstance(found, str) else None
    if path is None or not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def llm_width(config: dict) -> Optional[int]:
    for key in ("hidden_size", "d_model", "n_embd", "dim"):
        if isinstance(config.get(key), int):
            return config[key]
    return None


def llm_layer_count(config: dict) -> Optional[int]:
    """Transformer layers in an LLM's config.json (an encoder-decoder's encoder layers)."""
    for key in ("num_hidden_layers", "num_layers", "n_layer"):
        if isinstance(config.get(key), int):
            return config[key]
    return None


def llm_length_limit(model_config: Optional[dict], tokenizer_config: Optional[dict]) -> Optional[tuple[int, str]]:
    """The most tokens the LLM takes: the tokenizer's model_max_length, or the model's position table."""
    limits = []
    if tokenizer_config and isinstance(tokenizer_config.get("model_max_length"), int) \
            and tokenizer_config["model_max_length"] < 1_000_000:
        limits.append((tokenizer_config["model_max_length"], "the tokenizer's model_max_length"))
    if model_config and isinstance(model_config.get("max_position_embeddings"), int):
        limits.append((model_config["max_position_embeddings"], "the model's max_position_embeddings"))
    return min(limits) if limits else None

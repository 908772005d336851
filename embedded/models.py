"""Embedded models located, and the tiny ones built on first use: ``embedded_path("embedded:tiny-sd")``.

The table of names is ``llm4gen.embedded.registry.EMBEDDED_MODELS``; a built model's entry names its
builder ("module:function"), imported here only when that model is first asked for, so the registry
stays free of torch and holds every name once.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from llm4gen.embedded.registry import model
from llm4gen.embedded.tiny import built_once, minilm_path, shapes_sd_path


def embedded_path(name: str) -> Path:
    """The model's folder, built into the cache first if it is a built model that is not there yet."""
    entry = model(name)
    if entry.kind == "shipped":
        return shapes_sd_path()
    if entry.kind == "package":
        return minilm_path()
    module, _, function = entry.builder.partition(":")
    return built_once(entry.version, getattr(importlib.import_module(module), function))

"""Where model weights come from: a hub id, a local folder, or an ``embedded:`` model of this project.

``check_source`` runs before anything loads (train.py calls it on every configured model), so a typo in
a path fails in a second with a message, not after minutes of loading the other models. Nothing here
downloads: hub ids are handed to ``from_pretrained``, which uses the local Hugging Face cache and, where
the machine is online, the hub. ``load_pretrained`` turns the hub's opaque offline errors into one that
says what to do.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Callable, TypeVar

import torch

from llm4gen.configs.choices import DTYPES
from llm4gen.configs.errors import UserError
from llm4gen.embedded.models import embedded_path
from llm4gen.embedded.registry import EMBEDDED_MODELS

# Config dtype names -> torch dtypes: one table for every model loader.
TORCH_DTYPES = {name: getattr(torch, name) for name in DTYPES}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
T = TypeVar("T")


class ModelSourceError(UserError, ValueError):
    pass


def is_local(source: str) -> bool:
    return source.startswith(("/", ".", "~")) or os.path.exists(source) or not HUB_ID.match(source)


def check_source(source: str, what: str) -> None:
    """Raises ModelSourceError when ``source`` cannot be a model: a missing folder or unknown name."""
    if source.startswith("embedded:"):
        if source not in EMBEDDED_MODELS:
            raise ModelSourceError(f"{what}: unknown embedded model {source!r}; known: {sorted(EMBEDDED_MODELS)}")
        return
    if is_local(source):
        path = Path(source).expanduser()
        if not path.is_dir():
            raise ModelSourceError(
                f"{what}: {source!r} is not an existing folder and not a hub id of the form 'org/name'. "
                f"Point it at a local folder holding the model (as written by save_pretrained) or at a hub id.")


def resolve_source(source: str) -> str:
    """The path or hub id to pass to ``from_pretrained`` (embedded models are built or located here)."""
    if source.startswith("embedded:"):
        check_source(source, "model")
        return str(embedded_path(source))
    return str(Path(source).expanduser()) if is_local(source) else source


def load_pretrained(loader: Callable[..., T], source: str, what: str, **kwargs) -> T:
    """``loader(resolved_source, **kwargs)`` with an actionable error when the weights are not reachable."""
    resolved = resolve_source(source)
    try:
        return loader(resolved, **kwargs)
    except OSError as err:
        hint = ("It is not a local folder, so it must be in the Hugging Face cache or downloadable; this "
                "machine could not get it (offline?). Download it where the hub is reachable "
                f"(`hf download {resolved}`) and point the config at the local folder, or set HF_HOME to "
                "a cache that holds it.") if not is_local(source) else "Check that the folder holds this model."
        raise ModelSourceError(f"{what}: could not load {source!r} ({err.__class__.__name__}: "
                               f"{str(err).splitlines()[0] if str(err) else ''}). {hint}") from err

"""The one reader of the torch files this project reads back, and it cannot run code: training checkpoints
(``.ckpt`` files; a sharded checkpoint folder's ``meta.pt``, its DCP index ``.metadata`` and the non-tensor
entries of its shards) and pretraining's partial stages.

A torch file is a pickle, and unpickling calls whatever functions the file names: a checkpoint can be made to
run a shell command the moment it is read, before anything looks at what it holds. Every read here builds
tensors and plain Python values (dict, list, tuple, str, int, float, bool, None) and nothing else:
``torch.load(weights_only=True)`` for torch files, and for DCP's index, a plain pickle of protocol 4 that
torch's weights-only unpickler cannot parse, an unpickler that resolves only the classes named in
``DCP_INDEX_GLOBALS`` (the standard library's "restricting globals" pattern). What a run writes needs nothing
more: its state is kept as plain types (``CHECKPOINT_GLOBALS`` would name any class that has to stay; none
does). A file that names anything else is refused with :class:`UntrustedCheckpointError`, one paragraph and exit
code 2, before any of it is built. ``--trust-checkpoint`` on the entry points (:func:`trusted_checkpoints`) is
the user's explicit choice to read such a file with full unpickling, running what it holds.

tests/lightning_modules/test_safe_loading.py checks, by reading the package's source, that no other module
unpickles anything without ``weights_only=True``, and that this one does so only under the flag.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import io
import os
import pickle
import re
from pathlib import Path
from typing import Any, Iterator

from llm4gen.configs.errors import UserError

TRUST_FLAG = "--trust-checkpoint"
TRUST_HELP = ("read checkpoints that hold more than tensors and plain values, with full unpickling: a file crafted "
              "to run code when read runs it. Only for files you trust and whose origin you know (docs/using.md)")

# Classes beyond tensors and plain values that a checkpoint of this project may hold, by their import names,
# registered with torch.serialization's safe globals for every read: none. Hyper-parameters, loop, callback,
# EMA, data-position and optimizer state are all dicts, lists, numbers and strings; a class that has to be
# stored in a checkpoint is named here, with why.
CHECKPOINT_GLOBALS: dict[str, str] = {}

# What DCP's index of a sharded checkpoint folder (``.metadata``) names: its own metadata dataclasses, the
# tensor sizes, dtypes and layouts they record, and the path it was saved under. None of them runs anything
# when built from the values a pickle hands it.
DCP_INDEX_GLOBALS: dict[str, frozenset[str]] = {
    "torch.distributed.checkpoint.metadata": frozenset({
        "Metadata", "MetadataIndex", "StorageMeta", "TensorStorageMetadata", "BytesStorageMetadata",
        "ChunkStorageMetadata", "TensorProperties", "_MEM_FORMAT_ENCODING"}),
    "torch.distributed.checkpoint.filesystem": frozenset({"_StorageInfo"}),
    "torch.serialization": frozenset({"_get_layout"}),
    "torch": frozenset({"Size"}),  # and the dtypes (torch.float32, ...): see _dcp_index_global
    "pathlib": frozenset({"Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath"}),
    "collections": frozenset({"OrderedDict"}),
}
DCP_INDEX_FILE = ".metadata"

_trusted = False  # set only by trusted_checkpoints(), which the entry points enter for --trust-checkpoint


class UntrustedCheckpointError(UserError):
    """The file holds more than tensors and plain values: reading it would run code it names. ``detail``: what."""

    def __init__(self, name: str, detail: str):
        super().__init__(refusal(name, detail))
        self.name, self.detail = name, detail

    def __reduce__(self):  # DCP gathers a process's exception to the others by pickling it
        return type(self), (self.name, self.detail)


@contextlib.contextmanager
def trusted_checkpoints(trust: bool = True) -> Iterator[None]:
    """Within it (when ``trust``), files are read with full unpickling: the user's ``--trust-checkpoint``."""
    global _trusted
    before, _trusted = _trusted, bool(trust)
    try:
        yield
    finally:
        _trusted = before


def refusal(name: str, detail: str) -> str:
    """The paragraph a refused file gets: what it holds, why that is not read, and what the user can do."""
    return (f"{name} holds more than tensors and plain Python values ({detail}), so reading it would mean "
            f"unpickling it with code execution allowed, and a file made to run a command when it is read runs it "
            f"then. It was not read, and nothing in it ran. Checkpoints written by llm4gen never need that. If you "
            f"trust this file and whoever made it, pass {TRUST_FLAG} to read it that way; otherwise ask for the "
            f"run's export (export.py: safetensors weights and JSON, which load without running code), or delete "
            f"the file if you did not put it there.")


def _what_it_names(message: str) -> str:
    """The part of torch's weights-only error that says what the file needs."""
    message = re.sub(r"\x1b\[[0-9;]*m", "", message)
    found = re.search(r"GLOBAL (\S+) was not an allowed global", message) or \
        re.search(r"unsupported GLOBAL (\S+) whose module", message)
    if found:
        return f"it names {found.group(1)}"
    found = re.search(r"Unsupported operand (\d+)", message)
    if found:
        return f"pickle instruction {found.group(1)}, which only a full unpickler carries out"
    found = re.search(r"WeightsUnpickler error: (.+)", message)
    return found.group(1).strip().rstrip(".") if found else "an object the weights-only reader does not build"


def load_torch_file(source: str | os.PathLike | io.BytesIO, name: str | None = None, *, mmap: bool = False,
                    map_location: Any = "cpu") -> Any:
    """A ``torch.save`` file's contents, built without running code: tensors and plain values only (the
    classes in ``CHECKPOINT_GLOBALS`` too), or :class:`UntrustedCheckpointError` naming what it holds beyond
    them. Under :func:`trusted_checkpoints`, full unpickling. ``mmap``: tensors stay in the file until used
    (a path only). Errors of a truncated or corrupt file (zip, EOF, runtime) pass through as torch raises them."""
    import torch  # slow to import; configs/ and the CLIs' refusals run without it

    name = name or f"checkpoint {str(source)!r}"
    options = {"map_location": map_location, "mmap": mmap and not isinstance(source, io.IOBase)}
    if _trusted:
        return torch.load(source, weights_only=False, **options)
    allowed = _checkpoint_globals()
    try:  # safe_globals is torch >= 2.5; with nothing registered, 2.2's weights-only reader does the same
        with torch.serialization.safe_globals(allowed) if allowed else contextlib.nullcontext():
            return torch.load(source, weights_only=True, **options)
    except pickle.UnpicklingError as error:
        if "Weights only load failed" not in str(error):
            raise  # not the weights-only reader's refusal: a corrupt file, reported as such by the caller
        raise UntrustedCheckpointError(name, _what_it_names(str(error))) from None


@functools.cache
def _checkpoint_globals() -> list:
    found = []
    for full_name in CHECKPOINT_GLOBALS:
        module, _, attribute = full_name.rpartition(".")
        found.append(getattr(importlib.import_module(module), attribute))
    return found


# ---------------------------------------------------------------- sharded checkpoint folders (torch DCP)


def _dcp_index_global(module: str, name: str) -> Any:
    import torch

    if name in DCP_INDEX_GLOBALS.get(module, ()):
        return getattr(importlib.import_module(module), name)
    if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
        return getattr(torch, name)
    raise pickle.UnpicklingError(f"it names {module}.{name}")


class _DCPIndexUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        return _dcp_index_global(module, name)


def read_dcp_index(folder: str | os.PathLike, name: str | None = None):
    """A sharded checkpoint folder's DCP index (``torch.distributed.checkpoint.metadata.Metadata``: every entry's
    name, shape, dtype and where its bytes lie), built from the classes in ``DCP_INDEX_GLOBALS`` alone."""
    path = Path(folder) / DCP_INDEX_FILE
    name = name or f"sharded checkpoint {str(folder)!r}"
    with open(path, "rb") as handle:
        if _trusted:
            return pickle.load(handle)  # --trust-checkpoint: DCP's own reading
        try:
            return _DCPIndexUnpickler(handle).load()
        except pickle.UnpicklingError as error:
            if str(error).startswith("it names "):
                raise UntrustedCheckpointError(f"{name} (its {DCP_INDEX_FILE})", str(error)) from None
            raise


def dcp_load(state: dict[str, Any], folder: str | os.PathLike) -> None:
    """DCP's ``load`` of ``folder`` into ``state`` (resharded to this run's processes), its index and non-tensor
    entries read as :func:`read_dcp_index` and :func:`load_torch_file` read them."""
    from torch.distributed.checkpoint import load

    read_dcp_index(folder)  # refused here in one piece: DCP reports a failing index read as an AssertionError
    with _refusal_unwrapped():
        load(state, storage_reader=_dcp_classes()["reader"](folder), planner=_dcp_classes()["given"]())


def read_dcp_checkpoint(folder: str | os.PathLike) -> dict[str, Any]:
    """Every entry of a DCP checkpoint folder, whole, in this process: ``{"state_dict": {...}, "optimizer_0": ...}``
    (what Lightning's ``_load_distributed_checkpoint`` reads, without its unpickling)."""
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    read_dcp_index(folder)
    contents: dict[str, Any] = {}
    with _refusal_unwrapped():
        _load_state_dict(contents, storage_reader=_dcp_classes()["reader"](folder),
                         planner=_dcp_classes()["everything"](), no_dist=True)
    return contents


@contextlib.contextmanager
def _refusal_unwrapped() -> Iterator[None]:
    """DCP gathers each process's exception into a CheckpointException: a refusal comes out as itself."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        yield
    except CheckpointException as error:
        for failure, _ in error.failures.values():
            if isinstance(failure, UntrustedCheckpointError):
                raise failure from None
        raise


@functools.cache
def _dcp_classes() -> dict[str, type]:
    """Built on first use: importing torch.distributed.checkpoint costs more than a second."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint._traverse import set_element
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.format_utils import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeIndexReader(FileSystemReader):
        """DCP's reader of a folder, its index read by read_dcp_index."""

        def read_metadata(self, *args: Any, **kwargs: Any):
            metadata = read_dcp_index(self.path)
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    class SafeBytes:
        """DefaultLoadPlanner.load_bytes, its ``torch.load(weights_only=False)`` replaced by load_torch_file."""

        def load_bytes(self, read_item, value) -> None:
            fqn = read_item.dest_index.fqn
            loaded = load_torch_file(value, f"the sharded checkpoint's entry {fqn!r}")
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[fqn], loaded)
            else:
                self.state_dict[fqn] = loaded

    class SafeLoadPlanner(SafeBytes, DefaultLoadPlanner):
        pass

    class SafeEverythingPlanner(SafeBytes, _EmptyStateDictLoadPlanner):
        pass

    return {"reader": SafeIndexReader, "given": SafeLoadPlanner, "everything": SafeEverythingPlanner}

"""Shard lists (directories, brace patterns, ``pipe:`` commands, manifests), their order per epoch, rank and
worker, tar reading grouped by sample key, and the seeded shuffle buffer: the deterministic stages the stream
(datamodules/stream.py) is built from."""

from __future__ import annotations

import glob
import json
import os
import random
import tarfile
from typing import Any, Iterator, Optional, Sequence, Union

import braceexpand
import webdataset as wds
from webdataset.tariterators import base_plus_ext

from llm4gen.datamodules.transforms import SampleError


# ---------------------------------------------------------------- shard lists


def resolve_shards(shards: Union[str, Sequence[str]]) -> list[str]:
    """Shard spec -> ordered list of shard URLs.

    Accepts a list (each item resolved), a brace pattern (``data/shard-{000000..000009}.tar``), a
    ``pipe:`` command or remote URL (brace-expanded, not checked), a directory (its ``manifest.json``
    if it has one, else all ``*.tar`` in it, sorted) or a ``*.json`` manifest: a list, or ``{"shards": [...]}``, of paths (relative to the
    manifest) or of objects with a ``"url"`` or ``"path"``, and optionally ``"companions"``: shards read in
    lockstep with it (a :class:`LockstepShard`; recaption.py's output folders list their dense captions so).
    """
    if not isinstance(shards, str):
        resolved = [url for item in shards for url in resolve_shards(str(item))]
        if not resolved:
            raise ValueError("the shard list is empty; give at least one shard path, pattern or directory")
        return resolved
    spec = shards.strip()
    if spec.startswith("pipe:") or "://" in spec:
        return list(braceexpand.braceexpand(spec))
    if os.path.isdir(spec):
        if os.path.isfile(os.path.join(spec, "manifest.json")):  # a prepare.py output folder
            return _read_manifest(os.path.join(spec, "manifest.json"))
        found = sorted(glob.glob(os.path.join(spec, "*.tar")))
        if not found:
            raise FileNotFoundError(f"directory {spec!r} holds no *.tar shards and no manifest.json")
        return found
    if spec.endswith(".json"):
        return _read_manifest(spec)
    expanded = list(braceexpand.braceexpand(spec))
    missing = [path for path in expanded if not os.path.exists(path)]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} of {len(expanded)} shards named by {spec!r} do not exist (first: {missing[0]!r})"
        )
    return expanded


def _read_manifest(path: str) -> list[str]:
    return [url for url, _ in manifest_entries(path)]


def manifest_entries(path: str) -> list[tuple[str, dict[str, Any]]]:
    """(url, the entry as written: ``{}`` for a bare path) per shard of a manifest, urls resolved as in
    :func:`resolve_shards`; prepare.py's entries also record ``samples`` and ``bytes``."""
    with open(path, encoding="utf-8") as handle:
        manifest = json.load(handle)
    entries = manifest.get("shards") if isinstance(manifest, dict) else manifest
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"manifest {path!r} must be a non-empty list or an object with a 'shards' list")
    base = os.path.dirname(os.path.abspath(path))
    resolved = []
    for entry in entries:
        url = entry if isinstance(entry, str) else (entry.get("url") or entry.get("path"))
        if not isinstance(url, str):
            raise ValueError(f"manifest {path!r}: entry {entry!r} is neither a path nor an object with 'url'/'path'")
        url = _relative_to(base, url)
        companions = entry.get("companions") if isinstance(entry, dict) else None
        if companions:
            if not isinstance(companions, list) or not all(isinstance(c, str) and c for c in companions):
                raise ValueError(f"manifest {path!r}: entry {entry!r} has 'companions' that are not a list of paths")
            url = LockstepShard(url, [_relative_to(base, c) for c in companions])
        resolved.append((url, entry if isinstance(entry, dict) else {}))
    return resolved


def _relative_to(base: str, url: str) -> str:
    is_local = not (url.startswith("pipe:") or "://" in url)
    return os.path.normpath(os.path.join(base, url)) if is_local and not os.path.isabs(url) else url


class LockstepShard(str):
    """A shard read together with companion shards that hold more members of the same samples, in the same
    order (recaption.py writes dense captions so: ``KEY.dense.txt`` beside the image shard's ``KEY.jpg``).

    The string is the shard's own URL, so everything that lists, orders, splits or names shards treats it as
    that shard; :func:`iter_tar_samples` reads ``companions`` beside it and merges each sample's members."""

    companions: tuple[str, ...]

    def __new__(cls, url: str, companions: Sequence[str]) -> "LockstepShard":
        shard = super().__new__(cls, url)
        shard.companions = tuple(str(c) for c in companions)
        return shard

    def __reduce__(self):  # into DataLoader workers and spawned processes with its companions
        return LockstepShard, (str(self), self.companions)

    def __repr__(self) -> str:
        return f"LockstepShard({str(self)!r}, companions={list(self.companions)!r})"


def epoch_shard_order(shards: Sequence[str], seed: int, epoch: int, round_index: int = 0) -> list[str]:
    """The shard order of one epoch (and repeat round): the same on every rank and worker."""
    order = list(shards)
    random.Random(f"shards/{seed}/{epoch}/{round_index}").shuffle(order)
    return order


def epoch_shard_numbers(num_shards: int, seed: int, epoch: int, shuffle: bool = True, round_index: int = 0) -> list[int]:
    """Shard numbers (places in the resolved list) in the order of one epoch (and repeat round); the same
    permutation :func:`epoch_shard_order` applies to the shard list."""
    numbers = list(range(num_shards))
    return epoch_shard_order(numbers, seed, epoch, round_index) if shuffle else numbers


def assign_shards(order: Sequence[str], rank: int, world_size: int, worker: int, num_workers: int) -> list[str]:
    """The shards one (rank, worker) reads: rank-strided, then worker-strided, so disjoint and covering."""
    return list(order[rank::world_size][worker::num_workers])


# ---------------------------------------------------------------- raw samples


def iter_tar_samples(url: str) -> Iterator[dict[str, Any]]:
    """Raw samples ``{"__key__", "__url__", ext: bytes}`` of one tar, members grouped by key; of a
    :class:`LockstepShard`, each sample with its companions' members added.

    Raises ``SampleError("bad_shard")`` when the tar cannot be opened or breaks part-way; the
    samples completed before the break have been yielded, the one being read is dropped.
    """
    companions = getattr(url, "companions", ())
    if companions:
        return _lockstep_samples(str(url), companions)
    return _tar_samples(str(url))


def _lockstep_samples(url: str, companions: Sequence[str]) -> Iterator[dict[str, Any]]:
    """The shard's samples with the members of the same sample in each companion: the companions must hold
    the same keys in the same order (a companion out of step is a ``bad_shard``, never a silent mismatch)."""
    readers = [_tar_samples(companion) for companion in companions]
    try:
        for index, sample in enumerate(_tar_samples(url)):
            for companion, reader in zip(companions, readers):
                extra = next(reader, None)
                if extra is None or extra["__key__"] != sample["__key__"]:
                    found = "its end" if extra is None else f"key {extra['__key__']!r}"
                    raise SampleError("bad_shard", f"companion {companion} is out of step with {url} at sample {index}: "
                                                   f"expected key {sample['__key__']!r}, found {found}; was it written "
                                                   f"for another version of the shard?")
                clash = sorted(set(extra) & set(sample) - {"__key__", "__url__"})
                if clash:
                    raise SampleError("bad_shard", f"companion {companion} repeats members {clash} of {url} "
                                                   f"(sample {sample['__key__']!r})")
                sample.update((name, value) for name, value in extra.items() if not name.startswith("__"))
            yield sample
        for companion, reader in zip(companions, readers):
            extra = next(reader, None)
            if extra is not None:
                raise SampleError("bad_shard", f"companion {companion} holds sample {extra['__key__']!r} after the "
                                               f"last sample of {url}; was it written for another version of the shard?")
    finally:
        for reader in readers:
            reader.close()


def _tar_samples(url: str) -> Iterator[dict[str, Any]]:
    try:
        stream = wds.gopen(url, "rb")
    except Exception as error:
        raise SampleError("bad_shard", f"cannot open {url}: {error}") from error
    current: Optional[dict[str, Any]] = None
    try:
        with tarfile.open(fileobj=stream, mode="r|*") as tar:
            for member in tar:
                if not member.isreg():
                    continue
                key, extension = base_plus_ext(member.name)
                if key is None or os.path.basename(key).startswith("__"):
                    continue
                if current is not None and key != current["__key__"]:
                    yield current  # complete before the next member is read, so a break there keeps it
                    current = None
                if current is None:
                    current = {"__key__": key, "__url__": url}
                current[extension.lower()] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError, ValueError) as error:
        raise SampleError("bad_shard", f"{url}: {type(error).__name__}: {error}") from error
    finally:
        try:
            stream.close()
        except Exception:  # a pipe: command stopped early reports a non-zero status; nothing to do
            pass
    if current is not None:
        yield current


# Marks the end of one round over a (rank, worker)'s shards in the raw stream: the shuffle buffer
# empties before the next round's samples enter, so with ``epoch_batches`` a rank that holds exactly
# epoch_batches * batch_size samples uses each once per epoch (a repeat round never leaks in early).
ROUND_END = object()


_END = object()


class ShuffleBuffer:
    """Approximate shuffle through a buffer of ``size`` items; size <= 1 keeps the order. A
    ``ROUND_END`` item flushes the buffer (shuffled) and is not passed on.

    An iterator object rather than a generator so that its state can be saved by *place*: with raw
    samples tagged ``__place__`` = (shard number in the worker's shard stream, index in the shard),
    :meth:`state` names the buffered samples and the RNG state, and a resumed worker refills the
    buffer by reading just those samples (see ``ShardStream._restore``) instead of replaying the epoch.
    """

    def __init__(self, samples: Iterator[Any], size: int, rng: random.Random,
                 buffer: Sequence[Any] = (), draining: Sequence[Any] = ()):
        self.samples, self.size, self.rng = iter(samples), size, rng
        self.buffer = list(buffer)
        self.draining = list(draining)  # flushed items still to yield, last first (pop from the end)
        self._exhausted = False

    def __iter__(self) -> "ShuffleBuffer":
        return self

    def __next__(self) -> Any:
        while True:
            if self.draining:
                return self.draining.pop()
            if self._exhausted:
                raise StopIteration
            sample = next(self.samples, _END)
            if sample is _END or sample is ROUND_END:
                self._exhausted = sample is _END
                if self.size > 1:
                    self.rng.shuffle(self.buffer)
                self.draining, self.buffer = self.buffer[::-1], []
                continue
            if self.size <= 1:
                return sample
            if len(self.buffer) < self.size:
                self.buffer.append(sample)
                continue
            index = self.rng.randrange(self.size)
            self.buffer[index], sample = sample, self.buffer[index]
            return sample

    def state(self) -> dict[str, Any]:
        version, internal, gauss = self.rng.getstate()
        return {"buffer": [list(s["__place__"]) for s in self.buffer],
                "draining": [list(s["__place__"]) for s in self.draining],
                "rng": [version, list(internal), gauss]}


def shuffle_buffer(samples: Iterator[Any], size: int, rng: random.Random) -> Iterator[Any]:
    """Approximate shuffle through a buffer of ``size`` items (see :class:`ShuffleBuffer`)."""
    return ShuffleBuffer(samples, size, rng)



"""WebDataset shards -> batches of (keys, captions, pixels or precomputed features), resumable mid-epoch.

Why not ``wds.WebDataset`` as is: an exact restart needs every stage to be a deterministic function
of (seed, epoch, rank, worker) and a cheap way to fast-forward. So the stream is built here from
small generator stages (webdataset supplies URL opening, ``pipe:`` commands, brace expansion and the
member naming), each of them deterministic:

  shard order     ``random.Random(seed, epoch)`` shuffles the shard list, then rank ``r`` takes
                  ``order[r::world_size]`` and logical worker ``w`` takes ``[w::num_workers]`` of that
                  (resampled mode: each (rank, worker) draws shards with replacement from its own RNG)
  raw samples     tar members grouped by key; a tar that breaks counts one ``bad_shard`` and the
                  stream goes on with the next shard
  shuffle buffer  seeded from (seed, epoch, rank, worker)
  decode          caption, then pixels (skipped when latents are precomputed) or cached members; a
                  bad sample raises ``SampleError`` and is counted, never fatal
  batch           batching happens inside the worker (cheap IPC: one pickled batch, not B samples);
                  with aspect-ratio ``buckets`` (``datamodules/buckets.py``) the worker keeps one waiting
                  list per bucket and a batch is one full list, so every batch is one bucket

Position and resume. Every batch carries ``batch["position"]``: its epoch, the logical worker that
made it, that worker's batch count and its *cursor* (how many shuffled raw samples it had used). The
trainer reports each batch it trains on with :meth:`WebDatasetDataModule.on_batch_consumed`; the
datamodule keeps, per worker, the cursor of its last consumed batch and which worker is next.
``state_dict()`` (stored by Lightning in every checkpoint, gathered from all ranks) holds this. On
restore each worker replays its raw stream up to its cursor *without decoding* (reading tar bytes
only) and continues, and the logical worker ids are rotated so that physical worker 0 is the one
whose batch was due next. A DataLoader takes batches from its workers round-robin, dropping a
worker once it is exhausted, so the resumed stream equals the uninterrupted one batch for batch.
Requirements: the same shards, seed, batch size, shuffle buffer, num_workers and world size (a
different num_workers or world size restarts the saved epoch from its beginning, with a warning),
and ``persistent_workers`` off (the epoch and the resume position reach the workers when the
DataLoader starts them, once per pass).

Buckets. Samples waiting in a partly filled bucket were taken from the stream before the cursor, so
the snapshot also names them by place (``"groups"``); a resumed worker re-reads and re-decodes them
(decoding is a pure function of seed, epoch and key). When a worker's data ends, its partly filled
buckets are emitted as smaller batches, one per bucket in (height, width) order: an epoch without
``epoch_batches`` uses every sample once. Under ``epoch_batches`` the stream repeats, so only full
batches are made and samples still waiting when the quota is reached are not used that epoch. With
cached latents the bucket of a sample is the size of its latents (``cache.py`` writes them at it).

Epochs. The data epoch is this module's own counter, not the trainer's: it advances when a pass
over the train DataLoader runs to its end, so a pass stopped early (``limit_train_batches``, a
``break``) is continued by the next pass. No ``reload_dataloaders_every_n_epochs`` is needed.

DDP. Set ``epoch_batches``: every rank then yields exactly that many full batches per epoch
(shards repeat within the epoch if needed, each repeat round going through the shuffle buffer on
its own, so a rank whose shards hold exactly epoch_batches x batch_size samples uses each sample once
per epoch; with buckets, samples waiting in a partly filled bucket at the quota are not), so ranks with fewer samples never leave the others waiting in a collective. Without it, ranks get ``len(shards) / world_size`` shards each and may
finish at different times.
"""

from __future__ import annotations

import glob
import io
import itertools
import json
import os
import random
import tarfile
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Optional, Sequence, Union

import braceexpand
import lightning as L
import numpy as np
import torch
import torch.distributed as dist
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import base_plus_ext

from llm4gen.configs.schema import Config, DataConfig
from llm4gen.datamodules.entity_targets import EntityTargetBuilder
from llm4gen.datamodules.transforms import (
    SKIP_REASONS,
    SampleError,
    extract_caption,
    find_image_member,
    check_download_status,
    original_size,
    preprocess_image_with_geometry,
    sample_rng,
)
from llm4gen.losses.entity import EntityTargets
from llm4gen.losses.entity_parser import EntityParser, groups_to_json

__all__ = [
    "PRECOMPUTED_MEMBERS",
    "SKIP_REASONS",
    "WebDatasetDataModule",
    "collate_samples",
    "encode_precomputed",
    "pad_llm_features",
    "resolve_shards",
]

# Batch field -> tar member extension written by the cache writer (``sample-000123.latent_moments.npy``).
# ``.npy`` is canonical; a ``.pt`` member with the same stem (``latent_moments.pt``) is read as well.
PRECOMPUTED_MEMBERS: dict[str, str] = {
    "latent_moments": "latent_moments.npy",  # (2C, h, w) the VAE posterior's mean and log-variance (sampled at train time, like online encoding)
    "llm_features": "llm_features.npy",  # (tokens, dim), unpadded: only the caption's real tokens
    "clip_features": "clip_features.npy",  # (77, clip_dim) CLIP's last hidden state of the caption
    "clip_pooled": "clip_pooled.npy",  # (pooled_dim,) SDXL only: written and read with clip_features
    # Written and read with latent_moments (the image is not decoded then): SDXL's size/crop conditioning.
    "original_size": "original_size.npy",  # (2,) (height, width) before any resize
    "crop_top_left": "crop_top_left.npy",  # (2,) (top, left) of the crop in the resized image
    "entities": "entities.json",  # the entity parse of the caption, passed through as parsed JSON
    # its words' positions in the fused [CLIP, LLM] context: {"positions": [[int]], "num_tokens": int}
    "entity_positions": "entity_positions.json",
}
_JSON_MEMBERS = ("entities", "entity_positions")

BOOKKEEPING = ("keys", "skipped", "position")  # batch fields for the datamodule, not for the model
_REASON_INDEX = {reason: i for i, reason in enumerate(SKIP_REASONS)}
_MAX_CONSECUTIVE_FAILURES = 10_000


# ---------------------------------------------------------------- shard lists


def resolve_shards(shards: Union[str, Sequence[str]]) -> list[str]:
    """Shard spec -> ordered list of shard URLs.

    Accepts a list (each item resolved), a brace pattern (``data/shard-{000000..000009}.tar``), a
    ``pipe:`` command or remote URL (brace-expanded, not checked), a directory (its ``manifest.json``
    if it has one, else all ``*.tar`` in it, sorted) or a ``*.json`` manifest: a list, or ``{"shards": [...]}``, of paths (relative to the
    manifest) or of objects with a ``"url"`` or ``"path"``.
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
    with open(path, encoding="utf-8") as handle:
        manifest = json.load(handle)
    entries = manifest.get("shards") if isinstance(manifest, dict) else manifest
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"manifest {path!r} must be a non-empty list or an object with a 'shards' list")
    base = os.path.dirname(os.path.abspath(path))
    urls = []
    for entry in entries:
        url = entry if isinstance(entry, str) else (entry.get("url") or entry.get("path"))
        if not isinstance(url, str):
            raise ValueError(f"manifest {path!r}: entry {entry!r} is neither a path nor an object with 'url'/'path'")
        is_local = not (url.startswith("pipe:") or "://" in url)
        urls.append(os.path.normpath(os.path.join(base, url)) if is_local and not os.path.isabs(url) else url)
    return urls


def epoch_shard_order(shards: Sequence[str], seed: int, epoch: int, round_index: int = 0) -> list[str]:
    """The shard order of one epoch (and repeat round): the same on every rank and worker."""
    order = list(shards)
    random.Random(f"shards/{seed}/{epoch}/{round_index}").shuffle(order)
    return order


def assign_shards(order: Sequence[str], rank: int, world_size: int, worker: int, num_workers: int) -> list[str]:
    """The shards one (rank, worker) reads: rank-strided, then worker-strided, so disjoint and covering."""
    return list(order[rank::world_size][worker::num_workers])


# ---------------------------------------------------------------- raw samples


def iter_tar_samples(url: str) -> Iterator[dict[str, Any]]:
    """Raw samples ``{"__key__", "__url__", ext: bytes}`` of one tar, members grouped by key.

    Raises ``SampleError("bad_shard")`` when the tar cannot be opened or breaks part-way; the
    samples completed before the break have been yielded, the one being read is dropped.
    """
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


# ---------------------------------------------------------------- precomputed members


def encode_precomputed(
    latent_moments: Optional[Union[np.ndarray, torch.Tensor]] = None,
    llm_features: Optional[Union[np.ndarray, torch.Tensor]] = None,
    entities: Optional[Any] = None,
    clip_features: Optional[Union[np.ndarray, torch.Tensor]] = None,
    clip_pooled: Optional[Union[np.ndarray, torch.Tensor]] = None,
    original_size: Optional[Sequence[int]] = None,
    crop_top_left: Optional[Sequence[int]] = None,
    entity_positions: Optional[Mapping[str, Any]] = None,
) -> dict[str, bytes]:
    """Tar members for one sample's cached values, named by :data:`PRECOMPUTED_MEMBERS`.

    Arrays keep their dtype (write float16 to halve the cache); the loader returns float32.
    ``llm_features`` is ``(tokens, dim)`` of the caption's real tokens only (no padding).
    """
    members: dict[str, bytes] = {}
    for name, value in (("latent_moments", latent_moments), ("llm_features", llm_features), ("clip_features", clip_features),
                        ("clip_pooled", clip_pooled), ("original_size", original_size), ("crop_top_left", crop_top_left)):
        if value is None:
            continue
        array = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
        expected_ndim = _EXPECTED_NDIM.get(name, 2)
        if array.ndim != expected_ndim:
            raise ValueError(f"{name} must have {expected_ndim} dims per sample, got shape {array.shape}")
        buffer = io.BytesIO()
        np.save(buffer, array, allow_pickle=False)
        members[PRECOMPUTED_MEMBERS[name]] = buffer.getvalue()
    for name, value in (("entities", entities), ("entity_positions", entity_positions)):
        if value is not None:
            members[PRECOMPUTED_MEMBERS[name]] = json.dumps(value).encode("utf-8")
    return members


_EXPECTED_NDIM = {"latent_moments": 3, "clip_pooled": 1, "original_size": 1, "crop_top_left": 1}
_GEOMETRY = ("original_size", "crop_top_left")


def _load_array(sample: Mapping[str, Any], name: str) -> torch.Tensor:
    extension = PRECOMPUTED_MEMBERS[name]
    torch_extension = extension.rsplit(".", 1)[0] + ".pt"
    if extension in sample:
        array = np.load(io.BytesIO(sample[extension]), allow_pickle=False)
        return torch.from_numpy(np.ascontiguousarray(array)).float()
    if torch_extension in sample:
        return torch.load(io.BytesIO(sample[torch_extension]), weights_only=True).float()
    raise SampleError("bad_precomputed", f"member {extension!r} (or {torch_extension!r}) is missing")


def decode_precomputed(sample: Mapping[str, Any], fields: Sequence[str]) -> dict[str, Any]:
    """The requested cached fields of a raw sample, or ``SampleError("bad_precomputed")``."""
    out: dict[str, Any] = {}
    try:
        for name in fields:
            if name in _JSON_MEMBERS:
                raw = sample.get(PRECOMPUTED_MEMBERS[name])
                if raw is None:
                    raise SampleError("bad_precomputed", f"member {PRECOMPUTED_MEMBERS[name]!r} is missing")
                out[name] = json.loads(raw)
                continue
            names = [name]
            if name == "clip_features" and PRECOMPUTED_MEMBERS["clip_pooled"] in sample:
                names.append("clip_pooled")  # an SDXL cache: the pooled embedding comes with the hidden states
            if name == "latent_moments":
                names += [g for g in _GEOMETRY if PRECOMPUTED_MEMBERS[g] in sample]
            for part in names:
                tensor = _load_array(sample, part)
                if tensor.ndim != _EXPECTED_NDIM.get(part, 2) or tensor.shape[0] == 0:
                    raise SampleError("bad_precomputed", f"{part} has shape {tuple(tensor.shape)}")
                out[part] = tuple(int(v) for v in tensor.tolist()) if part in _GEOMETRY else tensor
    except SampleError:
        raise
    except Exception as error:
        raise SampleError("bad_precomputed", f"{type(error).__name__}: {error}") from error
    return out


# ---------------------------------------------------------------- collation


def pad_llm_features(features: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Unpadded per-sample ``(tokens_i, dim)`` -> ``(batch, max_tokens, dim)`` zeros-padded + bool mask."""
    dims = {f.shape[1] for f in features}
    if len(dims) != 1:
        raise ValueError(f"llm_features in one batch have different widths {sorted(dims)}; the cache mixes LLMs")
    longest = max(f.shape[0] for f in features)
    padded = features[0].new_zeros((len(features), longest, dims.pop()))  # (batch, tokens, dim)
    mask = torch.zeros((len(features), longest), dtype=torch.bool)  # (batch, tokens)
    for i, f in enumerate(features):
        padded[i, : f.shape[0]] = f
        mask[i, : f.shape[0]] = True
    return padded, mask


def collate_samples(samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Decoded samples -> the batch dict (see :class:`WebDatasetDataModule` for the contract)."""
    batch: dict[str, Any] = {
        "keys": [s["key"] for s in samples],
        "captions": [s["caption"] for s in samples],
    }
    if "pixel_values" in samples[0]:
        # np.stack, not torch.stack: torch's parallel copy wakes its intra-op thread pool, which with
        # num_workers=0 fights the training step for the cores (measured 100x slower on 2 busy cores).
        pixels = np.stack([s["pixel_values"].numpy() for s in samples])
        batch["pixel_values"] = torch.from_numpy(pixels)  # (batch, 3, H, W)
    if "latent_moments" in samples[0]:
        shapes = {tuple(s["latent_moments"].shape) for s in samples}
        if len(shapes) != 1:
            raise ValueError(f"latents in one batch have different shapes {sorted(shapes)}; cache one resolution")
        batch["latent_moments"] = torch.stack([s["latent_moments"] for s in samples])  # (batch, C, h, w)
    if "llm_features" in samples[0]:
        batch["llm_features"], batch["llm_mask"] = pad_llm_features([s["llm_features"] for s in samples])
    if "clip_features" in samples[0]:
        batch["clip_features"] = torch.stack([s["clip_features"] for s in samples])  # (batch, 77, clip_dim)
    for name in ("original_size", "crop_top_left"):  # SDXL's add_time_ids read them
        if name in samples[0]:
            batch[name] = torch.tensor([s[name] for s in samples], dtype=torch.long)  # (batch, 2)
    if "clip_pooled" in samples[0]:
        batch["clip_pooled"] = torch.stack([s["clip_pooled"] for s in samples])  # (batch, pooled_dim)
    for name in _JSON_MEMBERS:
        if name in samples[0]:
            batch[name] = [s[name] for s in samples]
    return batch


_PARSERS: dict[str, Any] = {}


def targets_of_batch(builder: EntityTargetBuilder, batch: dict[str, Any]) -> EntityTargets:
    """The batch's entity-loss targets: from its cached positions (no tokenizer runs) or aligned now."""
    cached = batch.pop("entity_positions", None)
    if cached is None:
        return builder(batch["captions"], batch["entities"])
    lengths = {c["num_tokens"] for c in cached}
    if len(lengths) != 1:
        raise ValueError(f"cached entity positions of one batch index different context lengths {sorted(lengths)}")
    return builder(batch["captions"], batch["entities"], [c["positions"] for c in cached], lengths.pop())


def parse_entities(model: str, captions: Sequence[str]) -> list[list[dict]]:
    """Entity groups of each caption as JSON, parsed in the worker that made the batch (one spaCy
    pipeline per process, loaded on first use): parsing never runs inside the training step."""
    if model not in _PARSERS:
        _PARSERS[model] = EntityParser(model)
    return [groups_to_json(groups) for groups in _PARSERS[model].parse_many(captions)]


# ---------------------------------------------------------------- the stream


@dataclass
class WorkerPosition:
    """How far one logical worker got: shuffled raw samples used, and batches made."""

    cursor: int = 0
    batches: int = 0
    # Where the stream stood at ``cursor`` (ShardStream._snapshot): lets a resumed worker skip whole
    # shards instead of re-reading everything before the cursor. None: replay (older checkpoints).
    snapshot: Optional[dict[str, Any]] = None


@dataclass
class PassPlan:
    """Everything a worker needs to produce its part of one pass (pickled into each worker)."""

    epoch: int
    rank: int
    world_size: int
    num_workers: int
    first_worker: int = 0  # logical id of physical worker 0 (rotation after a resume)
    workers: list[WorkerPosition] = field(default_factory=list)


@dataclass
class StreamConfig:
    shards: list[str]
    batch_size: int
    resolution: int
    center_crop: bool
    random_flip: bool
    caption_keys: tuple[str, ...]
    shuffle_buffer: int
    shuffle_shards: bool
    resampled: bool
    seed: int
    epoch_batches: Optional[int]
    precomputed_keys: tuple[str, ...]
    entity_parser: Optional[str] = None  # spaCy model: parse captions in the worker (unless cached)
    buckets: Optional[list[tuple[int, int]]] = None  # (width, height) aspect-ratio buckets; None: square crops
    entity_targets: Optional[EntityTargetBuilder] = None  # builds each batch's entity-loss targets in the worker


class ShardStream(IterableDataset):
    """The per-worker pipeline; ``plan`` is set by the DataLoader wrapper before each pass."""

    def __init__(self, config: StreamConfig):
        super().__init__()
        self.config = config
        self.plan: Optional[PassPlan] = None

    def __len__(self) -> int:
        if self.config.epoch_batches is None:
            raise TypeError("the number of batches is only known when epoch_batches is set")
        return self.config.epoch_batches

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self.plan is None:
            raise RuntimeError("iterate the DataLoader from WebDatasetDataModule.train_dataloader(), not the dataset")
        info = get_worker_info()
        physical, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if num_workers != self.plan.num_workers:
            raise RuntimeError(f"plan made for {self.plan.num_workers} workers but the DataLoader runs {num_workers}")
        worker = (physical + self.plan.first_worker) % num_workers
        return self._worker_batches(worker, self.plan.workers[worker])

    def worker_quota(self, worker: int) -> Optional[int]:
        """Batches this logical worker makes per epoch under ``epoch_batches`` (None: until data ends)."""
        total = self.config.epoch_batches
        if total is None:
            return None
        workers = self.plan.num_workers
        return total // workers + (1 if worker < total % workers else 0)

    def _shard_stream(self, worker: int) -> Iterator[Any]:
        c, p = self.config, self.plan
        if c.resampled:
            rng = random.Random(f"resample/{c.seed}/{p.epoch}/{p.rank}/{worker}")
            while True:
                yield rng.choice(c.shards)
        for round_index in itertools.count():
            order = epoch_shard_order(c.shards, c.seed, p.epoch, round_index) if c.shuffle_shards else c.shards
            yield from assign_shards(order, p.rank, p.world_size, worker, p.num_workers)
            if c.epoch_batches is None:
                return
            yield ROUND_END

    def _raw_samples(self, worker: int, counts: list[int], place: dict[str, int]) -> Iterator[dict[str, Any]]:
        """The worker's raw samples, each tagged ``__place__`` = (shard number, index in the shard), from
        ``place`` on (``{"shard", "index", "empty"}``; kept up to date: the next sample to read)."""
        start_shard, start_index = place["shard"], place["index"]
        shards = itertools.islice(enumerate(self._shard_stream(worker)), start_shard, None)  # skipped: no I/O
        for number, url in shards:
            if url is ROUND_END:
                place.update(shard=number + 1, index=0)
                yield ROUND_END
                continue
            skip = start_index if number == start_shard else 0
            produced = skip
            try:
                samples = iter_tar_samples(url)
                for _ in itertools.islice(samples, skip):  # the partial shard: read, never decoded
                    pass
                for index, sample in enumerate(samples, start=skip):
                    produced += 1
                    sample["__place__"] = (number, index)
                    place.update(shard=number, index=index + 1)
                    yield sample
            except SampleError as error:
                counts[_REASON_INDEX[error.reason]] += 1
            place.update(shard=number + 1, index=0, empty=0 if produced else place["empty"] + 1)
            if place["empty"] > max(len(self.config.shards), 1) * 2:
                raise RuntimeError(f"no readable sample in the last {place['empty']} shards (last: {url})")

    def _fetch(self, worker: int, places: Sequence[Sequence[int]]) -> list[dict[str, Any]]:
        """The raw samples at these places (read from their shards only), in the order given."""
        wanted: dict[int, set[int]] = {}
        for shard, index in places:
            wanted.setdefault(int(shard), set()).add(int(index))
        found: dict[tuple[int, int], dict[str, Any]] = {}
        urls = dict(itertools.islice(enumerate(self._shard_stream(worker)), max(wanted, default=-1) + 1))
        for shard, indices in wanted.items():
            try:
                for index, sample in enumerate(iter_tar_samples(urls[shard])):
                    if index in indices:
                        sample["__place__"] = (shard, index)
                        found[shard, index] = sample
                    if index >= max(indices):
                        break
            except SampleError:
                pass
        missing = [tuple(p) for p in places if (int(p[0]), int(p[1])) not in found]
        if missing:
            raise RuntimeError(f"cannot resume the data position: samples {missing[:3]} of the saved shuffle buffer "
                               f"are no longer in their shards; were the shards changed?")
        return [found[int(shard), int(index)] for shard, index in places]

    def _stream(self, worker: int, counts: list[int], start: WorkerPosition) -> tuple[ShuffleBuffer, dict[str, int], int]:
        """The worker's shuffled raw stream positioned at ``start.cursor``: from the saved snapshot
        (cost independent of the position: only the partial shard and the buffered samples are read),
        else by replaying the stream up to the cursor without decoding. Returns (stream, place, cursor)."""
        c, p = self.config, self.plan
        rng = random.Random(f"shuffle/{c.seed}/{p.epoch}/{p.rank}/{worker}")
        snapshot = start.snapshot
        if snapshot is None or start.cursor == 0:
            place = {"shard": 0, "index": 0, "empty": 0}
            raw = ShuffleBuffer(self._raw_samples(worker, counts, place), c.shuffle_buffer, rng)
            # Fast-forward without decoding: the skips in this prefix were counted by the earlier run.
            return raw, place, sum(1 for _ in itertools.islice(raw, start.cursor))
        version, internal, gauss = snapshot["rng"]
        rng.setstate((version, tuple(internal), gauss))
        place = dict(snapshot["place"])
        raw = ShuffleBuffer(self._raw_samples(worker, counts, place), c.shuffle_buffer, rng,
                            buffer=self._fetch(worker, snapshot["buffer"]), draining=self._fetch(worker, snapshot["draining"]))
        return raw, place, start.cursor

    def _decode(self, raw: Mapping[str, Any]) -> dict[str, Any]:
        c = self.config
        key = raw["__key__"]
        check_download_status(raw)
        sample: dict[str, Any] = {"key": key, "caption": extract_caption(raw, c.caption_keys)}
        if c.precomputed_keys:
            sample.update(decode_precomputed(raw, c.precomputed_keys))
        if "latent_moments" not in c.precomputed_keys:  # with cached latents the image is never decoded
            rng = sample_rng(c.seed, self.plan.epoch, key)
            sample["pixel_values"], decoded_hw, sample["crop_top_left"] = preprocess_image_with_geometry(
                find_image_member(raw), c.resolution, c.center_crop, c.random_flip, rng, c.buckets
            )  # (3, H, W), H x W the bucket's with buckets; SDXL's size/crop conditioning: (h, w) and (top, left) pixels
            sample["original_size"] = original_size(raw, decoded_hw)
        return sample

    def _group(self, sample: Mapping[str, Any]) -> tuple[int, ...]:
        """The batch group of a decoded sample: its bucket's (height, width) -- of the pixels, or of the cached
        latents, which the cache wrote at the bucket's size -- with buckets; one group without."""
        if self.config.buckets is None:
            return ()
        image = sample["pixel_values"] if "pixel_values" in sample else sample["latent_moments"]
        return tuple(int(v) for v in image.shape[-2:])

    def _restore_groups(self, worker: int, start: WorkerPosition) -> dict[tuple[int, ...], list[tuple[Any, dict[str, Any]]]]:
        """The bucket contents saved in ``start.snapshot`` (samples taken from the stream but not yet batched),
        re-read by place and decoded again (a pure function of seed, epoch and key)."""
        saved = (start.snapshot or {}).get("groups") or []
        groups: dict[tuple[int, ...], list[tuple[Any, dict[str, Any]]]] = {}
        for places in saved:
            for raw in self._fetch(worker, places):
                try:
                    sample = self._decode(raw)
                except SampleError as error:
                    raise RuntimeError(f"cannot resume the data position: bucketed sample {raw['__key__']} no longer "
                                       f"decodes ({error}); were the shards changed?") from error
                groups.setdefault(self._group(sample), []).append((raw["__place__"], sample))
        return groups

    def _worker_batches(self, worker: int, start: WorkerPosition) -> Iterator[dict[str, Any]]:
        c, p = self.config, self.plan
        quota = self.worker_quota(worker)
        if quota is not None and start.batches >= quota:
            return
        counts = [0] * len(SKIP_REASONS)
        raw, place, cursor = self._stream(worker, counts, start)
        # Samples waiting for their batch, per group (bucket): a batch is made of one group only. Without
        # buckets there is one group, emptied by every batch, so a snapshot never holds any.
        groups = self._restore_groups(worker, start)

        def snapshot() -> dict[str, Any]:  # where the stream stands now, for WorkerPosition.snapshot
            waiting = [[list(place_) for place_, _ in groups[g]] for g in sorted(groups) if groups[g]]
            return {"place": dict(place), **raw.state(), "groups": waiting}

        reported = list(counts)
        batches = start.batches

        def finish(samples: list[tuple[Any, dict[str, Any]]], cursor_after: int, counts_after: list[int],
                   stream_state: dict[str, Any]) -> dict[str, Any]:
            batch = collate_samples([sample for _, sample in samples])
            if c.entity_parser and "entities" not in batch:
                batch["entities"] = parse_entities(c.entity_parser, batch["captions"])
            if c.entity_targets is not None and "entities" in batch:
                batch["entity_targets"] = targets_of_batch(c.entity_targets, batch)
            batch["skipped"] = torch.tensor([n - r for n, r in zip(counts_after, reported)], dtype=torch.long)
            reported[:] = counts_after
            batch["position"] = {
                "epoch": p.epoch,
                "rank": p.rank,
                "worker": worker,
                "num_workers": p.num_workers,
                "cursor": cursor_after,
                "worker_batches": batches,
                "snapshot": stream_state,
            }
            return batch

        # A full batch is held until the next good sample is found (or the data ends), so skips that
        # follow it travel with it and its cursor points exactly where the next batch starts. It
        # reports the counts as they stood *before* that sample was pulled (``counts_at_cursor``):
        # a broken shard met while pulling it is replayed, and counted, by a resumed run. The groups
        # do not change between the batch and that sample, so the snapshot names what they hold then.
        held: Optional[list[tuple[Any, dict[str, Any]]]] = None
        counts_at_cursor = list(counts)
        state_at_cursor: Optional[dict[str, Any]] = None  # the stream's snapshot while a batch is held
        failures_in_a_row = 0
        for raw_sample in raw:
            try:
                sample = self._decode(raw_sample)
            except SampleError as error:
                counts[_REASON_INDEX[error.reason]] += 1
                cursor += 1
                counts_at_cursor = list(counts)
                if held is not None:
                    state_at_cursor = snapshot()
                failures_in_a_row += 1
                if failures_in_a_row > _MAX_CONSECUTIVE_FAILURES:
                    raise RuntimeError(
                        f"{failures_in_a_row} samples in a row were unusable (counts {dict(zip(SKIP_REASONS, counts))}); "
                        f"check caption_keys {list(c.caption_keys)} and precomputed_keys {list(c.precomputed_keys)}"
                    ) from error
                continue
            failures_in_a_row = 0
            if held is not None:
                yield finish(held, cursor, counts_at_cursor, state_at_cursor)
                held = None
            group = self._group(sample)
            pending = groups.setdefault(group, [])
            pending.append((raw_sample["__place__"], sample))
            cursor += 1
            counts_at_cursor = list(counts)
            if len(pending) == c.batch_size:
                del groups[group]
                batches += 1
                if quota is not None and batches == quota:
                    yield finish(pending, cursor, counts_at_cursor, snapshot())
                    return
                held = pending
                state_at_cursor = snapshot()
        # End of this worker's data: everything met so far is reported with its last batch. Partly filled
        # groups follow as smaller batches, one per group in group order (with buckets: by bucket height,
        # then width), so every sample of the epoch is trained on once and every batch stays one bucket.
        if held is not None:
            yield finish(held, cursor, list(counts), snapshot())
        for group in sorted(groups):
            pending = groups.pop(group)
            if pending:
                batches += 1
                yield finish(pending, cursor, list(counts), snapshot())


class _PassDataLoader(DataLoader):
    """A DataLoader that asks the datamodule for the pass plan (epoch, resume point) at each ``iter``."""

    def __init__(self, dataset: ShardStream, datamodule: "WebDatasetDataModule", **kwargs: Any):
        super().__init__(dataset, batch_size=None, **kwargs)
        self._datamodule = datamodule

    def __iter__(self) -> Iterator[dict[str, Any]]:
        plan = self._datamodule._begin_pass(self.num_workers)
        self.dataset.plan = plan
        batches = super().__iter__()  # workers start here and receive the dataset with this plan
        return self._datamodule._watch_pass(batches, plan.epoch)

    # Lightning treats a loader with state_dict/load_state_dict as resumable mid-epoch. This one is:
    # its position lives in the datamodule's state (gathered over ranks), so the loader's own is empty.
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        pass


# ---------------------------------------------------------------- the datamodule


_SCHEMA = DataConfig()  # the schema's data defaults, which the keyword constructor shares


class WebDatasetDataModule(L.LightningDataModule):
    """Training batches from WebDataset shards.

    Batch contract (a dict):
      ``keys``          list[str], the samples' ``__key__``
      ``captions``      list[str]
      ``pixel_values``  (B, 3, H, W) float32 in [-1, 1]; absent when ``latents`` are precomputed. H x W is
                        resolution squared, or with ``buckets`` (a list of (width, height)) the batch's bucket
      ``latent_moments`` (B, 2C, h, w) float32 VAE posterior mean and log-variance, when ``"latent_moments"`` is in ``precomputed_keys``
      ``llm_features``  (B, L, D) float32 zero-padded to the batch's longest, with
      ``llm_mask``      (B, L) bool, True on real tokens, when ``"llm_features"`` is enabled
      ``clip_features`` (B, 77, clip_dim) float32, when ``"clip_features"`` is enabled
      ``entities``      list of parsed JSON, when ``"entities"`` is enabled
      ``skipped``       (len(SKIP_REASONS),) long: samples skipped since the worker's previous batch
      ``position``      dict of ints for :meth:`on_batch_consumed`; not model input

    ``keys``, ``skipped`` and ``position`` are bookkeeping (``BOOKKEEPING``). Under a Trainer the
    datamodule's own ``on_before_batch_transfer`` records each training batch's position, keys and
    skips, and takes them out of the batch: the model sees only model input. Without a Trainer, call
    :meth:`on_batch_consumed` once per batch trained on.
    """

    # Keyword defaults are the schema's (configs/schema.DataConfig), never restated: a datamodule built
    # in a notebook batches like one built from a config.
    def __init__(
        self,
        shards: Union[str, Sequence[str]],
        batch_size: int = _SCHEMA.batch_size,
        num_workers: int = _SCHEMA.num_workers,
        resolution: int = _SCHEMA.resolution,
        center_crop: bool = _SCHEMA.center_crop,
        random_flip: bool = _SCHEMA.random_flip,
        caption_keys: Sequence[str] = tuple(_SCHEMA.caption_keys),
        shuffle_buffer: int = _SCHEMA.shuffle_buffer,
        shuffle_shards: bool = True,
        resampled: bool = _SCHEMA.resampled,
        seed: int = Config.seed,
        epoch_batches: Optional[int] = _SCHEMA.epoch_batches,
        precomputed_keys: Sequence[str] = tuple(_SCHEMA.precomputed_keys),
        entity_parser: Optional[str] = None,
        entity_targets: Optional[EntityTargetBuilder] = None,
        pin_memory: bool = _SCHEMA.pin_memory,
        prefetch_factor: Optional[int] = _SCHEMA.prefetch_factor,
        rank: Optional[int] = None,
        world_size: Optional[int] = None,
        buckets: Optional[Sequence[Sequence[int]]] = None,
    ):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if epoch_batches is not None and epoch_batches < 1:
            raise ValueError(f"epoch_batches must be a positive number of batches per rank or None, got {epoch_batches}")
        if resampled and epoch_batches is None:
            raise ValueError("resampled=True draws shards forever: set epoch_batches (batches per epoch per rank)")
        unknown = sorted(set(precomputed_keys) - set(PRECOMPUTED_MEMBERS))
        if unknown:
            raise ValueError(f"unknown precomputed_keys {unknown}; known: {sorted(PRECOMPUTED_MEMBERS)}")
        if prefetch_factor is not None and (prefetch_factor < 1 or num_workers == 0):
            raise ValueError(f"prefetch_factor={prefetch_factor} needs num_workers > 0 (got {num_workers}) and a value >= 1; "
                             f"batches are only prefetched by worker processes")
        if (rank is None) != (world_size is None):
            raise ValueError("give both rank and world_size, or neither (then they come from the trainer)")
        if buckets is not None:
            buckets = [(int(w), int(h)) for w, h in buckets]
            if not buckets or any(w <= 0 or h <= 0 for w, h in buckets) or len(set(buckets)) != len(buckets):
                raise ValueError(f"buckets must be distinct positive (width, height) sizes "
                                 f"(datamodules.buckets.bucket_sizes), got {buckets}")
        self.shards_spec = shards if isinstance(shards, str) else [str(s) for s in shards]
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.resolution = int(resolution)
        self.center_crop = bool(center_crop)
        self.random_flip = bool(random_flip)
        self.caption_keys = (caption_keys,) if isinstance(caption_keys, str) else tuple(caption_keys)
        self.shuffle_buffer = int(shuffle_buffer)
        self.shuffle_shards = bool(shuffle_shards)
        self.resampled = bool(resampled)
        self.seed = int(seed)
        self.epoch_batches = None if epoch_batches is None else int(epoch_batches)
        self.precomputed_keys = tuple(precomputed_keys)
        self.entity_parser = entity_parser
        self.entity_targets = entity_targets
        self.pin_memory = bool(pin_memory)
        self.prefetch_factor = prefetch_factor
        self._explicit_rank = None if rank is None else (int(rank), int(world_size))
        self.buckets: Optional[list[tuple[int, int]]] = buckets
        self._shards: Optional[list[str]] = None
        # Data position (this rank), advanced by on_batch_consumed.
        self._epoch = 0
        self._consumed = 0
        self._next_worker = 0
        self._workers: list[WorkerPosition] = []
        self._layout: Optional[tuple[int, int]] = None  # (num_workers, world_size) of the position
        self._pass_finished = False
        self._loaded_ranks: Optional[list[dict[str, Any]]] = None
        self._skipped_totals = torch.zeros(len(SKIP_REASONS), dtype=torch.long)
        self._skipped_consumed = torch.zeros(len(SKIP_REASONS), dtype=torch.long)
        self.last_keys: list[str] = []  # the ``__key__`` of each sample of the batch consumed last

    @classmethod
    def from_config(cls, data: DataConfig, *, seed: int, entity_parser: Optional[str] = None,
                    entity_targets: Optional[EntityTargetBuilder] = None,
                    buckets: Optional[Sequence[Sequence[int]]] = None) -> "WebDatasetDataModule":
        """From the typed ``data`` section (``OmegaConf.to_object(cfg.data)``); ``buckets`` resolved from
        ``data.buckets`` by configs.buckets.resolve_buckets (None: square crops)."""
        return cls(data.shards, batch_size=data.batch_size, num_workers=data.num_workers, resolution=data.resolution,
                   center_crop=data.center_crop, random_flip=data.random_flip, caption_keys=data.caption_keys,
                   shuffle_buffer=data.shuffle_buffer, resampled=data.resampled, seed=seed,
                   epoch_batches=data.epoch_batches, precomputed_keys=data.precomputed_keys,
                   entity_parser=entity_parser, entity_targets=entity_targets, pin_memory=data.pin_memory,
                   prefetch_factor=data.prefetch_factor, buckets=buckets)

    # ---- Lightning hooks

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """A training batch is consumed here, just before the step that trains on it (Lightning calls
        this hook of the datamodule in the fit loop); every batch leaves without its bookkeeping."""
        if not isinstance(batch, Mapping):
            return batch
        trainer = self.trainer  # set by Lightning; None outside a Trainer
        if trainer is not None and trainer.training and "position" in batch:
            self.on_batch_consumed(batch)
        return {k: v for k, v in batch.items() if k not in BOOKKEEPING}

    def setup(self, stage: Optional[str] = None) -> None:
        self._shards = resolve_shards(self.shards_spec)
        rank, world_size = self.distributed_context()
        if self.epoch_batches is None and world_size > 1:
            warnings.warn(
                "WebDatasetDataModule under DDP without epoch_batches: ranks may get different numbers of "
                "batches and hang in a collective; set epoch_batches",
                stacklevel=2,
            )
        slots = world_size * max(self.num_workers, 1)
        if self.epoch_batches is not None and not self.resampled and len(self._shards) < slots:
            raise ValueError(
                f"epoch_batches needs at least one shard per (rank, worker): {len(self._shards)} shards for "
                f"{world_size} ranks x {max(self.num_workers, 1)} workers; write smaller shards or use fewer workers"
            )

    def train_dataloader(self) -> DataLoader:
        if self._shards is None:
            self.setup("fit")
        config = StreamConfig(
            shards=list(self._shards),
            batch_size=self.batch_size,
            resolution=self.resolution,
            center_crop=self.center_crop,
            random_flip=self.random_flip,
            caption_keys=self.caption_keys,
            shuffle_buffer=self.shuffle_buffer,
            shuffle_shards=self.shuffle_shards,
            resampled=self.resampled,
            seed=self.seed,
            epoch_batches=self.epoch_batches,
            precomputed_keys=self.precomputed_keys,
            entity_parser=self.entity_parser,
            buckets=None if self.buckets is None else list(self.buckets),
            entity_targets=self.entity_targets,
        )
        return _PassDataLoader(
            ShardStream(config),
            self,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=False,
            **({"prefetch_factor": self.prefetch_factor} if self.prefetch_factor is not None else {}),
        )

    def state_dict(self) -> dict[str, Any]:
        """The data position of every rank (gathered: the checkpoint is written by rank 0 only).

        Lightning calls this on all ranks while saving, as ``Trainer.save_checkpoint`` requires.
        """
        local = self._position_state()
        ranks = [local]
        if self._explicit_rank is None and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            ranks = [None] * dist.get_world_size()
            dist.all_gather_object(ranks, local)
        return {"seed": self.seed, "batch_size": self.batch_size, "buckets": self._bucket_state(), "ranks": ranks}

    def _bucket_state(self) -> Optional[list[list[int]]]:
        return None if self.buckets is None else [list(b) for b in self.buckets]

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore the position; it is applied when the train DataLoader is next iterated."""
        if state_dict.get("seed") != self.seed or state_dict.get("batch_size") != self.batch_size:
            warnings.warn(
                f"data position saved with seed={state_dict.get('seed')}, batch_size={state_dict.get('batch_size')} "
                f"but configured seed={self.seed}, batch_size={self.batch_size}: the resumed stream will differ",
                stacklevel=2,
            )
        if state_dict.get("buckets") != self._bucket_state():
            warnings.warn(
                f"data position saved with aspect-ratio buckets {state_dict.get('buckets')} but configured with "
                f"{self._bucket_state()}: the resumed stream will differ (samples waiting in a bucket are lost)",
                stacklevel=2,
            )
        self._loaded_ranks = list(state_dict["ranks"])

    # ---- position bookkeeping

    def on_batch_consumed(self, batch: Mapping[str, Any]) -> None:
        """Record that ``batch`` was trained on. Call once per training batch, in ``training_step``."""
        position = batch.get("position") if isinstance(batch, Mapping) else None
        if position is None:
            raise ValueError("on_batch_consumed needs a batch from train_dataloader(), which carries 'position'")
        if self._layout is None or position["epoch"] != self._epoch or position["num_workers"] != self._layout[0]:
            raise ValueError(
                f"batch from epoch {position['epoch']} with {position['num_workers']} workers does not belong to the "
                f"current pass (epoch {self._epoch}, layout {self._layout}); was a batch reported twice or late?"
            )
        worker = position["worker"]
        self._workers[worker] = WorkerPosition(cursor=int(position["cursor"]), batches=int(position["worker_batches"]),
                                               snapshot=position.get("snapshot"))
        self._next_worker = (worker + 1) % position["num_workers"]
        self._consumed += 1
        self.last_keys = list(batch.get("keys", ()))
        if "skipped" in batch:
            self._skipped_consumed += batch["skipped"].cpu()

    def skipped_totals(self) -> dict[str, int]:
        """Skipped samples per reason over all batches this datamodule's loaders yielded (all workers)."""
        return {reason: int(n) for reason, n in zip(SKIP_REASONS, self._skipped_totals)}

    def skipped_consumed(self) -> dict[str, int]:
        """Skipped samples per reason up to the batches consumed so far in this process (what was trained
        on; a loader's prefetched batches are not counted)."""
        return {reason: int(n) for reason, n in zip(SKIP_REASONS, self._skipped_consumed)}

    @property
    def epoch(self) -> int:
        """The data epoch that the next batch belongs to."""
        return self._epoch + 1 if self._pass_finished else self._epoch

    @property
    def batches_consumed(self) -> int:
        """Batches of the current data epoch reported through :meth:`on_batch_consumed`."""
        return 0 if self._pass_finished else self._consumed

    def set_epoch(self, epoch: int) -> None:
        """Start the next pass at the beginning of ``epoch`` (drops any mid-epoch position)."""
        self._start_epoch(int(epoch), self._layout)

    def distributed_context(self) -> tuple[int, int]:
        """(rank, world_size): explicit constructor values, else the trainer's, else torch.distributed's."""
        if self._explicit_rank is not None:
            return self._explicit_rank
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return trainer.global_rank, trainer.world_size
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def _position_state(self) -> dict[str, Any]:
        num_workers, world_size = self._layout or (max(self.num_workers, 1), self.distributed_context()[1])
        if self._pass_finished:
            return {"epoch": self._epoch + 1, "batches": 0, "next_worker": 0, "workers": [],
                    "num_workers": num_workers, "world_size": world_size}
        return {
            "epoch": self._epoch,
            "batches": self._consumed,
            "next_worker": self._next_worker,
            "workers": [[w.cursor, w.batches, w.snapshot] for w in self._workers],
            "num_workers": num_workers,
            "world_size": world_size,
        }

    def _start_epoch(self, epoch: int, layout: Optional[tuple[int, int]]) -> None:
        self._epoch, self._consumed, self._next_worker = epoch, 0, 0
        self._workers = [WorkerPosition() for _ in range(layout[0])] if layout else []
        self._layout = layout
        self._pass_finished = False

    def _begin_pass(self, loader_workers: int) -> PassPlan:
        rank, world_size = self.distributed_context()
        layout = (max(loader_workers, 1), world_size)
        if self._loaded_ranks is not None:
            self._restore_position(rank, layout)
        if self._pass_finished or (self.epoch_batches is not None and self._consumed >= self.epoch_batches):
            self._start_epoch(self._epoch + 1, layout)
        elif self._layout != layout:
            if self._consumed:
                warnings.warn(f"data layout changed from {self._layout} to {layout}: restarting epoch {self._epoch}")
            self._start_epoch(self._epoch, layout)
        return PassPlan(
            epoch=self._epoch,
            rank=rank,
            world_size=world_size,
            num_workers=layout[0],
            first_worker=self._next_worker,
            workers=[WorkerPosition(w.cursor, w.batches, w.snapshot) for w in self._workers],
        )

    def _restore_position(self, rank: int, layout: tuple[int, int]) -> None:
        ranks, self._loaded_ranks = self._loaded_ranks, None
        saved = ranks[rank] if rank < len(ranks) else ranks[0]
        saved_layout = (saved["num_workers"], saved["world_size"])
        if saved_layout != layout or len(ranks) != layout[1]:
            warnings.warn(
                f"data position saved with (num_workers, world_size)={saved_layout} but running with {layout}: "
                f"cannot continue mid-epoch exactly, restarting epoch {saved['epoch']} from its beginning",
                stacklevel=3,
            )
            self._start_epoch(int(saved["epoch"]), layout)
            return
        self._start_epoch(int(saved["epoch"]), layout)
        self._consumed = int(saved["batches"])
        self._next_worker = int(saved["next_worker"])
        if saved["workers"]:
            self._workers = [WorkerPosition(int(w[0]), int(w[1]), w[2] if len(w) > 2 else None) for w in saved["workers"]]

    def _watch_pass(self, batches: Iterator[dict[str, Any]], epoch: int) -> Iterator[dict[str, Any]]:
        for batch in batches:
            self._skipped_totals += batch["skipped"]
            yield batch
        if epoch == self._epoch:
            self._pass_finished = True

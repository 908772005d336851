"""Precomputed training inputs: VAE latent moments, LLM and CLIP token features and entity parses,
written once into companion shards so that training reads them instead of running the frozen encoders.

Why: with a frozen UNet, encoding the image (VAE) costs about as much as the UNet step and the LLM
another third (measured by bench/bench_cache.py); both are pure functions of the sample and the
frozen models, so a run that sees every sample many times pays for them once.

Layout. For every input shard ``.../NAME.tar`` the cache directory gets ``DIR/NAME.tar`` holding, per
sample and under the same ``__key__``, the original members (caption ``txt``/``json``; the image unless
``drop_images``), so a cached shard is self-contained for training, plus the cached members named by
:data:`datamodules.cache_codec.PRECOMPUTED_MEMBERS` (with ``data.caption_mix``, the caption fields once per caption
key, ``llm_features.dense_txt.npy``: ``cache_codec.member_name``):

  ``latent_moments.npy``  (2C, h, w) VAE posterior mean and log-variance at ``data.resolution``, centre crop;
                          with aspect-ratio buckets (``data.buckets``) at the image's bucket size instead
  ``llm_features.npy``    (tokens, dim) the caption's real tokens only (``tokens`` = its attention-mask sum);
                          all ``max_length`` tokens for the release's context (:func:`keeps_llm_padding`)
  ``clip_features.npy``   (77, dim) CLIP's last hidden state (SDXL: both encoders' penultimate states)
  ``clip_pooled.npy``     (pooled_dim,) SDXL only, with clip_features: the second encoder's pooled embedding
  ``entities.json``       ``losses.entity_parser.groups_to_json`` of the caption's parse
  ``entity_positions.json`` {"positions", "num_tokens"}: its words' positions in the fused [CLIP, LLM] context
                          (datamodules/entity_targets.py); a batch of them builds the entity targets untokenized

Unpadded LLM features are exact when nothing reads the padding: LLM padding masked out of every attention
(``model.adapter.use_llm_mask=true``, every config but the release's), or padding features that are zeros
(``model.llm.zero_padding=true``); training pads them back with zeros and a False mask. The release's context
(``use_llm_mask=false`` with ``zero_padding=false``) attends to the pad positions' outputs, which depend on the
caption (T5's pad positions attend to it), so there the cache stores all ``max_length`` tokens of each caption
(:func:`stored_llm_tokens`); training reads them as they are.

Completion and resume. A shard is written to ``NAME.tar.tmp-PID`` and renamed when complete, after its
statistics (``DIR/.cache_stats/NAME.json``); a shard whose ``DIR/NAME.tar`` exists is finished and a rerun
skips it. Rank ``r`` of ``W`` processes takes ``shards[r::W]``. Samples that training would skip (bad
image, missing or blank caption) are skipped here with the same decode functions and counted per reason.

The cache key (``DIR/cache_key.json``) records, per field, every setting its values depend on, named by
the config key that sets it (``model.llm.max_length``) so a refusal can name what to change. Models are
identified without loading them (see :func:`model_identity`). ``cache.dtype`` is recorded but never
compared: a run reads either precision as float32.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch
from omegaconf import DictConfig

from llm4gen.datamodules.cache_codec import PRECOMPUTED_MEMBERS, encode_precomputed
from llm4gen.datamodules.captions import captions_held
from llm4gen.datamodules.collate import entity_parser
from llm4gen.datamodules.entity_targets import EntityTargetBuilder, TokenizerSources
from llm4gen.datamodules.shards import iter_tar_samples, resolve_shards
from llm4gen.datamodules.transforms import (
    SampleError,
    check_download_status,
    extract_caption,
    find_image_member,
    original_size,
    preprocess_image_with_geometry,
)
from llm4gen.encoders.llm import LLMEncoder
from llm4gen.encoders.stable_diffusion import load_base_model
from llm4gen.losses.entity_parser import groups_to_json
from llm4gen.tools.cache_key import (
    CACHE_DTYPES,
    CACHE_FIELDS,
    CACHE_KEY_FILE,
    CacheError,
    CacheKeyMismatch,
    DEFAULT_FIELDS,
    STORAGE_REPORT_FILE,
    cache_buckets,
    cache_key,
    entity_parser_name,
    key_differences,
)
from llm4gen.tools.cache_storage import (
    ShardStats,
    collect_stats,
    format_storage_report,
    member_group,
    stats_path,
    storage_report,
)
from llm4gen.tools.shard_writer import member_info, write_json


# ---------------------------------------------------------------- refusals and splitting


def check_cacheable(cfg: DictConfig, fields: Sequence[str]) -> None:
    """Refuses settings whose results are not a function of the sample alone."""
    unknown = [name for name in fields if name not in CACHE_FIELDS]
    if unknown:
        raise CacheError(f"unknown cache fields {unknown}; choose from {', '.join(CACHE_FIELDS)}")
    if not fields:
        raise CacheError(f"no fields to cache; choose from {', '.join(CACHE_FIELDS)}")
    if "latent_moments" in fields:
        if cfg.data.random_flip:
            raise CacheError("data.random_flip=true: flips are drawn per sample and epoch, so cached latents cannot "
                             "hold them. Cache (and train) with data.random_flip=false, or train on pixels.")
        if not cfg.data.center_crop:
            raise CacheError("data.center_crop=false: random crops are drawn per sample and epoch, so cached latents "
                             "cannot hold them. Cache (and train) with data.center_crop=true, or train on pixels.")
    if "llm_features" in fields and cfg.model.llm.lora_rank > 0:
        raise CacheError(f"model.llm.lora_rank={cfg.model.llm.lora_rank}: the LLM trains (LoRA), so its features "
                         f"are not a function of the caption alone; cache latent_moments (and clip_features) only, "
                         f"or set model.llm.lora_rank=0.")


def keeps_llm_padding(cfg: DictConfig) -> bool:
    """Whether the features at LLM padding are part of what the model reads, so the cache must store them: the
    release's context (padding attended, ``model.adapter.use_llm_mask=false``) with the encoder's outputs at the
    pad tokens (``model.llm.zero_padding=false``). Otherwise a caption's real tokens are all that matters."""
    return not cfg.model.llm.zero_padding and not cfg.model.adapter.use_llm_mask


def stored_llm_tokens(mask_row: torch.Tensor, keep_padding: bool) -> int:
    """How many token features of one caption the cache stores: its real tokens, or all ``max_length`` when the
    pad positions' outputs are read (they depend on the caption: :func:`keeps_llm_padding`)."""
    length = int(mask_row.sum())
    if not bool(mask_row[:length].all()):
        raise CacheError("the LLM tokenizer pads on the left; caching needs real tokens first")
    return int(mask_row.shape[0]) if keep_padding else length


def shards_for_rank(shards: Sequence[str], rank: int, world_size: int) -> list[str]:
    """The shards process ``rank`` of ``world_size`` caches: disjoint and together covering."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise CacheError(f"rank {rank} is not in [0, world_size={world_size})")
    return list(shards[rank::world_size])


def default_rank(environ: Mapping[str, str] = os.environ) -> tuple[int, int]:
    """(rank, world_size) from SLURM (``SLURM_PROCID``/``SLURM_NTASKS``), else torchrun (``RANK``/``WORLD_SIZE``)."""
    for rank_var, size_var in (("SLURM_PROCID", "SLURM_NTASKS"), ("RANK", "WORLD_SIZE")):
        if rank_var in environ and size_var in environ:
            return int(environ[rank_var]), int(environ[size_var])
    return 0, 1


def shard_name(url: str) -> str:
    """The file name a shard's cache gets: the input's own name (``pipe:`` commands: their last word)."""
    last = url.split()[-1] if url.startswith("pipe:") else url
    name = os.path.basename(last.split("?", 1)[0])
    return name if name.endswith(".tar") else f"{name}.tar"


def output_paths(shards: Sequence[str], directory: str) -> dict[str, str]:
    """Input shard -> its cache path in ``directory``; refuses name clashes and writing over inputs."""
    names: dict[str, str] = {}
    out = os.path.realpath(directory)
    for url in shards:
        name = shard_name(url)
        if name in names:
            raise CacheError(f"shards {names[name]!r} and {url!r} both map to {name} in the cache; "
                             f"cache them into different --output directories")
        is_local = not (url.startswith("pipe:") or "://" in url)
        if is_local and os.path.realpath(os.path.dirname(os.path.abspath(url))) == out:
            raise CacheError(f"--output {directory} is the directory of the input shard {url}: the cache would "
                             f"replace it; choose another --output")
        names[name] = url
    return {url: os.path.join(directory, name) for name, url in names.items()}


# ---------------------------------------------------------------- encoders


class FeatureEncoders:
    """The frozen models the requested fields need (only those), built from the run config."""

    def __init__(self, cfg: DictConfig, fields: Sequence[str], device: str = "cpu", cache_dtype: str = "float16"):
        self.fields = tuple(fields)
        self.device = torch.device(device)
        self.cache_dtype = CACHE_DTYPES[cache_dtype]
        self.vae = self.clip = self.llm = self.parser = None
        base, llm = cfg.model.base, cfg.model.llm
        if {"latent_moments", "clip_features"} & set(fields):
            loaded = load_base_model(base)
            self.vae = loaded.vae.to(self.device) if "latent_moments" in fields else None
            self.clip = loaded.text.to(self.device) if "clip_features" in fields else None
            del loaded  # the UNet is not needed: freed here
        self.keep_padding = keeps_llm_padding(cfg)
        if "llm_features" in fields:
            self.llm = LLMEncoder.from_config(llm).to(self.device)
        if {"entities", "entity_positions"} & set(fields):
            self.parser = entity_parser(entity_parser_name(cfg))
        self.entity_targets = (EntityTargetBuilder(TokenizerSources.from_model_config(cfg.model))
                               if "entity_positions" in fields else None)

    @torch.no_grad()
    def encode(self, captions: list[str], pixels: Optional[torch.Tensor]) -> dict[str, list[Any]]:
        """Per-sample cached values of a batch: field -> list (one numpy array or JSON value per sample)."""
        return {**(self.encode_images(pixels) if self.vae is not None else {}), **self.encode_captions(captions)}

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> dict[str, list[Any]]:
        """``latent_moments`` of a batch of images (B, 3, H, W), one (2C, h, w) array per image."""
        moments = self.vae.encode(pixels.to(self.device, self.vae.dtype)).latent_dist.parameters  # (B, 2C, h, w)
        return {"latent_moments": list(self._to_numpy(moments))}

    @torch.no_grad()
    def encode_captions(self, captions: list[str]) -> dict[str, list[Any]]:
        """The caption fields of a batch of captions: field -> one value per caption."""
        out: dict[str, list[Any]] = {}
        if self.llm is not None:
            llm = self.llm(captions)  # features (B, max_length, D), mask (B, max_length)
            lengths = [stored_llm_tokens(row, self.keep_padding) for row in llm.mask]
            features = self._to_numpy(llm.features)
            out["llm_features"] = [features[i, :length] for i, length in enumerate(lengths)]  # (tokens_i, D)
        if self.clip is not None:
            text = self.clip(captions)
            out["clip_features"] = list(self._to_numpy(text.hidden))  # (77, D) each
            if text.pooled is not None:  # SDXL
                out["clip_pooled"] = list(self._to_numpy(text.pooled))  # (pooled_dim,) each
        if self.parser is not None:
            entities = [groups_to_json(groups) for groups in self.parser.parse_many(captions)]
            if "entities" in self.fields:
                out["entities"] = entities
            if self.entity_targets is not None:
                num_tokens = self.entity_targets.num_tokens
                out["entity_positions"] = [{"positions": p, "num_tokens": num_tokens}
                                           for p in self.entity_targets.positions(captions, entities)]
        return out

    def _to_numpy(self, tensor: torch.Tensor) -> np.ndarray:
        return tensor.to(self.cache_dtype).cpu().numpy()


# ---------------------------------------------------------------- one shard


class _TarOut:
    """Tar members written in order with fixed metadata (the same input gives the same bytes)."""

    def __init__(self, path: str):
        self.tar = tarfile.open(path, "w", format=tarfile.USTAR_FORMAT)

    def add(self, name: str, data: bytes) -> None:
        self.tar.addfile(member_info(name, len(data)), io.BytesIO(data))

    def close(self) -> None:
        self.tar.close()


def cache_shard(url: str, out_path: str, encoders: FeatureEncoders, *, caption_keys: Sequence[str], resolution: int,
                batch_size: int = 32, drop_images: bool = False,
                buckets: Optional[Sequence[Sequence[int]]] = None, caption_mix: Sequence[str] = ()) -> ShardStats:
    """Writes the cache of one shard (atomically: tmp file, then rename) and returns its statistics.

    With ``buckets`` each image's latents are at its aspect-ratio bucket's size (as training crops it), so
    latents differ in shape between buckets; the VAE encodes each bucket's images of a batch together.

    With ``caption_mix`` (the keys of ``data.caption_mix``) the caption fields are cached once per key the sample
    holds, under that key's member names (``cache_codec.member_name``), so a run drawing any of the keys reads
    the values of the caption it drew; without, once, for the caption ``caption_keys`` picks.

    A shard that cannot be opened at all raises ``SampleError("bad_shard")`` and writes nothing (a rerun
    retries it); a shard that breaks part-way is cached up to the break and counts one ``bad_shard``.
    """
    start = time.perf_counter()
    stats = ShardStats(shard=os.path.basename(out_path))
    tmp = f"{out_path}.tmp-{os.getpid()}"
    writer = _TarOut(tmp)
    # (raw sample, caption key -> caption (key None without a mix), pixels (3, H, W) or None, SDXL geometry)
    pending: list[tuple[dict[str, Any], dict[Optional[str], str], Optional[torch.Tensor], dict[str, Any]]] = []
    read_any = False

    def flush() -> None:
        # Images: one encoder call per image size (one bucket; all samples without buckets). Captions: one call per
        # caption key. Each sample's values by caption key (None: the image's, and without a mix the caption's).
        values: list[dict[Optional[str], dict[str, Any]]] = [{None: dict(geometry)} for _, _, _, geometry in pending]
        if encoders.vae is not None:
            sizes = [tuple(pixels.shape) for _, _, pixels, _ in pending]
            for size in dict.fromkeys(sizes):
                members = [i for i, s in enumerate(sizes) if s == size]
                cached = encoders.encode_images(torch.stack([pending[i][2] for i in members]))  # (B, 3, H, W)
                for j, i in enumerate(members):
                    values[i][None].update({name: cached[name][j] for name in cached})
        for key in (caption_mix or [None]):
            members = [i for i, (_, captions, _, _) in enumerate(pending) if key in captions]
            if not members:
                continue
            cached = encoders.encode_captions([pending[i][1][key] for i in members])
            for j, i in enumerate(members):
                values[i].setdefault(key, {}).update({name: cached[name][j] for name in cached})
        for i, (raw, _, _, _) in enumerate(pending):
            members: dict[str, bytes] = {}
            for key, fields in values[i].items():
                if "llm_features" in fields:
                    stats.llm_tokens += int(fields["llm_features"].shape[0])
                    stats.llm_captions += 1
                members.update(encode_precomputed(**fields, caption_key=key))
            _write_sample(writer, raw, members, stats, drop_images)
        pending.clear()

    try:
        try:
            for raw in iter_tar_samples(url):
                read_any = True
                try:
                    check_download_status(raw)
                    captions = (captions_held(raw, caption_mix) if caption_mix
                                else {None: extract_caption(raw, caption_keys)})
                    pixels, geometry = None, {}
                    if encoders.vae is not None:
                        pixels, decoded_hw, crop = preprocess_image_with_geometry(
                            find_image_member(raw), resolution, center_crop=True, random_flip=False,
                            buckets=buckets)  # (3, H, W): the bucket's size with buckets
                        geometry = {"original_size": original_size(raw, decoded_hw), "crop_top_left": crop}
                except SampleError as error:
                    stats.skipped[error.reason] += 1
                    continue
                pending.append((raw, captions, pixels, geometry))
                if len(pending) == batch_size:
                    flush()
        except SampleError as error:
            if not read_any:
                raise
            stats.skipped[error.reason] += 1
        if pending:
            flush()
        writer.close()
    except BaseException:
        writer.close()
        os.remove(tmp)
        raise
    stats.seconds = time.perf_counter() - start
    write_json(Path(stats_path(out_path)), asdict(stats))
    os.replace(tmp, out_path)
    return stats


def _write_sample(writer: _TarOut, raw: Mapping[str, Any], cached: Mapping[str, bytes], stats: ShardStats,
                  drop_images: bool) -> None:
    key = raw["__key__"]
    for extension, data in raw.items():
        if extension.startswith("__") or extension in cached:
            continue  # a member recomputed now replaces an older one of the same name
        group = member_group(extension)
        if group == "image" and drop_images:
            continue
        if group in PRECOMPUTED_MEMBERS:
            group = f"{group} (from input)"
        writer.add(f"{key}.{extension}", data)
        stats.add_member(group, len(data))
    for extension, data in cached.items():
        writer.add(f"{key}.{extension}", data)
        stats.add_member(member_group(extension), len(data))
    stats.samples += 1


# ---------------------------------------------------------------- the command


def write_cache_key(directory: str, key: Mapping[str, Any]) -> None:
    """Records the key, or checks it against the one already there (a cache is never mixed)."""
    path = os.path.join(directory, CACHE_KEY_FILE)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as handle:
            existing = json.load(handle)
        problems = []
        if existing.get("cache_dtype") != key["cache_dtype"]:
            problems.append(f"--dtype {existing.get('cache_dtype')}, this run has {key['cache_dtype']}")
        if set(existing.get("fields", {})) != set(key["fields"]):
            problems.append(f"--fields {','.join(existing.get('fields', {}))}, this run has {','.join(key['fields'])}")
        for name in set(existing.get("fields", {})) & set(key["fields"]):
            problems += key_differences(existing["fields"][name], key["fields"][name])
            was, now = (fields.get("cache.caption_keys") for fields in (existing["fields"][name], key["fields"][name]))
            if was != now:
                problems.append(f"data.caption_mix keys {was or '[] (one caption per sample)'}, this run has "
                                f"{now or '[] (one caption per sample)'}")
        if problems:
            raise CacheKeyMismatch(
                f"{directory} already holds a cache made with " + "; ".join(dict.fromkeys(problems)) +
                ". Finishing it with other settings would mix two caches: use another --output, or the same settings.")
        return
    if any(name.endswith(".tar") for name in os.listdir(directory)):
        raise CacheError(f"{directory} holds shards but no {CACHE_KEY_FILE}: it is not a cache.py output; "
                         f"choose an empty --output directory")
    write_json(Path(path), key)


def run_cache(cfg: DictConfig, shards: Any, output: str, fields: Sequence[str] = DEFAULT_FIELDS,
              cache_dtype: str = "float16", batch_size: int = 32, rank: int = 0, world_size: int = 1,
              max_shards: Optional[int] = None, device: str = "cpu", drop_images: bool = False,
              log=print) -> dict[str, Any]:
    """Caches this rank's unfinished shards; returns ``{"written", "skipped", "failed", "report"}``."""
    if cache_dtype not in CACHE_DTYPES:
        raise CacheError(f"cache dtype {cache_dtype!r} is not one of {', '.join(CACHE_DTYPES)}")
    if batch_size < 1:
        raise CacheError(f"--batch-size must be >= 1, got {batch_size}")
    check_cacheable(cfg, fields)  # unknown names are refused, not dropped
    fields = [name for name in CACHE_FIELDS if name in fields]  # canonical order
    urls = resolve_shards(shards)
    paths = output_paths(urls, output)
    os.makedirs(output, exist_ok=True)
    write_cache_key(output, {**cache_key(cfg, fields, cache_dtype),
                             "made_with": {"shards": shards if isinstance(shards, str) else list(shards),
                                           "model.base.pretrained": cfg.model.base.pretrained,
                                           "model.llm.pretrained": cfg.model.llm.pretrained}})
    mine = shards_for_rank(urls, rank, world_size)
    done = [url for url in mine if os.path.isfile(paths[url])]
    todo = [url for url in mine if url not in done]
    if max_shards is not None:
        todo = todo[:max_shards]
    log(f"[rank {rank}/{world_size}] {len(mine)} shards: {len(done)} already cached, caching {len(todo)} "
        f"({', '.join(fields)}; {cache_dtype})")
    written, failed = [], []
    if todo:
        encoders = FeatureEncoders(cfg, fields, device=device, cache_dtype=cache_dtype)
        for url in todo:
            try:
                stats = cache_shard(url, paths[url], encoders, caption_keys=list(cfg.data.caption_keys),
                                    resolution=int(cfg.data.resolution), batch_size=batch_size, drop_images=drop_images,
                                    buckets=cache_buckets(cfg), caption_mix=list(cfg.data.caption_mix))
            except SampleError as error:
                log(f"[rank {rank}] {url}: not cached ({error}); a rerun retries it")
                failed.append(url)
                continue
            skipped = sum(stats.skipped.values())
            log(f"[rank {rank}] {os.path.basename(paths[url])}: {stats.samples} samples, {skipped} skipped, "
                f"{stats.seconds:.1f} s ({stats.samples / max(stats.seconds, 1e-9):.1f} samples/s)")
            written.append(url)
    report = storage_report(collect_stats(output))
    write_json(Path(output) / STORAGE_REPORT_FILE, report)
    log(format_storage_report(report))
    return {"written": written, "skipped": done, "failed": failed, "report": report}

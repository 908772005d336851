"""How many samples each shard holds, known before the first step: what lets the stream address an epoch's
samples one by one (datamodules/sample_slices.py) and give every rank the same number of batches.

Sources, first found wins, per shard:

1. the manifest named by ``data.shards`` (prepare.py's ``samples`` per shard, used when its ``bytes`` still
   matches the file; any manifest entry with ``samples`` for a remote URL);
2. the feature cache's own record ``.cache_stats/NAME.json`` beside ``NAME.tar`` (``samples``: what it wrote);
3. img2dataset's ``NAME_stats.json`` when it is unambiguous: img2dataset writes only successful downloads into
   the tar, but copies that keep the failed rows exist (and read the same), so a shard whose stats record
   failures is counted from its headers instead; one with none holds exactly ``count`` samples either way;
4. the count cache: ``.shard_counts.json`` beside the shards, or ``shard_counts.json`` in the run folder when
   the shard folder is read-only or remote; a local shard's entry holds its size and mtime, so a changed
   shard is counted again (a remote URL's entry is trusted as long as it is there);
5. a count pass over the tar's member headers, no member decoded: a local plain tar is read by seeking from
   header to header; a remote or compressed one is streamed. Its result goes to the count cache.

A sample is what ``shards.iter_tar_samples`` yields: consecutive members with one key. A tar that breaks
part-way counts the sample it broke in (the stream meets the break there and counts one ``bad_shard``, as it
always has); a tar that cannot be opened at all counts one placeholder sample, so the stream still opens it
and counts it, and that count is not cached (the shard may be readable next time).
"""

from __future__ import annotations

import json
import os
import tarfile
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional, Sequence, Union

import webdataset as wds
from webdataset.tariterators import base_plus_ext

from llm4gen.datamodules.shards import manifest_entries

CACHE_STATS_DIR = ".cache_stats"  # the feature cache's per-shard records (tools/feature_cache.py writes them)
COUNTS_FILE = ".shard_counts.json"  # the count cache beside the shards
RUN_COUNTS_FILE = "shard_counts.json"  # the count cache in a run folder
UNREADABLE = 1  # samples counted for a tar that cannot be opened: one placeholder (see the module docstring)
_COUNT_THREADS = 8  # the pass waits on I/O (headers, pipes), not on the CPU


def is_remote(url: str) -> bool:
    return url.startswith("pipe:") or "://" in url


def count_tar_samples(url: str) -> Optional[int]:
    """Samples in one tar from its member headers; None when it cannot be opened at all."""
    count, last, opened = 0, None, False
    stream = None
    try:
        if is_remote(url):
            stream = wds.gopen(url, "rb")
            tar = tarfile.open(fileobj=stream, mode="r|*")
        else:
            tar = tarfile.open(url, mode="r:*")  # seekable: the data of each member is skipped, not read
        opened = True
        with tar:
            for member in tar:
                if not member.isreg():
                    continue
                key, _ = base_plus_ext(member.name)
                if key is None or os.path.basename(key).startswith("__"):
                    continue
                if key != last:
                    count, last = count + 1, key
    except (tarfile.TarError, OSError, EOFError, ValueError):
        if not opened:
            return None
    finally:
        if stream is not None:
            try:
                stream.close()
            except Exception:  # a pipe: command stopped early reports a non-zero status; nothing to do
                pass
    return count


def count_samples(urls: Sequence[str]) -> list[Optional[int]]:
    """:func:`count_tar_samples` of each url, a few at a time."""
    if not urls:
        return []
    with ThreadPoolExecutor(max_workers=min(_COUNT_THREADS, len(urls))) as pool:
        return list(pool.map(count_tar_samples, urls))


# ---------------------------------------------------------------- records the writers left


def _non_negative_int(value: Any) -> Optional[int]:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def manifest_counts(spec: Union[str, Sequence[str]]) -> dict[str, int]:
    """url -> samples from the manifests that the shard spec names (a directory with ``manifest.json``, or a
    ``*.json``); a local entry whose ``bytes`` no longer match the file is left out."""
    if not isinstance(spec, str):
        return {url: n for item in spec for url, n in manifest_counts(str(item)).items()}
    spec = spec.strip()
    path = os.path.join(spec, "manifest.json") if os.path.isdir(spec) else spec
    if is_remote(spec) or not path.endswith(".json") or not os.path.isfile(path):
        return {}
    counts = {}
    for url, entry in manifest_entries(path):
        samples, size = _non_negative_int(entry.get("samples")), entry.get("bytes")
        if samples is not None and (is_remote(url) or size is None or _file_size(url) == size):
            counts[url] = samples
    return counts


def _file_size(path: str) -> Optional[int]:
    try:
        return os.path.getsize(path)
    except OSError:
        return None


def _read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


def recorded_count(url: str) -> Optional[int]:
    """The count a local shard's writer recorded beside it: the feature cache's, else img2dataset's (unambiguous)."""
    if is_remote(url) or not url.endswith(".tar"):
        return None
    directory, name = os.path.split(url)
    stem = name[: -len(".tar")]
    cached = _read_json(os.path.join(directory, CACHE_STATS_DIR, stem + ".json"))
    if isinstance(cached, dict) and _non_negative_int(cached.get("samples")) is not None:
        return cached["samples"]
    stats = _read_json(os.path.join(directory, stem + "_stats.json"))
    if isinstance(stats, dict):
        count, successes = _non_negative_int(stats.get("count")), _non_negative_int(stats.get("successes"))
        if count is not None and count == successes:
            return count
    return None


# ---------------------------------------------------------------- the count cache


def _identity(url: str) -> Optional[list[int]]:
    """[size, mtime_ns] of a local shard (None: remote, or gone)."""
    if is_remote(url):
        return None
    try:
        status = os.stat(url)
    except OSError:
        return None
    return [status.st_size, status.st_mtime_ns]


def _cache_files(url: str, run_dir: Optional[str]) -> list[tuple[str, str]]:
    """(cache file, the shard's key in it), in lookup order: beside the shard, then the run folder."""
    files = []
    if not is_remote(url):
        files.append((os.path.join(os.path.dirname(os.path.abspath(url)), COUNTS_FILE), os.path.basename(url)))
    if run_dir is not None:
        files.append((os.path.join(run_dir, RUN_COUNTS_FILE), url if is_remote(url) else os.path.abspath(url)))
    return files


def cached_counts(urls: Sequence[str], run_dir: Optional[str]) -> list[Optional[int]]:
    loaded: dict[str, Any] = {}
    found: list[Optional[int]] = []
    for url in urls:
        count = None
        for path, key in _cache_files(url, run_dir):
            if path not in loaded:
                loaded[path] = (_read_json(path) or {}).get("shards", {}) if os.path.isfile(path) else {}
            entry = loaded[path].get(key) if isinstance(loaded[path], dict) else None
            if isinstance(entry, dict) and entry.get("identity") == _identity(url):
                count = _non_negative_int(entry.get("samples"))
                if count is not None:
                    break
        found.append(count)
    return found


def store_counts(urls: Sequence[str], counts: Sequence[Optional[int]], run_dir: Optional[str]) -> None:
    """Remember counted shards beside them, or in the run folder where that is not writable (best effort:
    a cache that cannot be written only means counting again)."""
    updates: dict[str, dict[str, Any]] = {}
    for url, count in zip(urls, counts):
        if count is None:
            continue
        entry = {"samples": count, "identity": _identity(url)}
        for path, key in _cache_files(url, run_dir):
            if os.access(os.path.dirname(path) or ".", os.W_OK):
                updates.setdefault(path, {})[key] = entry
                break
    for path, entries in updates.items():
        existing = _read_json(path) if os.path.isfile(path) else None
        shards = existing.get("shards", {}) if isinstance(existing, dict) else {}
        shards.update(entries)
        temporary = f"{path}.tmp-{os.getpid()}"
        try:
            with open(temporary, "w", encoding="utf-8") as handle:
                json.dump({"format": 1, "shards": shards}, handle, sort_keys=True)
            os.replace(temporary, path)  # readers never see half a file; a concurrent writer's entries may be lost
        except OSError:
            try:
                os.remove(temporary)
            except OSError:
                pass


def known_counts(spec: Union[str, Sequence[str]], urls: Sequence[str], run_dir: Optional[str]) -> list[Optional[int]]:
    """The counts sources 1-4 give (None where a count pass is needed)."""
    from_manifest = manifest_counts(spec)
    counts = [from_manifest.get(url) for url in urls]
    counts = [n if n is not None else recorded_count(url) for n, url in zip(counts, urls)]
    missing = [i for i, n in enumerate(counts) if n is None]
    for i, n in zip(missing, cached_counts([urls[i] for i in missing], run_dir)):
        counts[i] = n
    return counts


def placeholder_for_unreadable(counts: Sequence[Optional[int]]) -> list[int]:
    return [UNREADABLE if n is None else n for n in counts]

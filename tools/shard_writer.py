"""prepare.py's shard writing: byte-identical tars per chunk of inputs, and the chunk records that make a rerun
skip finished chunks."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable
from llm4gen.tools.prepare_images import SAMPLE_MEMBERS, ShardSettings, build_sample
from llm4gen.tools.prepare_sources import SkipSample, SourceItem, WRITTEN, printable




def chunk_bounds(num_inputs: int, num_chunks: int) -> list[tuple[int, int]]:
    """Contiguous, balanced [start, stop) ranges covering range(num_inputs); sizes differ by <= 1."""
    return [(i * num_inputs // num_chunks, (i + 1) * num_inputs // num_chunks) for i in range(num_chunks)]


def padded(size: int) -> int:
    return -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


def member_info(name: str, size: int) -> tarfile.TarInfo:
    """Fixed metadata (mtime 0, root, 0644) so the same samples give byte-identical tars."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def finished_tar_size(offset: int) -> int:
    """File size of a tar closed at `offset`: two end blocks, then padded to a 10 KiB record."""
    return -(-(offset + 2 * tarfile.BLOCKSIZE) // tarfile.RECORDSIZE) * tarfile.RECORDSIZE


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class ChunkShardWriter:
    """Writes one chunk's samples into `shards/CCCCCC-PPPP.tar`, starting a new shard when the
    current one holds `samples_per_shard` samples or the next sample would push the finished file
    over `max_shard_bytes` (a single sample larger than that gets a shard of its own)."""

    def __init__(self, directory: Path, chunk: int, settings: ShardSettings):
        self.directory, self.chunk, self.settings = directory, chunk, settings
        self.shards: list[dict] = []
        self._tar: tarfile.TarFile | None = None
        self._count = 0

    def _open(self) -> None:
        name = f"{self.chunk:06d}-{len(self.shards):04d}.tar"
        self._path = self.directory / name
        self._tar = tarfile.open(self._path.with_suffix(".tar.tmp"), "w", format=tarfile.PAX_FORMAT,
                                 encoding="utf-8")
        self._count = 0

    def _close(self) -> None:
        self._tar.close()
        os.replace(self._path.with_suffix(".tar.tmp"), self._path)
        self.shards.append({"path": f"{self.directory.name}/{self._path.name}", "samples": self._count,
                            "bytes": self._path.stat().st_size, "sha256": file_sha256(self._path)})
        self._tar = None

    def add(self, key: str, members: dict[str, bytes]) -> None:
        infos = [(member_info(f"{key}.{ext}", len(members[ext])), members[ext]) for ext in SAMPLE_MEMBERS]
        sample_bytes = sum(len(info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")) + padded(info.size)
                           for info, _ in infos)
        if self._tar is not None:
            full = self._count >= self.settings.samples_per_shard
            too_big = (self.settings.max_shard_bytes is not None and
                       finished_tar_size(self._tar.offset + sample_bytes) > self.settings.max_shard_bytes)
            if full or too_big:
                self._close()
        if self._tar is None:
            self._open()
        for info, data in infos:
            self._tar.addfile(info, io.BytesIO(data))
        self._count += 1

    def finish(self) -> list[dict]:
        if self._tar is not None:
            self._close()
        return self.shards


@dataclass(frozen=True)
class ChunkJob:
    output: str
    chunk: int
    items: tuple[SourceItem, ...]
    settings: ShardSettings
    fingerprint: str


def chunk_record_path(output: Path, chunk: int) -> Path:
    return output / "chunks" / f"{chunk:06d}.json"


def write_json(path: Path, value: Any) -> None:
    """Atomic: a reader (another array task, a rerun) sees the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # a unique name: array tasks on different nodes may share a pid and write the same file
    handle, temporary = tempfile.mkstemp(prefix=f"{path.name}.", suffix=".tmp", dir=path.parent)
    with os.fdopen(handle, "w", encoding="utf-8") as stream:
        stream.write(json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
    os.chmod(temporary, 0o644)
    os.replace(temporary, path)


def remove_partial_chunk(output: Path, chunk: int) -> None:
    """Shards of a chunk without a record come from an interrupted run: start that chunk over."""
    for leftover in (output / "shards").glob(f"{chunk:06d}-*.tar*"):
        leftover.unlink()


def process_chunk(job: ChunkJob, progress: Callable[[int], None] | None = None) -> dict:
    """Write one chunk's shards and then its record; returns the record."""
    output = Path(job.output)
    remove_partial_chunk(output, job.chunk)
    writer = ChunkShardWriter(output / "shards", job.chunk, job.settings)
    outcomes: dict[str, int] = {}
    skipped = []
    for item in job.items:
        try:
            members = build_sample(item, job.settings)
        except SkipSample as skip:
            outcomes[skip.reason] = outcomes.get(skip.reason, 0) + 1
            skipped.append({"index": item.index, "key": item.key, "source": printable(item.source),
                            "reason": skip.reason, "detail": skip.detail})
        else:
            writer.add(item.key, members)
            outcomes[WRITTEN] = outcomes.get(WRITTEN, 0) + 1
        if progress is not None:
            progress(1)
    record = {
        "chunk": job.chunk,
        "inputs": len(job.items),
        "first_index": job.items[0].index if job.items else None,
        "fingerprint": job.fingerprint,
        "outcomes": dict(sorted(outcomes.items())),
        "shards": writer.finish(),
        "skipped": skipped,
    }
    write_json(chunk_record_path(output, job.chunk), record)
    return record


def run_chunk_job(job: ChunkJob) -> dict:  # top level, so a multiprocessing pool can pickle it
    return process_chunk(job)


def load_finished_chunk(output: Path, chunk: int, fingerprint: str) -> dict | None:
    """The chunk's record if the chunk is finished for these settings and its shards are intact."""
    path = chunk_record_path(output, chunk)
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if record.get("fingerprint") != fingerprint:
        return None
    for shard in record["shards"]:
        shard_path = output / shard["path"]
        if not shard_path.is_file() or shard_path.stat().st_size != shard["bytes"]:
            return None
    return record

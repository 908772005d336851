"""What a feature cache takes on disk: per-shard statistics (samples, skips, bytes per member group, written beside
each cached shard in ``DIR/.cache_stats/NAME.json``) and the storage report over them (``storage_report.json``:
bytes per sample per group and what a million samples would take), which ``cache.py`` prints when it finishes."""

from __future__ import annotations

import io
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from llm4gen.datamodules.cache_codec import PRECOMPUTED_MEMBERS
from llm4gen.datamodules.transforms import IMAGE_EXTENSIONS, SKIP_REASONS
from llm4gen.tools.cache_key import STATS_DIR


@dataclass
class ShardStats:
    """What one cached shard holds: counts, skip reasons, bytes per member group."""

    shard: str
    samples: int = 0
    skipped: dict[str, int] = field(default_factory=lambda: {reason: 0 for reason in SKIP_REASONS})
    payload_bytes: dict[str, int] = field(default_factory=dict)  # member group -> sum of member sizes
    tar_bytes: dict[str, int] = field(default_factory=dict)  # the same with tar headers and block padding
    llm_tokens: int = 0
    llm_captions: int = 0  # captions encoded by the LLM: one per sample, or one per caption key held with a mix
    seconds: float = 0.0

    def add_member(self, group: str, size: int) -> None:
        self.payload_bytes[group] = self.payload_bytes.get(group, 0) + size
        self.tar_bytes[group] = self.tar_bytes.get(group, 0) + tar_member_bytes(size)


def tar_member_bytes(size: int) -> int:
    """Bytes a member of ``size`` takes in a tar: a 512-byte header plus data padded to 512-byte blocks."""
    return 512 + 512 * math.ceil(size / 512)


def npy_bytes(shape: Sequence[int], dtype: str) -> int:
    """Size of an ``np.save`` file of this shape and dtype (header included)."""
    buffer = io.BytesIO()
    np.save(buffer, np.zeros(shape, dtype=np.dtype(dtype)), allow_pickle=False)
    return len(buffer.getvalue())


def member_group(extension: str) -> str:
    """The storage report's group of a member: its cached field (with the caption's tag for a field cached per
    caption key of a ``data.caption_mix``: ``llm_features (dense_txt)``), the image, or other members."""
    for name, member in PRECOMPUTED_MEMBERS.items():
        stem, suffix = member.rsplit(".", 1)
        if extension == member:
            return name
        if extension.startswith(f"{stem}.") and extension.endswith(f".{suffix}"):
            return f"{name} ({extension[len(stem) + 1:-len(suffix) - 1]})"
    return "image" if extension in IMAGE_EXTENSIONS else "other members"


def stats_path(out_path: str) -> str:
    return os.path.join(os.path.dirname(out_path), STATS_DIR, os.path.basename(out_path)[: -len(".tar")] + ".json")


# ---------------------------------------------------------------- storage report


def storage_report(stats: Iterable[Mapping[str, Any]], per: int = 1_000_000) -> dict[str, Any]:
    """Mean bytes per sample per member group, and what ``per`` samples would take, from shard stats."""
    stats = list(stats)
    samples = sum(s["samples"] for s in stats)
    groups = sorted({g for s in stats for g in s["payload_bytes"]})
    fields = {}
    for group in groups:
        payload = sum(s["payload_bytes"].get(group, 0) for s in stats)
        in_tar = sum(s["tar_bytes"].get(group, 0) for s in stats)
        fields[group] = {
            "bytes_per_sample": payload / max(samples, 1),
            "tar_bytes_per_sample": in_tar / max(samples, 1),
            "projected_bytes": in_tar / max(samples, 1) * per,
        }
    total = sum(f["tar_bytes_per_sample"] for f in fields.values())
    tokens = sum(s.get("llm_tokens", 0) for s in stats)
    captions = sum(s.get("llm_captions", 0) for s in stats) or samples  # stats written before the count: one per sample
    return {
        "shards": len(stats),
        "samples": samples,
        "skipped": {reason: sum(s["skipped"].get(reason, 0) for s in stats) for reason in SKIP_REASONS},
        "fields": fields,
        "mean_llm_tokens": tokens / captions if captions and tokens else None,
        "tar_bytes_per_sample": total,
        "projected_for": per,
        "projected_bytes": total * per,
    }


def format_bytes(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if abs(size) < 1000 or unit == "PB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} PB"


def format_storage_report(report: Mapping[str, Any]) -> str:
    per = report["projected_for"]
    lines = [f"storage: {report['samples']} samples in {report['shards']} shards"
             f" (skipped: {', '.join(f'{k} {v}' for k, v in report['skipped'].items() if v) or 'none'})"]
    if report.get("mean_llm_tokens"):
        lines.append(f"mean LLM tokens per caption: {report['mean_llm_tokens']:.1f}")
    lines.append(f"{'member group':<24} {'bytes/sample':>13} {'in tar':>13} {f'per {per:,} samples':>22}")
    for group, f in report["fields"].items():
        lines.append(f"{group:<24} {f['bytes_per_sample']:>13,.0f} {f['tar_bytes_per_sample']:>13,.0f} "
                     f"{format_bytes(f['projected_bytes']):>22}")
    lines.append(f"{'total':<24} {'':>13} {report['tar_bytes_per_sample']:>13,.0f} "
                 f"{format_bytes(report['projected_bytes']):>22}")
    return "\n".join(lines)


def collect_stats(directory: str) -> list[dict[str, Any]]:
    """The statistics of every finished shard in a cache directory."""
    found = []
    for name in sorted(os.listdir(directory)):
        if name.endswith(".tar") and os.path.isfile(stats_path(os.path.join(directory, name))):
            with open(stats_path(os.path.join(directory, name)), encoding="utf-8") as handle:
                found.append(json.load(handle))
    return found

"""recaption.py's output folder: companion shards, the record that marks each one done, and the manifest and report
merged from the records.

    OUT/job.json            what the captions depend on (model, prompt, generation, key, word range, inputs)
    OUT/NAME.tar            per input shard NAME.tar, every sample's KEY.dense.json (and KEY.dense.txt when captioned),
                            in the input's order: a companion read in lockstep with it
    OUT/.recaption/NAME.json  the shard's counts, word counts, skipped samples, and the companion's size and sha256
    OUT/manifest.json       once every shard is done: each input shard with its companions (what training reads)
    OUT/report.json         once every shard is done: read, captioned, skipped by reason, word counts

Why companion shards rather than new shards holding the images again: at 1 M LAION images of ~100 KB, new shards
copy ~100 GB; a companion holds 2-2.5 KB per sample (a ~95-word caption of ~480 bytes and a ~500-700-byte record,
each padded to 512-byte tar blocks behind a 512-byte header), 2-2.5 GB, and several models' captions can sit
beside one copy of the images. Training reads both tars front to back, the companion adding ~2% to the bytes read
and one file open per shard, so read throughput is that of the images alone. ``datamodules.shards.LockstepShard``
reads them.

A shard is done when its record exists for this job and the companion on disk has the recorded size and sha256.
The companion is written to ``NAME.tar.tmp-HOST-PID``, its record written, then the tar renamed into place, so a
job killed at any point leaves its unfinished shard not done, and a rerun redoes only that shard.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import tarfile
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from llm4gen.configs.choices import RECAPTION_SKIP_REASONS
from llm4gen.datamodules.shards import LockstepShard
from llm4gen.tools.feature_cache import shard_name
from llm4gen.tools.recaption_model import RecaptionError
from llm4gen.tools.shard_writer import file_sha256, member_info, write_json

JOB_FILE = "job.json"
RECORDS_DIR = ".recaption"
MANIFEST_FORMAT = "llm4gen-caption-companions"
FORMAT_VERSION = 1


def record_key_of(caption_key: str) -> str:
    """The json record's member beside a caption key: ``dense.txt`` -> ``dense.json``."""
    return (caption_key.rsplit(".", 1)[0] if "." in caption_key else caption_key) + ".json"


def is_remote(url: str) -> bool:
    return url.startswith("pipe:") or "://" in url


def absolute(url: str) -> str:
    return url if is_remote(url) else os.path.abspath(url)


def input_entries(urls: Sequence[str]) -> list[Any]:
    """The job's inputs as job.json records them: absolute URLs, with their companions for lockstep shards (an
    earlier job's output), so a rerun over other inputs is told apart."""
    return [{"url": absolute(str(u)), "companions": list(u.companions)} if getattr(u, "companions", ()) else absolute(u)
            for u in urls]


def input_urls(entries: Sequence[Any]) -> list[str]:
    """:func:`input_entries` read back into shard URLs."""
    return [LockstepShard(e["url"], e["companions"]) if isinstance(e, dict) else e for e in entries]


def companion_paths(urls: Sequence[str], output: str) -> dict[str, str]:
    """Input shard -> its companion in ``output`` (the input's name); refuses two inputs of one name and an
    ``output`` that holds input shards (a companion would replace its input)."""
    names: dict[str, str] = {}
    out = os.path.realpath(output)
    for url in urls:
        name = shard_name(url)
        if name in names:
            raise RecaptionError(f"input shards {names[name]!r} and {url!r} share the name {name}, so their companions "
                                 f"would too; caption them into different --output folders.")
        if not is_remote(url) and os.path.realpath(os.path.dirname(os.path.abspath(url))) == out:
            raise RecaptionError(f"--output {output} is the folder of the input shard {url}: the originals are never "
                                 f"modified, so the captions go to another folder; choose another --output.")
        names[name] = url
    return {url: os.path.join(output, name) for name, url in names.items()}


def job_fingerprint(document: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(document, sort_keys=True).encode()).hexdigest()[:16]


def claim_output(output: str, document: Mapping[str, Any]) -> None:
    """Records the job's settings in a new output folder; refuses a folder holding another job's captions or
    other files' shards (nothing is written then)."""
    path = Path(output) / JOB_FILE
    if path.is_file():
        existing = json.loads(path.read_text(encoding="utf-8"))
        if existing != dict(document):
            changed = sorted(k for k in set(existing) | set(document) if existing.get(k) != document.get(k))
            shown = "; ".join(f"{k}: {_short(existing.get(k))} there, {_short(document.get(k))} now" for k in changed)
            raise RecaptionError(
                f"--output {output} holds another job's captions, made with other settings ({shown}). Finishing it "
                f"with these would mix two jobs' captions: rerun with its settings to resume, or choose a new --output.")
        return
    if Path(output).is_dir() and glob.glob(os.path.join(glob.escape(output), "*.tar")):
        raise RecaptionError(f"--output {output} holds .tar files but no {JOB_FILE}: it is not a recaption.py output "
                             f"folder; choose an empty or new --output.")
    write_json(path, document)


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 80 else text[:77] + "..."


def read_job(output: str) -> dict[str, Any]:
    path = Path(output) / JOB_FILE
    if not path.is_file():
        raise RecaptionError(f"{output} holds no {JOB_FILE}: it is not a recaption.py output folder (run the job "
                             f"first: python recaption.py SHARDS --model MODEL --output {output}).")
    return json.loads(path.read_text(encoding="utf-8"))


# ---------------------------------------------------------------- one companion shard


class CompanionWriter:
    """A companion tar written member by member with fixed metadata: the same captions give the same bytes."""

    def __init__(self, path: str):
        self.path = path
        self.tar = tarfile.open(path, "w", format=tarfile.PAX_FORMAT, encoding="utf-8")

    def add(self, key: str, members: Mapping[str, bytes]) -> None:
        for extension, data in members.items():
            self.tar.addfile(member_info(f"{key}.{extension}", len(data)), io.BytesIO(data))

    def close(self) -> None:
        self.tar.close()


def record_path(companion: str) -> Path:
    return Path(companion).parent / RECORDS_DIR / (Path(companion).name[: -len(".tar")] + ".json")


def temporary_files(companion: str) -> list[str]:
    return glob.glob(glob.escape(companion) + ".tmp-*")


def finish_companion(tmp: str, companion: str, record: dict[str, Any]) -> dict[str, Any]:
    """Records the written ``tmp`` (size, sha256) and moves it into place: the record first, so a companion in
    place always has its record (a kill between the two leaves the shard not done)."""
    record = dict(record, bytes=os.path.getsize(tmp), sha256=file_sha256(Path(tmp)))
    write_json(record_path(companion), record)
    os.replace(tmp, companion)
    return record


def finished_record(companion: str, fingerprint: str) -> Optional[dict[str, Any]]:
    """The shard's record if it is done for this job: recorded, in place, with the recorded size and sha256."""
    try:
        record = json.loads(record_path(companion).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if record.get("job") != fingerprint or not os.path.isfile(companion):
        return None
    if os.path.getsize(companion) != record.get("bytes") or file_sha256(Path(companion)) != record.get("sha256"):
        return None
    return record


# ---------------------------------------------------------------- manifest and report


def merge(output: str, document: Mapping[str, Any], urls: Sequence[str]) -> Optional[tuple[dict, dict]]:
    """manifest.json and report.json from the records of every shard, or None while one is not done."""
    fingerprint = job_fingerprint(document)
    paths = companion_paths(urls, output)
    records = [finished_record(paths[url], fingerprint) for url in urls]
    if any(r is None for r in records):
        return None
    shards = []
    for url, record in zip(urls, records):
        companions = [*getattr(url, "companions", ()), os.path.basename(paths[url])]
        shards.append({"url": absolute(str(url)), "companions": companions, "samples": record["read"],
                       "captioned": record["captioned"], "bytes": record["bytes"], "sha256": record["sha256"]})
    skipped = {reason: sum(r["skipped"].get(reason, 0) for r in records) for reason in RECAPTION_SKIP_REASONS}
    words: dict[int, int] = {}
    for record in records:
        for count, n in record["word_counts"].items():
            words[int(count)] = words.get(int(count), 0) + n
    totals = {"read": sum(r["read"] for r in records), "captioned": sum(r["captioned"] for r in records)}
    settings = {k: document[k] for k in document if k != "inputs"}
    manifest = {"format": MANIFEST_FORMAT, "version": FORMAT_VERSION, "caption_key": document["caption_key"],
                "record_key": document["record_key"], "job": settings, "shards": shards,
                "totals": {**totals, "shards": len(shards), "bytes": sum(s["bytes"] for s in shards)}}
    report = {**totals, "skipped": skipped, "reasons": dict(RECAPTION_SKIP_REASONS),
              "truncated": sum(r["truncated"] for r in records), "words": word_summary(words),
              "word_counts": {str(k): words[k] for k in sorted(words)},
              "skipped_samples": [s for r in records for s in r["skipped_samples"]]}
    write_json(Path(output) / "manifest.json", manifest)
    write_json(Path(output) / "report.json", report)
    return manifest, report


def word_summary(words: Mapping[int, int]) -> dict[str, Any]:
    """Count, min, median, mean and max of the generated captions' word counts (word count -> captions)."""
    total = sum(words.values())
    if not total:
        return {"count": 0}
    ordered = sorted(words)
    running, median = 0, ordered[-1]
    for count in ordered:
        running += words[count]
        if running * 2 >= total:
            median = count
            break
    return {"count": total, "min": ordered[0], "median": median,
            "mean": round(sum(k * n for k, n in words.items()) / total, 2), "max": ordered[-1]}


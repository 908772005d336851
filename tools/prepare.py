"""Turn (image, caption) pairs into WebDataset tar shards, a manifest and a report.

Real caption datasets are messy: truncated downloads, HTML saved as `.jpg`, CMYK scans, 16-bit PNGs,
phone photos that are only upright through their EXIF tag, captions in the wrong encoding. Training
should never meet any of that, so this step decodes every input once, normalises what can be
normalised and skips the rest with a named reason. Every input ends up either written or skipped:
the report's outcome counts add up to the number of inputs.

Sources (one input per image / row / line):
  * a folder of images with caption sidecars (`a/b.jpg` + `a/b.txt`), walked recursively in sorted
    order; files and folders whose name starts with "." are ignored, `.txt` files are captions;
  * a CSV (`,`) or TSV (tab, no quote handling, one row per line) with a header row;
  * a JSONL file (one object per line; blank lines are not inputs);
  * a parquet file (needs pyarrow or pandas);
  * a folder of WebDataset `*.tar` shards, such as img2dataset's output for LAION or DataComp: each sample
    re-sharded (resized, filtered, a manifest) without downloading again; a sample whose json `status`
    is not success is `failed_download`, the caption is its `.txt` or the json's `caption`, and the
    recorded `original_size` is the json's `original_width` / `original_height` (the size before the
    downloader's resize); the `.parquet` and `_stats.json` files beside the tars are not inputs.
Table paths are resolved against `image_root` (default: the table's folder). Captions are UTF-8,
stripped of surrounding whitespace (a BOM is dropped). The sample's `source` is the path as listed
(folder: relative to the folder; table: the cell's value).

Each written sample is three tar members `KEY.jpg` (RGB JPEG), `KEY.json` (metadata) and `KEY.txt`
(UTF-8 caption). KEY comes from the file stem (or a key column) with ".", "/" and "\\" replaced by
"_" because WebDataset splits a member name at its first dot. A JPEG that is already RGB, upright and
not resized keeps its original bytes (no second lossy encode; `keep_original_jpeg=False` /
--reencode-jpeg turns this off); everything else is decoded, turned upright by its EXIF orientation,
converted to RGB (alpha and palette transparency composited on white, 16-bit scaled to 8-bit, CMYK
and grey converted), optionally shrunk so the shorter side is `resize_to` (LANCZOS, never upscaled)
and encoded at `jpeg_quality`. `min_size` compares the stored shorter side.

Checks run in a fixed order and the first failure names the outcome: record problems
(`duplicate_key`, `bad_record`), then the caption (`missing_caption`, `empty_caption`,
`caption_not_utf8`: non-UTF-8 captions are skipped, never guessed), then the image (`missing_image`,
`empty_file`, `not_an_image`, `corrupt_image`, `image_too_large`, `unsupported_image_mode`,
`too_small`). Duplicate keys: the first input in source order wins, later ones are skipped, or with
`on_duplicate="refuse"` the run stops before writing anything.

Work is split into `num_chunks` contiguous chunks of the ordered inputs. Each chunk writes its own
shards `shards/CCCCCC-PPPP.tar` and, last, a record `chunks/CCCCCC.json`; a chunk with a record is
finished and a rerun skips it. Chunks run in local processes (`workers`) or one per SLURM array task
(`chunk_index`). The layout depends only on the inputs and the settings (never on the number of
workers), tar members carry fixed metadata, so the same inputs give byte-identical shards. When every
chunk is finished, the records are merged into `manifest.json` and `report.json`. `settings.json`
records the source, the settings and a fingerprint of the listed inputs; a rerun whose settings or
input list differ is refused (edits inside caption sidecars are not part of the fingerprint).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import multiprocessing
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from tqdm import tqdm
from llm4gen.tools.prepare_images import SAMPLE_MEMBERS, ShardSettings
from llm4gen.tools.prepare_sources import (
    IMAGE_EXTENSIONS,
    PrepareError,
    SKIP_REASONS,
    SourceItem,
    SourceSpec,
    WRITTEN,
    inputs_fingerprint,
    list_source,
    mark_duplicates,
    printable,
)
from llm4gen.tools.shard_writer import (
    ChunkJob,
    chunk_bounds,
    load_finished_chunk,
    process_chunk,
    run_chunk_job,
    write_json,
)



MANIFEST_FORMAT = "llm4gen-webdataset-shards"


MANIFEST_VERSION = 1




DEFAULT_CHUNK_SIZE = 10_000  # inputs per chunk when the number of chunks is not given


@dataclass(frozen=True)
class PrepareConfig:
    source: SourceSpec | None  # None only for a merge-only run
    output: str
    shards: ShardSettings = ShardSettings()
    num_chunks: int | None = None  # None: ceil(inputs / chunk_size)
    chunk_size: int = DEFAULT_CHUNK_SIZE
    chunk_index: int | None = None  # None: every unfinished chunk
    workers: int = 1
    on_duplicate: str = "skip"  # skip | refuse
    merge_only: bool = False
    overwrite: bool = False
    quiet: bool = False


def settings_document(spec: SourceSpec, settings: ShardSettings, num_chunks: int, items: Sequence[SourceItem]) -> dict:
    source = dataclasses.asdict(spec)
    source["path"] = str(Path(spec.path).resolve())
    if source["image_root"]:
        source["image_root"] = str(Path(source["image_root"]).resolve())
    if spec.kind == "folder":
        for column in ("image_column", "caption_column", "key_column", "image_root"):
            source.pop(column)
    return {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "source": source,
        "settings": dict(dataclasses.asdict(settings), num_chunks=num_chunks),
        "inputs": len(items),
        "inputs_fingerprint": inputs_fingerprint(items),
    }


def fingerprint_of(document: dict) -> str:
    return hashlib.sha256(json.dumps(document, sort_keys=True).encode()).hexdigest()


OUTPUT_FILES = ("manifest.json", "report.json", "settings.json")


def clear_output(output: Path) -> None:
    """Remove only what this tool writes: shards/*.tar, chunks/*.json and the three top files."""
    for name in OUTPUT_FILES:
        (output / name).unlink(missing_ok=True)
    for pattern, folder in (("*.tar*", "shards"), ("*.json*", "chunks"), ("*.json.*.tmp", ".")):
        for path in (output / folder).glob(pattern):
            path.unlink()


def claim_output(output: Path, document: dict, overwrite: bool) -> None:
    """Record the settings on a first run; on a rerun refuse settings that differ from the record."""
    if output.exists() and not output.is_dir():
        raise PrepareError(f"output {str(output)!r} exists and is not a folder; pick a folder path")
    settings_path = output / "settings.json"
    if settings_path.exists():
        previous = json.loads(settings_path.read_text(encoding="utf-8"))
        if previous != document:
            if not overwrite:
                changed = sorted(k for k in set(previous) | set(document) if previous.get(k) != document.get(k))
                raise PrepareError(
                    f"output {str(output)!r} was prepared with different settings or inputs (differs in: "
                    f"{', '.join(changed)}); rerun with the same arguments to resume, choose a new "
                    f"--output, or pass --overwrite to delete the old shards and start again")
            clear_output(output)
    (output / "shards").mkdir(parents=True, exist_ok=True)
    (output / "chunks").mkdir(parents=True, exist_ok=True)
    if not settings_path.exists() or overwrite:
        write_json(settings_path, document)


def merge(output: Path) -> tuple[dict, dict]:
    """Combine the chunk records into manifest.json and report.json (both deterministic)."""
    settings_path = output / "settings.json"
    if not settings_path.exists():
        raise PrepareError(f"{str(output)!r} holds no settings.json: it is not a prepare output folder, "
                           f"or no chunk has started yet")
    document = json.loads(settings_path.read_text(encoding="utf-8"))
    fingerprint = fingerprint_of(document)
    num_chunks = document["settings"]["num_chunks"]
    records, missing = [], []
    for chunk in range(num_chunks):
        record = load_finished_chunk(output, chunk, fingerprint)
        if record is None:
            missing.append(chunk)
        records.append(record)
    if missing:
        raise PrepareError(f"cannot merge {str(output)!r}: {len(missing)} of {num_chunks} chunks are not "
                           f"finished ({format_chunk_list(missing)}); run those chunks "
                           f"(e.g. --chunk-index {missing[0]}) with the same arguments, then merge again")
    shards = [shard for record in records for shard in record["shards"]]
    outcomes: dict[str, int] = {}
    for record in records:
        for outcome, count in record["outcomes"].items():
            outcomes[outcome] = outcomes.get(outcome, 0) + count
    written = outcomes.get(WRITTEN, 0)
    inputs = sum(record["inputs"] for record in records)
    assert inputs == document["inputs"] == sum(outcomes.values()), "every input must have one outcome"
    manifest = {
        "format": document["format"],
        "version": document["version"],
        "source": document["source"],
        "settings": document["settings"],
        "members": list(SAMPLE_MEMBERS),
        "shards": shards,
        "totals": {"inputs": inputs, "samples": written, "skipped": inputs - written,
                   "shards": len(shards), "bytes": sum(shard["bytes"] for shard in shards)},
    }
    by_reason = {reason: count for reason, count in sorted(outcomes.items()) if reason != WRITTEN}
    report = {
        "inputs": inputs,
        "written": written,
        "skipped": inputs - written,
        "outcomes": dict(sorted(outcomes.items())),
        "skipped_by_reason": by_reason,
        "reasons": {reason: SKIP_REASONS[reason] for reason in by_reason},
        "skipped_inputs": [entry for record in records for entry in record["skipped"]],
    }
    write_json(output / "manifest.json", manifest)
    write_json(output / "report.json", report)
    return manifest, report


def format_chunk_list(chunks: Sequence[int], limit: int = 10) -> str:
    shown = ", ".join(map(str, chunks[:limit]))
    return shown + (f", ... ({len(chunks) - limit} more)" if len(chunks) > limit else "")


def format_summary(manifest: dict, report: dict, output: Path) -> str:
    """The printed report: totals, then one line per outcome; the outcome lines add up to inputs."""
    totals = manifest["totals"]
    lines = [f"prepared {report['written']} of {report['inputs']} inputs into {totals['shards']} shards "
             f"({totals['bytes'] / 1e6:.1f} MB) in {output}",
             f"  {'written':<24}{report['written']:>10}",
             f"  {'skipped':<24}{report['skipped']:>10}"]
    for reason, count in report["skipped_by_reason"].items():
        lines.append(f"    {reason:<22}{count:>10}  ({SKIP_REASONS[reason]})")
    lines.append(f"  {'total':<24}{report['inputs']:>10}")
    lines.append(f"manifest: {output / 'manifest.json'}   report: {output / 'report.json'}")
    return "\n".join(lines)


@dataclass(frozen=True)
class RunResult:
    processed_chunks: list[int]
    manifest: dict | None  # None while other chunks are still unfinished
    report: dict | None


def run_prepare(config: PrepareConfig, out=None) -> RunResult:
    """List the source, write the unfinished chunks this invocation owns, merge when all are done."""
    out = sys.stdout if out is None else out
    output = Path(config.output)
    if config.merge_only:
        manifest, report = merge(output)
        print(format_summary(manifest, report, output), file=out)
        return RunResult([], manifest, report)

    spec = config.source
    items, duplicates = mark_duplicates(list_source(spec))
    if duplicates and config.on_duplicate == "refuse":
        shown = "; ".join(f"{printable(dup.source)} repeats key {dup.key!r} of {printable(first.source)}"
                          for first, dup in duplicates[:5])
        raise PrepareError(f"{len(duplicates)} inputs repeat an earlier key ({shown}"
                           f"{'; ...' if len(duplicates) > 5 else ''}); nothing was written. Make keys "
                           f"unique (rename files or pass --key-column) or drop --on-duplicate refuse "
                           f"to skip the repeats")
    if not items:
        looked_for = f"images ({', '.join(sorted(IMAGE_EXTENSIONS))})" if spec.kind == "folder" else "rows"
        raise PrepareError(f"source {spec.path!r} holds no inputs: no {looked_for} were found")
    num_chunks = config.num_chunks or max(1, math.ceil(len(items) / config.chunk_size))
    if config.chunk_index is not None and not 0 <= config.chunk_index < num_chunks:
        raise PrepareError(f"--chunk-index {config.chunk_index} is outside 0..{num_chunks - 1} "
                           f"(--num-chunks {num_chunks})")
    document = settings_document(spec, config.shards, num_chunks, items)
    fingerprint = fingerprint_of(document)
    claim_output(output, document, config.overwrite)

    bounds = chunk_bounds(len(items), num_chunks)
    owned = [config.chunk_index] if config.chunk_index is not None else list(range(num_chunks))
    pending = [c for c in owned if load_finished_chunk(output, c, fingerprint) is None]
    jobs = [ChunkJob(str(output), c, tuple(items[slice(*bounds[c])]), config.shards, fingerprint) for c in pending]
    run_jobs(jobs, config.workers, config.quiet, out)

    unfinished = [c for c in range(num_chunks) if load_finished_chunk(output, c, fingerprint) is None]
    if unfinished:
        print(f"chunk {format_chunk_list(owned)} of 0..{num_chunks - 1} is finished; {len(unfinished)} of "
              f"{num_chunks} chunks are not finished yet ({format_chunk_list(unfinished)}). The last task to finish merges "
              f"automatically, or run with --merge once all are done.", file=out)
        return RunResult(pending, None, None)
    manifest, report = merge(output)
    print(format_summary(manifest, report, output), file=out)
    return RunResult(pending, manifest, report)


def run_jobs(jobs: list[ChunkJob], workers: int, quiet: bool, out) -> None:

    total = sum(len(job.items) for job in jobs)
    if workers > len(jobs) > 0 and not quiet:
        print(f"note: {len(jobs)} chunks to write, so only {len(jobs)} of {workers} workers have work; a "
              f"smaller --chunk-size makes more chunks (it also changes the shard layout)", file=out)
    started = time.perf_counter()
    # disable=None: tqdm turns itself off when stderr is not a terminal.
    with tqdm(total=total, unit="img", desc="prepare", disable=True if quiet else None) as bar:
        if workers <= 1 or len(jobs) <= 1:
            for job in jobs:
                process_chunk(job, bar.update)
        else:
            with multiprocessing.Pool(min(workers, len(jobs))) as pool:
                # one chunk is the unit of work: the bar moves when a chunk finishes
                for record in pool.imap_unordered(run_chunk_job, jobs):
                    bar.update(record["inputs"])
    if jobs and not quiet:
        seconds = time.perf_counter() - started
        print(f"processed {total} inputs in {len(jobs)} chunks in {seconds:.1f} s "
              f"({total / max(seconds, 1e-9):.0f} inputs/s, {workers} workers)", file=out)

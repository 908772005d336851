"""Dense captions for WebDataset shards, written by a vision-language model into companion shards.

LLM4GEN's authors trained on "LAION-refined": LAION images recaptioned by LLaVA, asked for more than 50 words
naming the main objects and how they relate. This is that step for any shards training reads (prepare.py's,
img2dataset's, any ``data.shards`` spec, and an earlier job's output, whose captions travel along): for each
input shard a companion shard (tools/recaption_shards.py) holds, per sample in the input's order, the new caption
under its own key (``KEY.dense.txt``) and a json record (``KEY.dense.json``: model, prompt, generation settings,
the original caption, and what happened). The original shards are never opened for writing.

The job, in order:
  1. everything a bad request gets wrong is refused before the model loads (:func:`plan_job`): the shard spec,
     the output folder (another job's captions with other settings), the key (a member the inputs already
     hold), the model (not a vision-language model, not in the cache), the prompt (no place for the image, no
     room in the context), the numbers;
  2. each shard of this part that is not done (recaption_shards.finished_record) is captioned in batches
     (:func:`caption_shard`); an image that does not decode, a failed download, an empty caption, one shorter
     than ``min_words`` or longer than ``max_words`` gets its record with the reason and no caption;
  3. when every shard of the job is done, whichever process finishes last writes manifest.json and report.json.

Parallel work: ``num_parts`` contiguous ranges of the sorted shard list, one per SLURM array task (``part``), and
within a part ``processes`` local processes, one per GPU (process i on ``cuda:i``), each on a contiguous range
of the part's shards. Every shard's bytes depend only on the job's settings, its images and the batch size (on
the same hardware), never on which process wrote it, so any split gives the same files.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import socket
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
from PIL import Image
from tqdm import tqdm

from llm4gen.configs import choices
from llm4gen.datamodules.shards import iter_tar_samples, resolve_shards
from llm4gen.datamodules.transforms import SampleError, check_download_status, decode_image, extract_caption, find_image_member
from llm4gen.tools.cache_key import model_identity
from llm4gen.tools.recaption_model import (
    DEFAULT_PROMPT,
    Captioner,
    Generated,
    GenerationSettings,
    RecaptionError,
    check_model_source,
    check_prompt,
    load_processor,
    prompt_text,
    resolve_dtype,
)
from llm4gen.tools.recaption_shards import (
    CompanionWriter,
    FORMAT_VERSION,
    absolute,
    claim_output,
    companion_paths,
    finish_companion,
    finished_record,
    input_entries,
    input_urls,
    job_fingerprint,
    merge,
    read_job,
    record_key_of,
    temporary_files,
)
from llm4gen.tools.shard_writer import chunk_bounds


@dataclass(frozen=True)
class RecaptionJob:
    """One recaptioning request (recaption.py's options)."""

    shards: Any  # a data.shards spec: directory, brace pattern, manifest, list
    output: str
    model: str
    prompt: str = DEFAULT_PROMPT
    prompt_format: str = "auto"  # auto | chat | raw (tools/recaption_model.py)
    caption_key: str = choices.DENSE_CAPTION_KEY
    caption_keys: tuple[str, ...] = choices.CAPTION_KEYS  # where each sample's original caption is read
    min_words: int = 30
    max_words: int = 250
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    batch_size: int = 16
    dtype: str = "auto"
    device: Optional[str] = None  # None: cuda when available
    revision: Optional[str] = None
    trust_remote_code: bool = False
    part: int = 0
    num_parts: int = 1
    processes: int = 1
    max_shards: Optional[int] = None  # per process: stop after this many shards (time-limited jobs)
    quiet: bool = False


@dataclass
class JobPlan:
    """What the checks settled: the inputs and their companions, the settings document, the processor's text."""

    job: RecaptionJob
    urls: list[str]
    paths: dict[str, str]
    document: dict[str, Any]
    text: str  # the prompt as the processor gets it
    device: str
    dtype: str

    @property
    def fingerprint(self) -> str:
        return job_fingerprint(self.document)

    def mine(self) -> list[str]:
        """This part's shards: a contiguous range of the sorted list."""
        start, stop = chunk_bounds(len(self.urls), self.job.num_parts)[self.job.part]
        return self.urls[start:stop]


# ---------------------------------------------------------------- before the model


def check_numbers(job: RecaptionJob) -> None:
    if job.batch_size < 1:
        raise RecaptionError(f"--batch-size {job.batch_size}: expected a positive number of images per batch")
    if job.min_words < 0 or job.max_words < max(job.min_words, 1):
        raise RecaptionError(f"--min-words {job.min_words} --max-words {job.max_words}: expected 0 <= min <= max and "
                             f"max >= 1 (the paper asked for more than 50 words; e.g. --min-words 30 --max-words 250)")
    if job.num_parts < 1 or not 0 <= job.part < job.num_parts:
        raise RecaptionError(f"--part {job.part} of --num-parts {job.num_parts}: expected 0 <= part < num-parts")
    if job.processes < 1:
        raise RecaptionError(f"--processes {job.processes}: expected one or more (one per GPU)")
    if job.max_shards is not None and job.max_shards < 1:
        raise RecaptionError(f"--max-shards {job.max_shards}: expected a positive number of shards per process")
    key = job.caption_key
    if not key or key != key.strip() or key.startswith(("_", ".")) or any(c in key for c in ":/ ") or "." not in key \
            or record_key_of(key) == key:
        raise RecaptionError(f"--key {key!r}: expected a member extension with a suffix, such as dense.txt or "
                             f"llava.txt (its json record goes beside it as {record_key_of(key or 'dense.txt')}).")
    job.generation.check()


def check_inputs(job: RecaptionJob) -> list[str]:
    """The job's input shards, and that their samples hold neither the new key nor its record's."""
    try:
        urls = resolve_shards(job.shards)
    except (FileNotFoundError, ValueError) as error:
        raise RecaptionError(f"SHARDS {job.shards!r}: {error}. Give a folder of .tar shards (prepare.py's or "
                             f"img2dataset's output), a brace pattern or a manifest.json.") from None
    first = next(iter(_first_samples(urls[0])), None)
    if first is not None:
        taken = [k for k in (job.caption_key, record_key_of(job.caption_key)) if k in first]
        if taken:
            raise RecaptionError(f"--key {job.caption_key}: the input samples already hold {', '.join(taken)} "
                                 f"(sample {first['__key__']!r} of {urls[0]}); the originals are never replaced, so "
                                 f"give the new captions another key, e.g. --key llava.txt.")
    return urls


def _first_samples(url: str):
    try:
        yield from iter_tar_samples(url)
    except SampleError:
        return


def plan_job(job: RecaptionJob) -> JobPlan:
    """Every check that needs no weights, in the order a user fixes them; writes job.json last (nothing before)."""
    check_numbers(job)
    urls = check_inputs(job)
    paths = companion_paths(urls, job.output)
    device = job.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if job.processes > 1 and device.startswith("cuda") and job.processes > torch.cuda.device_count():
        raise RecaptionError(f"--processes {job.processes}: only {torch.cuda.device_count()} GPUs are visible; use "
                             f"one process per GPU.")
    dtype = resolve_dtype(job.dtype, device)
    config = check_model_source(job.model, job.revision, job.trust_remote_code)
    processor = load_processor(job.model, job.revision, job.trust_remote_code)
    text, used_format = prompt_text(processor, job.prompt, job.prompt_format)
    check_prompt(processor, config, text, job.generation.max_new_tokens, used_format)
    document = {
        "format": "llm4gen-recaption", "version": FORMAT_VERSION, "model": model_identity(job.model, job.revision),
        "prompt": job.prompt, "prompt_format": used_format, "generation": job.generation.record(), "dtype": dtype,
        "caption_key": job.caption_key, "record_key": record_key_of(job.caption_key),
        "caption_keys": list(job.caption_keys), "min_words": job.min_words, "max_words": job.max_words,
        "inputs": input_entries(urls),
    }
    os.makedirs(job.output, exist_ok=True)
    claim_output(job.output, document)
    return JobPlan(job, urls, paths, document, text, device, dtype)


# ---------------------------------------------------------------- one shard


@dataclass
class PendingSample:
    """One sample on its way into the companion: its image (None once it is known to be skipped)."""

    key: str
    original: Optional[str]
    image: Optional[Image.Image] = None
    status: Optional[str] = None  # a skip reason known before generation
    generated: Optional[Generated] = None


def read_sample(raw: dict[str, Any], caption_keys: Sequence[str]) -> PendingSample:
    try:
        original = extract_caption(raw, caption_keys)
    except SampleError:
        original = None
    entry = PendingSample(str(raw["__key__"]), original)
    try:
        check_download_status(raw)
        entry.image = decode_image(find_image_member(raw))
    except SampleError as error:
        entry.status = error.reason  # bad_image or failed_download
    return entry


def verdict(generated: Generated, min_words: int, max_words: int) -> tuple[str, int]:
    """(captioned | empty_output | too_short | too_long, the word count) of one generated caption."""
    words = len(generated.text.split())
    if words == 0:
        return "empty_output", 0
    if words < min_words:
        return "too_short", words
    if words > max_words:
        return "too_long", words
    return "captioned", words


def batch_seed(seed: int, shard: str, batch: int) -> int:
    """The sampling seed of one batch: fixed by the job's seed and the batch's place, never by the process."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{shard}/{batch}".encode()).digest()[:8], "big") >> 1


def caption_shard(url: str, companion: str, captioner: Any, plan: JobPlan,
                  progress: Callable[[int], None] = lambda n: None) -> dict[str, Any]:
    """Writes one shard's companion (every sample's record, the caption when it passes) and returns its record.
    A shard that cannot be opened raises ``SampleError("bad_shard")`` and writes nothing (a rerun retries it)."""
    job, start = plan.job, time.perf_counter()
    name = os.path.basename(companion)
    for stale in temporary_files(companion):  # a killed run's partial companion (one process per shard)
        os.remove(stale)
    tmp = f"{companion}.tmp-{socket.gethostname()}-{os.getpid()}"
    writer = CompanionWriter(tmp)
    skipped = Counter({reason: 0 for reason in choices.RECAPTION_SKIP_REASONS})
    words_seen: Counter = Counter()
    skipped_samples: list[dict[str, Any]] = []
    totals = {"read": 0, "captioned": 0, "truncated": 0, "batches": 0}
    pending: list[PendingSample] = []
    shared = {"model": plan.document["model"], "prompt": job.prompt, "generation": plan.document["generation"]}

    def flush() -> None:
        todo = [e for e in pending if e.image is not None]
        if todo:
            seed = batch_seed(job.generation.seed, name, totals["batches"]) if job.generation.do_sample else None
            for entry, generated in zip(todo, captioner.caption([e.image for e in todo], seed=seed)):
                entry.generated = generated
            totals["batches"] += 1
        for entry in pending:
            record: dict[str, Any] = {**shared, "original_caption": entry.original}
            members: dict[str, bytes] = {}
            if entry.generated is None:
                status = entry.status
            else:
                status, words = verdict(entry.generated, job.min_words, job.max_words)
                words_seen[words] += 1
                record.update(words=words, finished=entry.generated.finished)
                totals["truncated"] += int(not entry.generated.finished and status == "captioned")
                if status == "captioned":
                    members[job.caption_key] = entry.generated.text.encode("utf-8")
                else:
                    record["text"] = entry.generated.text  # kept for inspection, never trained on
            record["status"] = status
            if status == "captioned":
                totals["captioned"] += 1
            else:
                skipped[status] += 1
                skipped_samples.append({"shard": name, "key": entry.key, "reason": status})
            members[plan.document["record_key"]] = json.dumps(record, ensure_ascii=False, sort_keys=True).encode("utf-8")
            writer.add(entry.key, members)
        progress(len(pending))
        pending.clear()

    try:
        try:
            for raw in iter_tar_samples(url):
                totals["read"] += 1
                pending.append(read_sample(raw, job.caption_keys))
                if sum(e.image is not None for e in pending) == job.batch_size:
                    flush()
        except SampleError as error:
            if totals["read"] == 0:
                raise
            skipped["bad_shard"] += 1  # the samples read before the break keep their captions
            skipped_samples.append({"shard": name, "key": None, "reason": "bad_shard", "detail": str(error)})
        flush()
        writer.close()
    except BaseException:
        writer.close()
        os.remove(tmp)
        raise
    seconds = time.perf_counter() - start
    record = {"shard": name, "input": absolute(str(url)), "job": plan.fingerprint, "read": totals["read"],
              "captioned": totals["captioned"], "truncated": totals["truncated"], "skipped": dict(skipped),
              "word_counts": {str(k): words_seen[k] for k in sorted(words_seen)}, "skipped_samples": skipped_samples,
              "seconds": round(seconds, 3), "batch_size": job.batch_size}
    return finish_companion(tmp, companion, record)


# ---------------------------------------------------------------- the job


def caption_shards(plan: JobPlan, shards: Sequence[str], device: str, position: int = 0,
                   log: Callable[[str], None] = print) -> list[str]:
    """Captions the given shards that are not done, with one model on ``device``; returns the ones that failed."""
    job = plan.job
    todo = [url for url in shards if finished_record(plan.paths[url], plan.fingerprint) is None]
    if job.max_shards is not None:
        todo = todo[:job.max_shards]
    log(f"[part {job.part}/{job.num_parts}, process {position}] {len(shards)} shards: {len(shards) - len(todo)} done, "
        f"captioning {len(todo)} on {device} ({plan.dtype})")
    if not todo:
        return []
    captioner = Captioner(job.model, plan.text, revision=job.revision, trust_remote_code=job.trust_remote_code,
                          dtype=plan.dtype, device=device, generation=job.generation)
    failed = []
    with tqdm(unit="img", desc=f"recaption {position}", position=position, dynamic_ncols=True,
              disable=True if job.quiet else None) as bar:
        for url in todo:
            try:
                record = caption_shard(url, plan.paths[url], captioner, plan, bar.update)
            except SampleError as error:
                log(f"{url}: not captioned ({error}); a rerun retries it")
                failed.append(url)
                continue
            skips = ", ".join(f"{k} {v}" for k, v in record["skipped"].items() if v) or "none skipped"
            rate = f", {record['read'] / record['seconds']:.1f} images/s" if record["seconds"] >= 0.05 else ""
            log(f"{record['shard']}: {record['read']} read, {record['captioned']} captioned ({skips}), "
                f"{record['seconds']:.1f} s{rate}")
    return failed


def _process_main(plan: JobPlan, shards: list[str], device: str, position: int) -> None:
    failed = caption_shards(plan, shards, device, position)
    raise SystemExit(1 if failed else 0)


def run_recaption(job: RecaptionJob, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Plans (refusing bad requests before any weights load), captions this part's unfinished shards and, when the
    whole job is done, writes manifest.json and report.json. Returns ``{"failed", "done", "manifest", "report"}``."""
    plan = plan_job(job)
    mine = plan.mine()
    started = time.perf_counter()
    if job.processes == 1 or len(mine) <= 1:
        failed = caption_shards(plan, mine, plan.device, log=log)
    else:
        # one process per GPU, each on a contiguous range of this part's shards; spawn, since CUDA cannot fork
        context = multiprocessing.get_context("spawn")
        workers = []
        for i, (a, b) in enumerate(chunk_bounds(len(mine), job.processes)):
            device = f"cuda:{i}" if plan.device.startswith("cuda") else plan.device
            worker = context.Process(target=_process_main, args=(plan, mine[a:b], device, i))
            worker.start()
            workers.append(worker)
        for worker in workers:
            worker.join()
        failed = [url for url in mine if finished_record(plan.paths[url], plan.fingerprint) is None]
    done = [url for url in plan.urls if finished_record(plan.paths[url], plan.fingerprint) is not None]
    log(f"{len(done)} of {len(plan.urls)} shards done ({time.perf_counter() - started:.1f} s in this run)")
    merged = merge(job.output, plan.document, plan.urls)
    if merged is None:
        log(f"manifest.json waits for the other {len(plan.urls) - len(done)} shards: the part that finishes last "
            f"writes it (or run recaption.py --merge --output {job.output}).")
        return {"failed": failed, "done": done, "manifest": None, "report": None}
    manifest, report = merged
    log(format_report(report, job.output))
    return {"failed": failed, "done": done, "manifest": manifest, "report": report}


def merge_job(output: str, log: Callable[[str], None] = print) -> tuple[dict, dict]:
    """manifest.json and report.json of a job whose shards are all done (recaption.py --merge)."""
    document = read_job(output)
    urls = input_urls(document["inputs"])
    merged = merge(output, document, urls)
    if merged is None:
        raise RecaptionError(f"{output}: some shards are not done yet; rerun the job (same arguments) to finish them")
    log(format_report(merged[1], output))
    return merged


def format_report(report: dict[str, Any], output: str) -> str:
    words = report["words"]
    lines = [f"captioned {report['captioned']} of {report['read']} images into {output}"
             + (f" (words: min {words['min']}, median {words['median']}, mean {words['mean']}, max {words['max']};"
                f" {report['truncated']} captions ran out of tokens)" if words.get("count") else "")]
    for reason, count in report["skipped"].items():
        if count:
            lines.append(f"  {reason:<16}{count:>10}  ({report['reasons'][reason]})")
    lines.append(f"manifest: {os.path.join(output, 'manifest.json')}   report: {os.path.join(output, 'report.json')}")
    return "\n".join(lines)

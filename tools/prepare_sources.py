"""prepare.py's inputs: the sources it reads (a folder with caption sidecars, CSV/TSV, JSONL, parquet, a folder of
WebDataset shards), each input's key and caption, duplicate keys, and the fingerprint of the listed inputs."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import math
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from llm4gen.configs import choices
from llm4gen.configs.errors import UserError


IMAGE_EXTENSIONS = frozenset(f".{extension}" for extension in choices.IMAGE_EXTENSIONS)  # with the dot


CAPTION_EXTENSION = ".txt"


TABLE_KINDS = {".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl",
               ".parquet": "parquet", ".pq": "parquet"}


WRITTEN = "written"


SKIP_REASONS = choices.PREPARE_SKIP_REASONS


class PrepareError(UserError):
    """A problem with the arguments, the source or the output folder that the user must fix."""


class SkipSample(Exception):
    """One input cannot become a sample; `reason` is a key of SKIP_REASONS."""

    def __init__(self, reason: str, detail: str = ""):
        assert reason in SKIP_REASONS, reason
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class SourceItem:
    """One input as listed from the source, before any file is opened.

    `caption` holds a table's caption value (str, bytes or None); `caption_path` a folder's sidecar.
    `skip` is set when the listing alone already decides the outcome (duplicate key, bad record).
    """

    index: int
    key: str | None
    source: str  # the path as the user wrote it (folder: relative to the folder); used in reports
    image_path: str | None
    caption: Any = None
    caption_path: str | None = None
    skip: str | None = None
    detail: str = ""
    members: tuple[tuple[str, str], ...] = ()  # a shard sample's (extension, tar member name); image_path: the tar


@dataclass(frozen=True)
class SourceSpec:
    path: str
    kind: str  # folder | shards | csv | tsv | jsonl | parquet
    image_column: str = "image"
    caption_column: str = "caption"
    key_column: str | None = None
    image_root: str | None = None


def key_from_name(name: str) -> str:
    """A WebDataset-safe key: WebDataset cuts a member name at its first '.', so dots (and path
    separators, which would make the key a folder) become '_'."""
    key = re.sub(r"[./\\]", "_", name.strip())
    if not key:
        raise SkipSample("bad_record", "empty key")
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:
        raise SkipSample("bad_record", f"key {printable(name)!r} is not valid UTF-8") from None
    return key


def caption_from_bytes(raw: bytes) -> str:
    """Decode a caption file: UTF-8 (a BOM is dropped), stripped of surrounding whitespace."""
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise SkipSample("caption_not_utf8", f"byte {raw[err.start:err.start + 1]!r} at {err.start}") from None
    return caption_from_text(text)


def caption_from_text(text: str) -> str:
    # Table files are read with errors="surrogateescape": a lone surrogate marks a non-UTF-8 byte.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise SkipSample("caption_not_utf8", f"undecodable byte at {err.start}") from None
    text = text.strip()
    if not text:
        raise SkipSample("empty_caption")
    return text


def caption_from_value(value: Any) -> str:
    """A caption cell: str or bytes; None or NaN (pandas' empty cell) is a missing caption."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        raise SkipSample("missing_caption", "no caption value")
    if isinstance(value, (bytes, bytearray)):
        return caption_from_bytes(bytes(value))
    if not isinstance(value, str):
        raise SkipSample("bad_record", f"caption is a {type(value).__name__}, not text")
    return caption_from_text(value)


def read_caption(item: SourceItem) -> str:
    if item.caption_path is None:
        return caption_from_value(item.caption)
    try:
        raw = Path(item.caption_path).read_bytes()
    except FileNotFoundError:
        raise SkipSample("missing_caption", f"no sidecar {os.path.basename(printable(item.caption_path))}") from None
    except OSError as err:
        raise SkipSample("missing_caption", f"cannot read {printable(item.caption_path)}: {err.strerror}") from None
    return caption_from_bytes(raw)


def printable(text: str) -> str:
    """A path or name that may hold surrogate-escaped bytes, made safe for UTF-8 JSON."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def read_image_bytes(path: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise SkipSample("missing_image", "no such file") from None
    except OSError as err:
        raise SkipSample("missing_image", err.strerror or type(err).__name__) from None
    if not data:
        raise SkipSample("empty_file")
    return data


_OPEN_SHARD: dict[str, tarfile.TarFile] = {}  # the shard a chunk is reading (its samples come in tar order)


def shard_members(item: SourceItem) -> dict[str, bytes]:
    """A shard sample's members by extension, read from its tar (kept open for the next sample)."""
    tar = _OPEN_SHARD.get(item.image_path)
    if tar is None:
        for old in _OPEN_SHARD.values():
            old.close()
        _OPEN_SHARD.clear()
        tar = _OPEN_SHARD[item.image_path] = tarfile.open(item.image_path)
    members = {}
    for extension, name in item.members:
        handle = tar.extractfile(name)
        members[extension] = handle.read() if handle is not None else b""
    return members


def read_shard_sample(item: SourceItem) -> tuple[str, bytes, dict]:
    """(caption, image bytes, the downloader's json) of a shard sample, img2dataset's layout: ``KEY.jpg``
    (or another image extension), ``KEY.txt`` or the json's ``caption``, ``KEY.json`` with ``status``."""
    members = shard_members(item)
    try:
        meta = json.loads(members["json"]) if "json" in members else {}
    except ValueError:
        meta = {}
    meta = meta if isinstance(meta, dict) else {}
    status = meta.get("status")
    if status is not None and status != "success":
        raise SkipSample("failed_download", f"status {status!r}")
    if "txt" in members:
        caption = caption_from_bytes(members["txt"])
    elif isinstance(meta.get("caption"), str):
        caption = caption_from_text(meta["caption"])
    else:
        raise SkipSample("missing_caption", "no .txt member and no caption in the json")
    images = [ext for ext, _ in item.members if f".{ext.lower()}" in IMAGE_EXTENSIONS]
    if not images:
        raise SkipSample("missing_image", f"no image member among {[ext for ext, _ in item.members]}")
    data = members[images[0]]
    if not data:
        raise SkipSample("empty_file")
    return caption, data, meta


def detect_source_kind(path: Path) -> str:
    if path.is_dir():
        return "shards" if any(path.glob("*.tar")) else "folder"
    if not path.exists():
        raise PrepareError(f"source {str(path)!r} does not exist; give a folder of images with .txt "
                           f"captions or a .csv/.tsv/.jsonl/.parquet file")
    kind = TABLE_KINDS.get(path.suffix.lower())
    if kind is None:
        raise PrepareError(f"source {str(path)!r} has suffix {path.suffix!r}, which is not supported; "
                           f"use a folder or one of {sorted(TABLE_KINDS)}")
    return kind


def list_folder(folder: Path) -> list[SourceItem]:
    """Images under `folder` in sorted relative-path order; each expects the sidecar `STEM.txt`
    beside it (a missing one is found when the input is processed: missing_caption)."""
    found: list[tuple[str, str]] = []  # (relative path, absolute path)
    for directory, subdirs, files in os.walk(folder):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        for name in files:
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                absolute = os.path.join(directory, name)
                found.append((Path(os.path.relpath(absolute, folder)).as_posix(), absolute))
    found.sort()
    items = []
    for index, (relative, absolute) in enumerate(found):
        stem = os.path.splitext(os.path.basename(relative))[0]
        caption_path = os.path.splitext(absolute)[0] + CAPTION_EXTENSION
        items.append(with_key(SourceItem(index, None, relative, absolute, caption_path=caption_path), stem))
    return items


def list_shards(folder: Path) -> list[SourceItem]:
    """The samples of the ``*.tar`` shards in ``folder`` (an img2dataset output: the ``.parquet`` and
    ``_stats.json`` files beside them are not inputs), in shard and tar order; the key is the sample's own."""
    items = []
    for tar_path in sorted(folder.glob("*.tar")):
        grouped: dict[str, list[tuple[str, str]]] = {}
        try:
            with tarfile.open(tar_path) as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    directory, base = os.path.split(member.name)
                    if "." not in base or base.startswith("."):
                        continue
                    stem, extension = base.split(".", 1)
                    grouped.setdefault(os.path.join(directory, stem), []).append((extension, member.name))
        except (tarfile.TarError, OSError) as err:
            raise PrepareError(f"shard {str(tar_path)!r} cannot be read as a tar ({err}); remove it or download "
                               f"it again") from None
        for stem, members in grouped.items():
            item = SourceItem(len(items), None, f"{tar_path.name}/{stem}", str(tar_path), members=tuple(members))
            items.append(with_key(item, os.path.basename(stem)))
    return items


def with_key(item: SourceItem, name: str) -> SourceItem:
    try:
        return dataclasses.replace(item, key=key_from_name(name))
    except SkipSample as skip:
        return dataclasses.replace(item, skip=skip.reason, detail=skip.detail)


def read_rows(spec: SourceSpec) -> tuple[list[str], Iterable[tuple[str, dict | None, str]]]:
    """(column names, rows as (location, row or None, problem)) for a table source."""
    path = Path(spec.path)
    if spec.kind in ("csv", "tsv"):
        handle = open(path, newline="", encoding="utf-8-sig", errors="surrogateescape")
        if spec.kind == "tsv":
            reader = csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        else:
            reader = csv.DictReader(handle)
        columns = list(reader.fieldnames or [])

        def csv_rows():
            with handle:
                for row in reader:
                    yield f"{path.name}:{reader.line_num}", row, ""
        return columns, csv_rows()
    if spec.kind == "jsonl":
        return [], jsonl_rows(path)
    if spec.kind == "parquet":
        columns, rows = read_parquet(path, [c for c in (spec.image_column, spec.caption_column,
                                                         spec.key_column) if c])
        return columns, ((f"{path.name}:row{i}", row, "") for i, row in enumerate(rows))
    raise AssertionError(spec.kind)


def jsonl_rows(path: Path):
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            line = raw.decode("utf-8", "surrogateescape").strip()
            if not line:
                continue
            location = f"{path.name}:{number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                yield location, None, f"invalid JSON: {err.msg}"
                continue
            if not isinstance(row, dict):
                yield location, None, f"a JSON {type(row).__name__}, not an object"
                continue
            yield location, row, ""


def read_parquet(path: Path, wanted: list[str]) -> tuple[list[str], list[dict]]:
    try:
        import pyarrow.parquet as pq  # optional: only parquet inputs need it
    except ImportError:
        pq = None
    if pq is not None:
        columns = list(pq.read_schema(path).names)
        require_columns(columns, wanted, path)
        return columns, pq.read_table(path, columns=wanted).to_pylist()
    try:
        import pandas  # optional: only parquet inputs without pyarrow need it
    except ImportError:
        raise PrepareError(f"reading the parquet file {str(path)!r} needs pyarrow (or pandas), and "
                           f"neither is installed; run `pip install pyarrow`, or convert the table "
                           f"to CSV/JSONL") from None
    frame = pandas.read_parquet(path)
    columns = [str(c) for c in frame.columns]
    require_columns(columns, wanted, path)
    return columns, frame[wanted].to_dict("records")


def require_columns(columns: Sequence[str], wanted: Iterable[str], path: Path) -> None:
    missing = [c for c in wanted if c and c not in columns]
    if missing:
        raise PrepareError(f"{str(path)!r} has no column {', '.join(map(repr, missing))}; its columns "
                           f"are {list(columns)}. Name the right ones with --image-column / "
                           f"--caption-column / --key-column")


def list_table(spec: SourceSpec) -> list[SourceItem]:
    root = Path(spec.image_root) if spec.image_root else Path(spec.path).parent
    columns, rows = read_rows(spec)
    if spec.kind in ("csv", "tsv"):
        require_columns(columns, [spec.image_column, spec.caption_column, spec.key_column], Path(spec.path))
    items = []
    for index, (location, row, problem) in enumerate(rows):
        if row is None:
            items.append(SourceItem(index, None, location, None, skip="bad_record", detail=problem))
            continue
        image = row.get(spec.image_column)
        if image is None or (isinstance(image, float) and math.isnan(image)) or not str(image).strip():
            items.append(SourceItem(index, None, location, None, skip="bad_record",
                                    detail=f"no value in column {spec.image_column!r}"))
            continue
        image = str(image).strip()
        item = SourceItem(index, None, image, str(root / image), caption=row.get(spec.caption_column))
        if spec.key_column:
            key = row.get(spec.key_column)
            name = "" if key is None or (isinstance(key, float) and math.isnan(key)) else str(key)
        else:
            name = os.path.splitext(os.path.basename(image))[0]
        items.append(with_key(item, name))
    return items


def list_source(spec: SourceSpec) -> list[SourceItem]:
    if spec.kind == "folder":
        return list_folder(Path(spec.path))
    if spec.kind == "shards":
        return list_shards(Path(spec.path))
    return list_table(spec)


def mark_duplicates(items: list[SourceItem]) -> tuple[list[SourceItem], list[tuple[SourceItem, SourceItem]]]:
    """The first input with a key keeps it; later ones are marked `duplicate_key`.
    Returns the marked items and (first, duplicate) pairs."""
    first_by_key: dict[str, SourceItem] = {}
    marked, pairs = [], []
    for item in items:
        if item.skip is None and item.key is not None:
            first = first_by_key.setdefault(item.key, item)
            if first is not item:
                pairs.append((first, item))
                item = dataclasses.replace(item, skip="duplicate_key",
                                           detail=f"key {item.key!r} first used by {printable(first.source)}")
        marked.append(item)
    return marked, pairs


def inputs_fingerprint(items: Sequence[SourceItem]) -> str:
    """Changes when the listed inputs change, so a resume cannot mix two different input lists."""
    digest = hashlib.sha256()
    for item in items:
        digest.update(json.dumps([item.key, printable(item.source), item.skip,
                                  None if item.caption is None else repr(item.caption)]).encode())
    return digest.hexdigest()

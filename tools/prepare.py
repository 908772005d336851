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

import argparse
import csv
import dataclasses
import hashlib
import io
import json
import math
import multiprocessing
import os
import re
import sys
import tarfile
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm import tqdm

from llm4gen.configs import choices
from llm4gen.configs.errors import UserError, entry_point
from llm4gen.datamodules import transforms

MANIFEST_FORMAT = "llm4gen-webdataset-shards"
MANIFEST_VERSION = 1
SAMPLE_MEMBERS = ("jpg", "json", "txt")  # tar member extensions of every sample, in tar order
IMAGE_EXTENSIONS = frozenset(f".{extension}" for extension in choices.IMAGE_EXTENSIONS)  # with the dot
CAPTION_EXTENSION = ".txt"
TABLE_KINDS = {".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl",
               ".parquet": "parquet", ".pq": "parquet"}
DEFAULT_SAMPLES_PER_SHARD = 1000
DEFAULT_CHUNK_SIZE = 10_000  # inputs per chunk when the number of chunks is not given
DEFAULT_JPEG_QUALITY = 95
EXIF_ORIENTATION = 0x0112

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


@dataclass(frozen=True)
class ShardSettings:
    samples_per_shard: int = DEFAULT_SAMPLES_PER_SHARD
    max_shard_bytes: int | None = None
    min_size: int = 0
    resize_to: int | None = None
    jpeg_quality: int = DEFAULT_JPEG_QUALITY
    keep_original_jpeg: bool = True


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


# ----------------------------------------------------------------------------------------------
# Keys and captions


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


# ----------------------------------------------------------------------------------------------
# Images


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


def open_image(data: bytes, shorter_side: int | None = None) -> tuple[Image.Image, tuple[int, int], str]:
    """(decoded image, stored (width, height), stored mode). Decoding the whole file here finds
    truncation before a training worker does. With `shorter_side`, a JPEG is decoded at the smallest
    DCT scale (1/2, 1/4, 1/8) that keeps the shorter side >= shorter_side: the same resize, several
    times faster for large photos."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            stored_size, stored_mode = image.size, image.mode
            target = resized_size(image.size, shorter_side)
            if target is not None and image.format == "JPEG":
                image.draft(None, target)
            image.load()
    except UnidentifiedImageError:
        raise SkipSample("not_an_image", "PIL cannot identify the format") from None
    except Image.DecompressionBombError as err:
        raise SkipSample("image_too_large", str(err)) from None
    except Exception as err:  # decoders raise OSError, SyntaxError, ValueError, struct.error ...
        raise SkipSample("corrupt_image", f"{type(err).__name__}: {err}") from None
    return image, stored_size, stored_mode


def exif_orientation(image: Image.Image) -> int:
    try:
        return int(image.getexif().get(EXIF_ORIENTATION, 1))
    except Exception:  # unreadable EXIF: treat as not upright so it is re-encoded without it
        return -1


def upright(image: Image.Image) -> Image.Image:
    """Apply the EXIF orientation; an EXIF block PIL cannot parse is ignored."""
    try:
        return ImageOps.exif_transpose(image)
    except Exception:
        return image


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode to RGB, as training decodes it (``transforms.to_rgb``); a mode PIL cannot
    convert is skipped with a reason."""
    try:
        return transforms.to_rgb(image)
    except (ValueError, OSError) as err:
        raise SkipSample("unsupported_image_mode", f"mode {image.mode}: {err}") from None


def resized_size(size: tuple[int, int], resize_to: int | None) -> tuple[int, int] | None:
    """(width, height) with the shorter side set to `resize_to`; None when no resize is needed
    (no target, or the image is already at most that size: images are never upscaled)."""
    width, height = size
    shorter = min(width, height)
    if resize_to is None or shorter <= resize_to:
        return None
    scale = resize_to / shorter
    if width <= height:
        return resize_to, max(1, round(height * scale))
    return max(1, round(width * scale)), resize_to


def encode_jpeg(image: Image.Image, quality: int) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


@dataclass(frozen=True)
class RenderedImage:
    jpeg: bytes
    original_size: tuple[int, int]  # (width, height) as stored, before the EXIF rotation
    original_mode: str
    original_format: str | None
    size: tuple[int, int]  # (width, height) of the written JPEG
    reencoded: bool


def render_image(data: bytes, settings: ShardSettings) -> RenderedImage:
    """Validated, upright, RGB JPEG bytes from one image file's bytes (or a SkipSample)."""
    image, original_size, original_mode = open_image(data, settings.resize_to)
    original_format = image.format
    if min(original_size) < settings.min_size:
        raise SkipSample("too_small", f"{original_size[0]}x{original_size[1]} < min_size {settings.min_size}")
    if (settings.keep_original_jpeg and original_format == "JPEG" and original_mode == "RGB"
            and resized_size(original_size, settings.resize_to) is None and exif_orientation(image) == 1):
        return RenderedImage(data, original_size, original_mode, original_format, original_size, False)
    decoded_size = image.size  # smaller than original_size when the JPEG was decoded at a DCT scale
    rgb = to_rgb(upright(image))
    # the target comes from the stored size, so a draft decode gives the same output size as a full one
    new_size = resized_size(original_size, settings.resize_to)
    if new_size is not None and rgb.size != decoded_size:  # EXIF rotated by 90 or 270 degrees
        new_size = new_size[::-1]
    if new_size is not None:
        # reducing_gap: a cheap integer reduce first when shrinking a lot, then LANCZOS (Pillow docs)
        rgb = rgb.resize(new_size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    return RenderedImage(encode_jpeg(rgb, settings.jpeg_quality), original_size, original_mode,
                         original_format, rgb.size, True)


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


def build_sample(item: SourceItem, settings: ShardSettings) -> dict[str, bytes]:
    """The tar members of one sample, keyed by extension; raises SkipSample with the first problem."""
    if item.skip is not None:
        raise SkipSample(item.skip, item.detail)
    downloaded: dict = {}
    if item.members:  # a sample of an existing shard (img2dataset output)
        caption, data, downloaded = read_shard_sample(item)
    else:
        caption, data = read_caption(item), None
    rendered = render_image(read_image_bytes(item.image_path) if data is None else data, settings)
    original = list(rendered.original_size)
    if isinstance(downloaded.get("original_width"), int) and isinstance(downloaded.get("original_height"), int):
        original = [downloaded["original_width"], downloaded["original_height"]]  # before the downloader's resize
    metadata = {
        "key": item.key,
        "source": printable(item.source),
        "caption": caption,
        **({"url": downloaded["url"]} if isinstance(downloaded.get("url"), str) else {}),
        "original_size": original,
        "original_mode": rendered.original_mode,
        "original_format": rendered.original_format,
        "size": list(rendered.size),
    }
    return {
        "jpg": rendered.jpeg,
        "json": json.dumps(metadata, ensure_ascii=False, sort_keys=True).encode("utf-8"),
        "txt": caption.encode("utf-8"),
    }


# ----------------------------------------------------------------------------------------------
# Sources


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


def chunk_bounds(num_inputs: int, num_chunks: int) -> list[tuple[int, int]]:
    """Contiguous, balanced [start, stop) ranges covering range(num_inputs); sizes differ by <= 1."""
    return [(i * num_inputs // num_chunks, (i + 1) * num_inputs // num_chunks) for i in range(num_chunks)]


# ----------------------------------------------------------------------------------------------
# Shards


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


# ----------------------------------------------------------------------------------------------
# Chunks


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


# ----------------------------------------------------------------------------------------------
# Run, merge, report


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


# ----------------------------------------------------------------------------------------------
# Command line


class OneParagraphParser(argparse.ArgumentParser):
    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}. Run `{self.prog} --help` for the options.\n")


def parse_bytes(text: str) -> int:
    """'500MB', '1GiB', '2000000' -> bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)\s*", text.lower())
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size; write e.g. 500MB, 1GiB or 2000000")
    number, unit = float(match.group(1)), match.group(2).rstrip("b")
    scale = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
             "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}[unit]
    return int(number * scale)


def build_parser() -> argparse.ArgumentParser:
    parser = OneParagraphParser(
        prog="prepare.py",
        description="Write WebDataset tar shards (KEY.jpg, KEY.json, KEY.txt), manifest.json and report.json "
                    "from a folder of images with .txt captions, or a CSV/TSV/JSONL/parquet table of "
                    "(image path, caption). Reruns with the same arguments resume.")
    parser.add_argument("source", nargs="?", metavar="SOURCE", help="folder of images + .txt sidecars, folder of .tar shards (img2dataset), or a .csv/.tsv/.jsonl/.parquet file")
    parser.add_argument("--output", "-o", metavar="DIR", required=True, help="output folder (shards/, chunks/, manifest.json, report.json)")
    shards = parser.add_argument_group("shards and images")
    shards.add_argument("--samples-per-shard", type=int, metavar="N", default=DEFAULT_SAMPLES_PER_SHARD,
                        help=f"samples per tar shard (default {DEFAULT_SAMPLES_PER_SHARD})")
    shards.add_argument("--max-shard-bytes", type=parse_bytes, metavar="SIZE", default=None,
                        help="also start a new shard before a file would exceed this size (e.g. 1GB)")
    shards.add_argument("--min-size", type=int, metavar="PX", default=0, help="skip images whose shorter side is below this")
    shards.add_argument("--resize-to", type=int, metavar="PX", default=None,
                        help="downscale so the shorter side is this many pixels (never upscales)")
    shards.add_argument("--jpeg-quality", type=int, metavar="Q", default=DEFAULT_JPEG_QUALITY,
                        help=f"quality of re-encoded JPEGs (default {DEFAULT_JPEG_QUALITY})")
    shards.add_argument("--reencode-jpeg", action="store_true",
                        help="re-encode every image, even upright RGB JPEGs that could be kept byte for byte")
    table = parser.add_argument_group("table sources")
    table.add_argument("--image-column", metavar="NAME", default="image")
    table.add_argument("--caption-column", metavar="NAME", default="caption")
    table.add_argument("--key-column", metavar="NAME", default=None, help="default: the image file's stem")
    table.add_argument("--image-root", metavar="DIR", default=None, help="folder relative image paths start from (default: the table's folder)")
    table.add_argument("--on-duplicate", choices=("skip", "refuse"), default="skip",
                       help="skip: later inputs with a used key are skipped as duplicate_key; refuse: stop before writing")
    work = parser.add_argument_group("parallel work and resume")
    work.add_argument("--workers", type=int, metavar="N", default=1, help="local processes, one chunk each at a time")
    work.add_argument("--num-chunks", type=int, metavar="N", default=None,
                      help="split the inputs into this many chunks (default: $SLURM_ARRAY_TASK_COUNT, else one per --chunk-size inputs)")
    work.add_argument("--chunk-size", type=int, metavar="N", default=DEFAULT_CHUNK_SIZE, help="inputs per chunk when --num-chunks is not set")
    work.add_argument("--chunk-index", type=int, metavar="I", default=None,
                      help="process only this chunk (default: from $SLURM_ARRAY_TASK_ID, else all unfinished chunks)")
    work.add_argument("--merge", action="store_true", help="only merge finished chunks into manifest.json and report.json")
    work.add_argument("--overwrite", action="store_true", help="delete an earlier output made with other settings and start over")
    work.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    return parser


def slurm_array(environ: dict) -> tuple[int, int] | None:
    """(this task's 0-based position, task count) in a SLURM job array, or None outside one.
    Arrays may start above 0 and use a step (--array=1-9:2), hence MIN and STEP."""
    if "SLURM_ARRAY_TASK_ID" not in environ:
        return None
    try:
        task = int(environ["SLURM_ARRAY_TASK_ID"])
        first = int(environ.get("SLURM_ARRAY_TASK_MIN", 0))
        step = int(environ.get("SLURM_ARRAY_TASK_STEP", 1)) or 1
        count = int(environ["SLURM_ARRAY_TASK_COUNT"])
    except (KeyError, ValueError) as err:
        raise PrepareError(f"SLURM_ARRAY_TASK_ID is set but the array variables are unusable ({err}); "
                           f"pass --chunk-index and --num-chunks explicitly") from None
    return (task - first) // step, count


def config_from_args(args: argparse.Namespace, environ: dict) -> PrepareConfig:
    """Validate the arguments together; every error says which value is wrong and what would do."""
    positive = {"--samples-per-shard": args.samples_per_shard, "--workers": args.workers,
                "--chunk-size": args.chunk_size}
    for name in ("num_chunks", "resize_to", "max_shard_bytes"):
        if getattr(args, name) is not None:
            positive["--" + name.replace("_", "-")] = getattr(args, name)
    for flag, value in positive.items():
        if value < 1:
            raise PrepareError(f"{flag} must be a positive integer, got {value}")
    if args.min_size < 0:
        raise PrepareError(f"--min-size must be 0 (no filter) or a positive number of pixels, got {args.min_size}")
    if not 1 <= args.jpeg_quality <= 100:
        raise PrepareError(f"--jpeg-quality must be between 1 and 100 (95 is a good default), got {args.jpeg_quality}")
    shard_settings = ShardSettings(args.samples_per_shard, args.max_shard_bytes, args.min_size, args.resize_to,
                                   args.jpeg_quality, not args.reencode_jpeg)
    if args.merge:
        return PrepareConfig(None, args.output, shard_settings, merge_only=True, quiet=args.quiet)
    if args.source is None:
        raise PrepareError("SOURCE is missing: give a folder of images with .txt captions or a "
                           ".csv/.tsv/.jsonl/.parquet file (only --merge runs without one)")
    kind = detect_source_kind(Path(args.source))
    if kind in ("folder", "shards") and (args.key_column or args.image_root):
        raise PrepareError("--key-column and --image-root apply to table sources; a folder's keys come "
                           "from the file names, a shard's from its samples")
    if args.image_root is not None and not Path(args.image_root).is_dir():
        raise PrepareError(f"--image-root {args.image_root!r} is not a folder")
    chunk_index, num_chunks = args.chunk_index, args.num_chunks
    array = slurm_array(environ)
    if array is not None:
        chunk_index = array[0] if chunk_index is None else chunk_index
        num_chunks = array[1] if num_chunks is None else num_chunks
    if chunk_index is not None and num_chunks is None:
        raise PrepareError(f"--chunk-index {chunk_index} needs --num-chunks, so every task splits the "
                           f"inputs the same way")
    if chunk_index is not None and chunk_index < 0:
        raise PrepareError(f"--chunk-index must be >= 0, got {chunk_index}")
    if args.overwrite and chunk_index is not None:
        raise PrepareError("--overwrite cannot be combined with --chunk-index or a SLURM array: one task "
                           "would delete the others' shards; clear the output folder before submitting")
    source = SourceSpec(str(args.source), kind, args.image_column, args.caption_column, args.key_column,
                        args.image_root)
    return PrepareConfig(source, args.output, shard_settings, num_chunks, args.chunk_size, chunk_index,
                         args.workers, args.on_duplicate, False, args.overwrite, args.quiet)


@entry_point("prepare.py")
def main(argv: Sequence[str] | None = None, environ: dict | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = config_from_args(args, dict(os.environ) if environ is None else environ)
    run_prepare(config)
    return 0

"""prepare.py's images: decoded once, turned upright by EXIF, converted to RGB, optionally resized and encoded as
JPEG (an already clean JPEG keeps its bytes), and each written sample's members (jpg, json, txt)."""

from __future__ import annotations

import io
import json
import warnings
from dataclasses import dataclass

from PIL import Image, ImageOps, UnidentifiedImageError

from llm4gen.datamodules import transforms
from llm4gen.tools.prepare_sources import (
    SkipSample,
    SourceItem,
    printable,
    read_caption,
    read_image_bytes,
    read_shard_sample,
)


DEFAULT_SAMPLES_PER_SHARD = 1000
SAMPLE_MEMBERS = ("jpg", "json", "txt")  # tar member extensions of every sample, in tar order


DEFAULT_JPEG_QUALITY = 95


EXIF_ORIENTATION = 0x0112


@dataclass(frozen=True)
class ShardSettings:
    samples_per_shard: int = DEFAULT_SAMPLES_PER_SHARD
    max_shard_bytes: int | None = None
    min_size: int = 0
    resize_to: int | None = None
    jpeg_quality: int = DEFAULT_JPEG_QUALITY
    keep_original_jpeg: bool = True


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

"""Per-sample decoding and augmentation: raw WebDataset members -> caption string and pixel tensor.

Pure functions, one step each, so each can be tested on its own and the datamodule only wires them.
Every random choice takes an explicit ``random.Random``: the datamodule seeds one per sample from
(seed, epoch, sample key), which makes a sample's augmentation reproducible and independent of which
worker or rank happened to load it.

A sample that cannot be used raises :class:`SampleError` with one reason from :data:`SKIP_REASONS`;
the datamodule skips it and counts the reason instead of crashing a long run on one bad image.
"""

from __future__ import annotations

import io
import json
import random
from typing import Mapping, Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps

from llm4gen.configs import choices
from llm4gen.configs.buckets import assign_bucket

SKIP_REASONS: tuple[str, ...] = choices.SAMPLE_SKIP_REASONS  # index order of Batch.skipped
IMAGE_EXTENSIONS: tuple[str, ...] = choices.IMAGE_EXTENSIONS
DEFAULT_CAPTION_KEYS: tuple[str, ...] = choices.CAPTION_KEYS


class SampleError(Exception):
    """A sample (or shard) that must be skipped; ``reason`` is one of :data:`SKIP_REASONS`."""

    def __init__(self, reason: str, detail: str = ""):
        if reason not in SKIP_REASONS:
            raise ValueError(f"unknown skip reason {reason!r}; expected one of {SKIP_REASONS}")
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


# ---------------------------------------------------------------- images


def find_image_member(sample: Mapping[str, object]) -> bytes:
    """The bytes of the sample's first image member (by extension), or ``SampleError("bad_image")``."""
    for extension in IMAGE_EXTENSIONS:
        data = sample.get(extension)
        if data is not None:
            return data  # type: ignore[return-value]
    present = sorted(k for k in sample if not k.startswith("__"))
    raise SampleError("bad_image", f"no image member (looked for {IMAGE_EXTENSIONS}, found {present})")


def decode_image(data: bytes) -> Image.Image:
    """Image bytes -> upright RGB PIL image.

    EXIF orientation is applied (phone photos are often stored sideways), palette/grey/CMYK modes
    become RGB, and transparency is composited on white rather than dropped (dropping alpha turns
    transparent regions into whatever colour the encoder left there, often black).
    """
    try:
        image = Image.open(io.BytesIO(data))
        image.load()  # force the full decode here so truncated files fail here, not later
        image = ImageOps.exif_transpose(image)
        return to_rgb(image)
    except SampleError:
        raise
    except Exception as error:  # PIL raises many types (OSError, SyntaxError, DecompressionBomb...)
        raise SampleError("bad_image", f"{type(error).__name__}: {error}") from error


def sixteen_bit_to_l(image: Image.Image) -> Image.Image:
    """I;16*, I and F modes to 8-bit L: integers are read as 16-bit (0..65535 -> 0..255, rounded),
    F as already 0..255. PIL's own convert clips 16-bit values at 255, turning most pixels white."""
    values = np.asarray(image).astype(np.float64)  # (height, width)
    if image.mode != "F":
        values = values / 257.0
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8))


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB (16-bit scaled to 8-bit), with transparency (an alpha band or a palette/tRNS
    entry) composited on white. Shared by shard writing (prepare) and training-time decoding."""
    if image.mode.startswith("I") or image.mode == "F":
        image = sixteen_bit_to_l(image)
    if "A" in image.getbands() or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def resize_shorter_side(image: Image.Image, resolution: int) -> Image.Image:
    """Resize so the shorter side equals ``resolution``, keeping the aspect ratio (bicubic)."""
    if resolution <= 0:
        raise ValueError(f"resolution must be a positive number of pixels, got {resolution}")
    width, height = image.size
    scale = resolution / min(width, height)
    new_size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    if new_size == (width, height):
        return image
    return image.resize(new_size, resample=Image.Resampling.BICUBIC)


def resize_to_cover(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Resize (bicubic, keeping the aspect ratio) to the smallest size that covers ``size`` = (width, height):
    an aspect-ratio bucket is then cropped from it. For a square ``size`` this is :func:`resize_shorter_side`."""
    target_width, target_height = size
    if target_width == target_height:
        return resize_shorter_side(image, target_width)
    if target_width <= 0 or target_height <= 0:
        raise ValueError(f"the target size must be positive, got {size}")
    width, height = image.size
    scale = max(target_width / width, target_height / height)
    new_size = (max(target_width, round(width * scale)), max(target_height, round(height * scale)))
    if new_size == (width, height):
        return image
    return image.resize(new_size, resample=Image.Resampling.BICUBIC)


def crop_box(size: tuple[int, int], resolution: int | tuple[int, int], center: bool,
             rng: Optional[random.Random]) -> tuple[int, int, int, int]:
    """The (left, top, right, bottom) box of a ``resolution`` square, or of a (width, height) bucket, inside
    an image of ``size``."""
    width, height = size
    crop_width, crop_height = (resolution, resolution) if isinstance(resolution, int) else resolution
    if width < crop_width or height < crop_height:
        raise ValueError(f"image {size} is smaller than the crop {resolution}; resize it first")
    if center:
        left, top = (width - crop_width) // 2, (height - crop_height) // 2
    else:
        if rng is None:
            raise ValueError("a random crop needs an explicit random.Random (rng) for reproducibility")
        left, top = rng.randint(0, width - crop_width), rng.randint(0, height - crop_height)
    return left, top, left + crop_width, top + crop_height


def maybe_flip(image: Image.Image, random_flip: bool, rng: Optional[random.Random]) -> Image.Image:
    """Mirror left-right with probability 1/2 when ``random_flip`` is on."""
    if not random_flip:
        return image
    if rng is None:
        raise ValueError("random_flip needs an explicit random.Random (rng) for reproducibility")
    return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else image


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 tensor (3, H, W) scaled from [0, 255] to [-1, 1] (the VAE's input range)."""
    # numpy, not torch: elementwise torch ops on small tensors wake torch's intra-op thread pool,
    # which in the main process (num_workers=0) competes with the training step for the cores.
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0  # (H, W, 3)
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))  # (3, H, W)


def preprocess_image(
    data: bytes,
    resolution: int,
    center_crop: bool = True,
    random_flip: bool = False,
    rng: Optional[random.Random] = None,
) -> torch.Tensor:
    """Image bytes -> (3, resolution, resolution) float32 in [-1, 1]. Raises ``SampleError("bad_image")``."""
    return preprocess_image_with_geometry(data, resolution, center_crop, random_flip, rng)[0]


def preprocess_image_with_geometry(
    data: bytes,
    resolution: int,
    center_crop: bool = True,
    random_flip: bool = False,
    rng: Optional[random.Random] = None,
    buckets: Optional[Sequence[Sequence[int]]] = None,
) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
    """Like :func:`preprocess_image`, also returning what SDXL is conditioned on: the decoded image's
    (height, width) and the crop's (top, left) in the resized image, mirrored when the crop was flipped
    (as diffusers' SDXL trainer records them).

    With ``buckets`` ((width, height) sizes, ``datamodules.buckets``) the image is resized to cover the
    bucket nearest its aspect ratio and cropped to it: the tensor is (3, bucket height, bucket width)."""
    decoded = decode_image(data)
    size = (resolution, resolution) if buckets is None else assign_bucket(decoded.size[0], decoded.size[1], buckets)
    image = resize_to_cover(decoded, size)
    box = crop_box(image.size, resolution if buckets is None else size, center_crop, rng)
    cropped = image.crop(box)
    flipped = maybe_flip(cropped, random_flip, rng)
    left = image.size[0] - box[2] if flipped is not cropped else box[0]  # the mirrored crop's left edge
    return image_to_tensor(flipped), (decoded.size[1], decoded.size[0]), (box[1], left)


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def original_size(sample: Mapping[str, object], decoded_hw: tuple[int, int]) -> tuple[int, int]:
    """(height, width) of the image before any resize, SDXL's ``original_size``: from the json member's
    ``original_width`` / ``original_height`` (img2dataset, DataComp and LAION shards, whose images the
    downloader resized), else its ``original_size`` [width, height] (prepare.py's record), else the decoded
    image's own size."""
    meta = read_json_member(sample)
    if not isinstance(meta, dict):
        return decoded_hw
    width, height = meta.get("original_width"), meta.get("original_height")
    if _positive_int(width) and _positive_int(height):
        return height, width
    recorded = meta.get("original_size")
    if isinstance(recorded, (list, tuple)) and len(recorded) == 2 and all(_positive_int(v) for v in recorded):
        return recorded[1], recorded[0]
    return decoded_hw


def check_download_status(sample: Mapping[str, object]) -> None:
    """Raises ``SampleError("failed_download")`` when the json member records a download ``status`` other than
    ``success`` (img2dataset writes one per sample; a sample without a status is taken as it is)."""
    meta = read_json_member(sample)
    status = meta.get("status") if isinstance(meta, dict) else None
    if status is not None and status != "success":
        detail = meta.get("error_message") or ""
        raise SampleError("failed_download", f"json status {status!r}{f': {detail}' if detail else ''}")


def sample_rng(seed: int, epoch: int, key: str) -> random.Random:
    """The augmentation RNG of one sample in one epoch: independent of worker, rank and load order."""
    return random.Random(f"{seed}/{epoch}/{key}")


# ---------------------------------------------------------------- captions


def _as_text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)


def read_json_member(sample: Mapping[str, object], extension: str = "json") -> Optional[object]:
    """The parsed json member, or None when absent or not valid JSON."""
    raw = sample.get(extension)
    if raw is None:
        return None
    if not isinstance(raw, (bytes, str)):
        return raw  # already decoded upstream
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None


def extract_caption(sample: Mapping[str, object], caption_keys: Sequence[str] = DEFAULT_CAPTION_KEYS) -> str:
    """The first non-empty caption among ``caption_keys``, stripped.

    A key is a member extension (``"txt"``) or ``"MEMBER:FIELD"`` for a field of a JSON member
    (``"json:caption"``). Raises ``SampleError("missing_caption")`` when no key is present and
    ``SampleError("empty_caption")`` when the keys present are all blank.
    """
    if isinstance(caption_keys, str):
        caption_keys = (caption_keys,)
    found_blank = False
    for key in caption_keys:
        if ":" in key:
            member, field = key.split(":", 1)
            parsed = read_json_member(sample, member)
            if not isinstance(parsed, dict) or parsed.get(field) is None:
                continue
            value = parsed[field]
        else:
            value = sample.get(key)
            if value is None:
                continue
        text = _as_text(value).strip()
        if text:
            return text
        found_blank = True
    if found_blank:
        raise SampleError("empty_caption", f"caption keys {list(caption_keys)} are present but blank")
    present = sorted(k for k in sample if not k.startswith("__"))
    raise SampleError("missing_caption", f"none of {list(caption_keys)} in members {present}")


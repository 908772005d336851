"""Aspect-ratio buckets: training sizes of about equal area, and which one an image goes to.

SDXL is trained on images of many shapes. A centre square crop throws away the sides of a wide photo
(and teaches the model to cut heads off); instead every image is resized to *cover* the bucket whose
aspect ratio is nearest its own and cropped to it, and a batch only ever holds one bucket, so its pixels
(or cached latents) stack into one tensor (NovelAI's scheme; SDXL report, Podell et al. 2023, 2.3).

Pure functions, so the datamodule and the latent cache agree on them; they live with the configs, on the
ground floor, because the config checks compute a run's buckets before anything is built (a range or step that
leaves no bucket is refused there):

- :func:`bucket_sizes` -- the (width, height) buckets for a resolution: both sides multiples of ``step``,
  area at most ``resolution**2`` (the square's memory, never more) and as close to it as the step allows,
  aspect ratios (width / height) within ``[min_aspect, max_aspect]``, sorted by aspect ratio.
- :func:`assign_bucket` -- the bucket of an image of (width, height): the one with the nearest log aspect
  ratio (ties to the earlier bucket). Every image lands in exactly one bucket; an image more extreme than
  the range goes to the range's end bucket and is cropped more.
- :func:`resolve_buckets` -- ``data.buckets`` settings (``enabled: auto`` is on for SDXL) -> the bucket
  list or None (buckets off: square ``resolution`` crops as before).
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

from llm4gen.configs.choices import BUCKET_MODES as ENABLED_VALUES

Bucket = tuple[int, int]  # (width, height) in pixels


def default_step(resolution: int) -> int:
    """64 pixels at real resolutions (SDXL's buckets; a multiple of SD's and SDXL's VAE x UNet downsampling),
    8 for the tiny test resolutions, where 64 would leave only the square."""
    return 64 if resolution >= 256 else 8


def bucket_sizes(resolution: int, step: Optional[int] = None, min_aspect: float = 0.5,
                 max_aspect: float = 2.0) -> list[Bucket]:
    """The (width, height) buckets of about ``resolution**2`` pixels, sorted by aspect ratio (width / height)."""
    step = default_step(resolution) if step is None else int(step)
    if resolution <= 0 or step <= 0:
        raise ValueError(f"resolution ({resolution}) and step ({step}) must be positive")
    if not 0 < min_aspect <= 1 <= max_aspect:
        raise ValueError(f"the aspect range [{min_aspect}, {max_aspect}] must contain 1 (the square) and be positive")
    area = resolution * resolution
    sizes: set[Bucket] = set()
    width = step
    while width * width <= area:  # the portrait side (width <= height); landscape buckets are its mirror
        height = area // width // step * step  # the tallest multiple of step within the area
        if height >= width:
            for size in ((width, height), (height, width)):
                if min_aspect <= size[0] / size[1] <= max_aspect:
                    sizes.add(size)
        width += step
    if not sizes:
        raise ValueError(f"no bucket of steps of {step} px fits resolution {resolution} with aspect ratios in "
                         f"[{min_aspect}, {max_aspect}]; use a smaller step or a wider range")
    return sorted(sizes, key=lambda s: (s[0] / s[1], s[0]))


def assign_bucket(width: int, height: int, buckets: Sequence[Sequence[int]]) -> Bucket:
    """The bucket whose log aspect ratio is nearest the image's (the first of equally near ones)."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if not buckets:
        raise ValueError("no buckets to assign to")
    target = math.log(width / height)
    best = min(range(len(buckets)), key=lambda i: (abs(math.log(buckets[i][0] / buckets[i][1]) - target), i))
    return int(buckets[best][0]), int(buckets[best][1])


def buckets_enabled(enabled: Any, family: str) -> bool:
    """``data.buckets.enabled`` (auto | true | false, any case; a YAML bool) -> on or off. auto: on for SDXL."""
    value = str(enabled).strip().lower()
    if value not in ENABLED_VALUES:
        raise ValueError(f"data.buckets.enabled is {enabled!r}; expected one of {', '.join(ENABLED_VALUES)}")
    return family == "sdxl" if value == "auto" else value == "true"


def resolve_buckets(settings: Optional[Any], resolution: int, family: str) -> Optional[list[Bucket]]:
    """``data.buckets`` of a config (schema.BucketConfig, or its DictConfig) -> the bucket list, or None
    when bucketing is off."""
    if settings is None or not buckets_enabled(settings.enabled, family):
        return None
    return bucket_sizes(int(resolution), settings.step, float(settings.min_aspect), float(settings.max_aspect))

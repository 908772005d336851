"""The exact analyzer of the compositional shapes benchmark: pixels in, objects and a binding score out.

Public API (stable; ``evaluation/__init__.py`` re-exports it):

- ``parse_prompt(text) -> Scene``: the objects a prompt asks for, read with the benchmark's caption
  grammar (``datamodules.shapes``); attributes the prompt leaves out are None and match anything.
- ``prompt_set(name, n=None) -> list[PromptRecord]`` (``evaluation.prompt_sets``): the fixed
  evaluation prompts ``seen_1 .. seen_3``, ``heldout_1 .. heldout_3`` with text, scene, seed, split,
  n_objects, phrasing.
- ``analyze(image) -> list[DetectedObject]``: every object in an image, from pixels alone:
  1. a global colour cast is removed (the border's median colour is moved onto the background gray);
     each pixel takes the nearest palette colour (the 8 object colours and the gray background) if
     it lies within ``max_color_distance`` (RGB Euclidean) of it, else stays unassigned (soft edges,
     colours between two palette entries);
  2. 8-connected components per object colour; components under ``min_area_fraction`` of the image
     are dropped (stray pixels), holes are filled, and components filling under ``min_fill`` of their
     box are dropped (speckle, fringes around another object);
  3. shape: the best intersection-over-union of the component's mask with each shape drawn to fill
     the component's box, or drawn slightly larger, blurred and cut at half intensity (what soft
     edges leave); ``None`` if the best is under ``min_shape_iou``; size: the box's longer
     side against the midpoint between the small and large ranges; colour: the palette label.
- ``score(image, scene_or_text_or_record) -> ImageScore``: the image against what its prompt asks:
  ``shape`` / ``color`` / ``size``: the fraction of prompt objects found with the right shape /
  (shape, colour) / (shape, size), one detection per prompt object (a maximum matching);
  ``binding``: the fraction found with all their attributes (the per-image binding score);
  ``all_bound``: 1 if every prompt object is found bound (the product over noun phrases T2I-CompBench
  uses); ``missing`` / ``extra``: prompt objects minus detections / detections minus prompt objects
  (never negative); ``count_correct``; ``exact``: all bound and nothing extra; ``any_correct``: 1 if
  at least one prompt object is found in its colour and shape.
- ``aggregate(scores) -> dict``: the T2I-CompBench way, the mean of each per-image number over the
  images (of one prompt set), overall and per object count (``by_n_objects``).

Images may be PIL images, (H, W, 3) uint8 arrays, (H, W, 3) float arrays in [0, 1], or torch tensors
(3, H, W) in [0, 1]; square images are expected (the size threshold follows the benchmark's 2x2 layout
at the image's resolution). Objects of one colour that touch merge into one component: the benchmark's
scenes give every object its own colour and a margin, a generator's images may not.

Command line (``evaluation/__main__.py``): ``python -m evaluation prompts DIR`` writes each prompt set
as text, ``python -m evaluation render DIR`` writes ground truth for every prompt set, ``python -m
evaluation score DIR`` scores the images a ``DIR/prompts.jsonl`` lists (``file``, ``text``, ``set``).
"""

from __future__ import annotations

from collections import deque
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Iterable, Optional

import numpy as np
from PIL import Image, ImageFilter

from datamodules.shapes import (
    BACKGROUND_RGB, COLORS, SHAPES, Scene, parse_prompt, shape_mask, size_threshold,
)

PALETTE_NAMES: tuple[str, ...] = tuple(COLORS)                            # label i < 8: an object colour
PALETTE = np.array([COLORS[c] for c in PALETTE_NAMES] + [BACKGROUND_RGB], dtype=np.float32)  # (9, 3)
BACKGROUND_LABEL = len(PALETTE_NAMES)
UNASSIGNED = -1

MAX_COLOR_DISTANCE = 70.0
MIN_AREA_FRACTION = 0.006
MIN_SHAPE_IOU = 0.5
MIN_FILL = 0.3          # components filling less of their box are speckle or fringes, not objects
CATEGORIES: tuple[str, ...] = ("color", "shape", "size")


@dataclass(frozen=True)
class DetectedObject:
    color: str
    shape: Optional[str]                 # None: no shape template fits (IoU < min_shape_iou)
    size: str                            # small | large
    bbox: tuple[int, int, int, int]      # left, top, right, bottom (exclusive)
    area: int                            # pixels
    shape_iou: float                     # IoU with the best shape template

    def attributes(self) -> tuple:
        return (self.color, self.shape, self.size)


@dataclass
class ImageScore:
    n_objects: int                       # objects the prompt asks for
    n_detected: int
    missing: int
    extra: int
    count_correct: float
    shape: float
    color: float
    size: float
    binding: float
    all_bound: float
    exact: float
    any_correct: float                   # 1 if at least one prompt object is found in its colour and shape
    detected: list[DetectedObject] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------- pixels -> objects

def as_rgb_array(image) -> np.ndarray:
    """(H, W, 3) float32 in [0, 255] from a PIL image, an (H, W, 3) uint8 / [0, 1] float array, or a
    (3, H, W) / (H, W, 3) torch tensor in [0, 1]."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float32)
    if hasattr(image, "detach"):  # a torch tensor: (3, H, W) as models produce it, or (H, W, 3)
        image = image.detach().cpu().float().numpy()
        if image.ndim == 3 and image.shape[0] == 3 and image.shape[2] != 3:
            image = image.transpose(1, 2, 0)
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"expected an RGB image of shape (H, W, 3), got an array of shape {array.shape}")
    if array.dtype == np.uint8:
        return array.astype(np.float32)
    if np.issubdtype(array.dtype, np.floating):
        if array.min() < -1e-3 or array.max() > 1 + 1e-3:
            raise ValueError(f"float images must lie in [0, 1], got values in [{array.min():.3f}, {array.max():.3f}]")
        return array.astype(np.float32) * 255.0
    raise ValueError(f"unsupported image dtype {array.dtype}; pass uint8 or float in [0, 1]")


def palette_labels(rgb: np.ndarray, max_color_distance: float = MAX_COLOR_DISTANCE) -> np.ndarray:
    """(H, W) int: index of the nearest palette colour (``BACKGROUND_LABEL`` for the background), or
    ``UNASSIGNED`` where the nearest one is farther than ``max_color_distance``."""
    distances = np.linalg.norm(rgb[:, :, None, :] - PALETTE[None, None], axis=-1)  # (H, W, 9)
    labels = distances.argmin(-1)
    labels[distances.min(-1) > max_color_distance] = UNASSIGNED
    return labels


def remove_color_cast(rgb: np.ndarray, max_color_distance: float = MAX_COLOR_DISTANCE) -> np.ndarray:
    """``rgb`` shifted so that its border's median colour is the background gray, when that median is
    within ``max_color_distance`` of it (a global tint a generator puts on the whole image); unchanged
    otherwise. Scenes keep a margin between objects and the image border."""
    border = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]])  # (border pixels, 3)
    cast = np.median(border, axis=0) - np.asarray(BACKGROUND_RGB, dtype=np.float32)
    if np.linalg.norm(cast) > max_color_distance:
        return rgb
    return rgb - cast


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """``mask`` with every region it encloses (not 4-connected to the outside) filled in."""
    outside = np.pad(~mask, 1, constant_values=True)
    reached = np.zeros_like(outside)
    reached[0, 0] = True
    queue = deque([(0, 0)])
    height, width = outside.shape
    while queue:
        r, c = queue.popleft()
        for rr, cc in ((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)):
            if 0 <= rr < height and 0 <= cc < width and outside[rr, cc] and not reached[rr, cc]:
                reached[rr, cc] = True
                queue.append((rr, cc))
    return ~reached[1:-1, 1:-1]


def connected_components(mask: np.ndarray) -> list[np.ndarray]:
    """8-connected components of a (H, W) bool mask, each as an (N, 2) array of (row, col)."""
    height, width = mask.shape
    seen = np.zeros_like(mask, dtype=bool)
    components = []
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        seen[start] = True
        queue, pixels = deque([start]), []
        while queue:
            r, c = queue.popleft()
            pixels.append((r, c))
            for dr in (-1, 0, 1):
                for dc in (-1, 0, 1):
                    rr, cc = r + dr, c + dc
                    if 0 <= rr < height and 0 <= cc < width and mask[rr, cc] and not seen[rr, cc]:
                        seen[rr, cc] = True
                        queue.append((rr, cc))
        components.append(np.array(pixels))
    return components


# Blur widths the shape templates are also made with, in pixels of a 32 px image (scaled with the
# resolution): a generator's soft edges round corners and thin arms, and the colour threshold then cuts
# the blurred shape a little inside its drawn box.
TEMPLATE_BLURS: tuple[float, ...] = (0.0, 0.6, 0.9, 1.2)


@lru_cache(maxsize=16384)
def _blurred_template(shape: str, width: int, height: int, blur: float) -> np.ndarray:
    """``shape`` drawn in a ``width`` x ``height`` box, blurred, cut at half intensity, cropped to what
    remains (the mask a softly drawn shape leaves after palette segmentation)."""
    if blur == 0:
        return shape_mask(shape, width, height)
    pad = 3
    canvas = Image.new("L", (width + 2 * pad, height + 2 * pad), 0)
    canvas.paste(Image.fromarray(shape_mask(shape, width, height).astype(np.uint8) * 255), (pad, pad))
    mask = np.asarray(canvas.filter(ImageFilter.GaussianBlur(blur))) >= 128
    if not mask.any():
        return mask[:0, :0]
    rows, cols = np.nonzero(mask)
    return mask[rows.min():rows.max() + 1, cols.min():cols.max() + 1]


def classify_shape(
    mask: np.ndarray, min_shape_iou: float = MIN_SHAPE_IOU, resolution: int = 32,
) -> tuple[Optional[str], float]:
    """(shape, IoU) of the shape whose template overlaps the (h, w) mask best: the shape drawn to fill
    the mask's box, or drawn a few pixels larger, blurred by ``TEMPLATE_BLURS`` (scaled to
    ``resolution``) and cut back to the mask's size. Ties go to the least blur, so a crisp render is
    read as what was drawn."""
    height, width = mask.shape
    scale = resolution / 32
    best, best_iou = None, -1.0
    for blur in TEMPLATE_BLURS:
        blur = round(blur * scale, 3)
        for grow in ((0,) if blur == 0 else range(0, max(4, round(4 * scale)))):
            for shape in SHAPES:
                template = _blurred_template(shape, width + grow, height + grow, blur)
                if template.shape != mask.shape:
                    continue
                iou = np.logical_and(mask, template).sum() / max(1, np.logical_or(mask, template).sum())
                if iou > best_iou + 1e-9:
                    best, best_iou = shape, float(iou)
    return (best if best_iou >= min_shape_iou else None), best_iou


def analyze(
    image,
    max_color_distance: float = MAX_COLOR_DISTANCE,
    min_area_fraction: float = MIN_AREA_FRACTION,
    min_shape_iou: float = MIN_SHAPE_IOU,
    min_fill: float = MIN_FILL,
) -> list[DetectedObject]:
    """The objects in ``image``, ordered top-to-bottom, left-to-right."""
    rgb = remove_color_cast(as_rgb_array(image), max_color_distance)
    height, width = rgb.shape[:2]
    labels = palette_labels(rgb, max_color_distance)
    min_area = max(2, round(min_area_fraction * height * width))
    threshold = size_threshold(min(height, width))
    found = []
    for label, color in enumerate(PALETTE_NAMES):
        for pixels in connected_components(labels == label):
            if len(pixels) < min_area:
                continue
            top, left = pixels.min(0)
            bottom, right = pixels.max(0) + 1
            mask = np.zeros((bottom - top, right - left), dtype=bool)
            mask[pixels[:, 0] - top, pixels[:, 1] - left] = True
            mask = fill_holes(mask)  # pixels noise pushed off the palette inside an object
            if mask.mean() < min_fill:
                continue
            shape, iou = classify_shape(mask, min_shape_iou, min(height, width))
            size = "large" if max(bottom - top, right - left) >= threshold else "small"
            found.append(DetectedObject(color, shape, size, (int(left), int(top), int(right), int(bottom)),
                                        int(mask.sum()), round(iou, 4)))
    return sorted(found, key=lambda o: (o.bbox[1], o.bbox[0]))


# ---------------------------------------------------------------- objects -> score

def max_matching(wanted: list[tuple], detected: list[tuple]) -> int:
    """Size of a maximum one-to-one matching between ``wanted`` attribute tuples (None matches
    anything) and ``detected`` ones (Kuhn's augmenting paths)."""
    fits = [[j for j, d in enumerate(detected) if all(w is None or w == v for w, v in zip(want, d))]
            for want in wanted]
    owner: dict[int, int] = {}

    def augment(i: int, visited: set) -> bool:
        for j in fits[i]:
            if j not in visited:
                visited.add(j)
                if j not in owner or augment(owner[j], visited):
                    owner[j] = i
                    return True
        return False

    return sum(augment(i, set()) for i in range(len(wanted)))


def score_objects(scene: Scene, detected: list[DetectedObject]) -> ImageScore:
    """Scores detected objects against the scene a prompt asks for (see the module docstring)."""
    wanted = [o.attributes() for o in scene.objects]       # (color, shape, size)
    found = [d.attributes() for d in detected]
    n, d = len(wanted), len(found)
    if n == 0:
        raise ValueError("a scene to score against needs at least one object")

    def fraction(keep: tuple[int, ...]) -> float:
        pick = lambda t: tuple(t[k] for k in keep)  # noqa: E731
        return max_matching([pick(w) for w in wanted], [pick(f) for f in found]) / n

    binding = fraction((0, 1, 2))
    return ImageScore(
        n_objects=n, n_detected=d, missing=max(0, n - d), extra=max(0, d - n), count_correct=float(n == d),
        shape=fraction((1,)), color=fraction((0, 1)), size=fraction((1, 2)), binding=binding,
        all_bound=float(binding == 1.0), exact=float(binding == 1.0 and d <= n),
        any_correct=float(max_matching([w[:2] for w in wanted], [f[:2] for f in found]) > 0), detected=list(detected))


def score(image, scene, **analyze_options) -> ImageScore:
    """Scores ``image`` against ``scene``: a ``Scene``, a prompt's text (parsed with ``parse_prompt``),
    or a ``PromptRecord`` (its scene)."""
    if hasattr(scene, "scene") and hasattr(scene, "text"):
        scene = scene.scene
    if isinstance(scene, str):
        scene = parse_prompt(scene)
    return score_objects(scene, analyze(image, **analyze_options))


METRICS: tuple[str, ...] = ("binding", "all_bound", "exact", "color", "shape", "size", "count_correct",
                            "any_correct", "missing", "extra")


def aggregate(scores: Iterable[ImageScore]) -> dict:
    """Means over images of every per-image number, overall and per object count:
    ``{"n_images", "binding", "all_bound", "exact", "color", "shape", "size", "count_correct",
    "any_correct", "missing", "extra", "by_n_objects": {1: {...}, 2: {...}}}`` (missing/extra: mean counts)."""
    scores = list(scores)
    if not scores:
        raise ValueError("aggregate needs at least one ImageScore")

    def means(group: list[ImageScore]) -> dict:
        return {"n_images": len(group), **{m: float(np.mean([getattr(s, m) for s in group])) for m in METRICS}}

    result = means(scores)
    counts = sorted({s.n_objects for s in scores})
    result["by_n_objects"] = {k: means([s for s in scores if s.n_objects == k]) for k in counts}
    return result

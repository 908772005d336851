"""The exact analyzer of the compositional shapes benchmark: pixels in, objects and a binding score out.

Public API (stable; ``evaluation/__init__.py`` re-exports it):

- ``parse_prompt(text) -> Scene``: the objects a prompt asks for, read with the benchmark's caption
  grammar (``shapes/world.py``); attributes the prompt leaves out are None and match anything.
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
  ``categories``: what became of each prompt object (scene order), one of ``OUTCOMES``, from
  ``classify_objects``; ``swapped_pairs`` / ``drawn_pairs``: of the pairs of prompt objects both drawn,
  those that took each other's colour (``count_swaps``).
- ``classify_objects(scene, detected) -> list[ObjectOutcome]`` (``evaluation.shapes``): separates the
  errors ``binding`` lumps together. Each prompt object gets one category and the index of the detection
  it was matched to (None if missing), assigned one-to-one in stages, each a maximum matching over what
  the earlier stages left: ``bound`` (colour, shape and size; stage 1 is ``binding``), ``wrong_size``,
  ``leaked_color`` (its shape in another prompt object's colour: a binding failure), ``foreign_color``
  (its shape in a colour the prompt does not state), ``leaked_shape`` (its colour, another prompt
  object's shape), ``misdrawn_shape`` (its colour, another shape or none readable), ``missing_object``.
  Unstated attributes (None) match anything; the shape noun identifies an object, so a colour swap is
  ``leaked_color`` for both objects (details in its docstring).
- ``aggregate(scores) -> dict``: the T2I-CompBench way, the mean of each per-image number over the
  images (of one prompt set), overall and per object count (``by_n_objects``); with the share of each
  of ``OUTCOMES`` (``bound``, ``wrong_size``, ``leaked_color``, ``foreign_color``, ``leaked_shape``,
  ``misdrawn_shape``, ``missing_object``: means of per-image shares, summing to 1) and ``swap_rate``:
  swapped pairs over drawn pairs, summed over the images (None when no image has two drawn objects).

Images may be PIL images, (H, W, 3) uint8 arrays, (H, W, 3) float arrays in [0, 1], or torch tensors
(3, H, W) in [0, 1]; square images are expected (the size threshold follows the benchmark's 2x2 layout
at the image's resolution). Objects of one colour that touch merge into one component: the benchmark's
scenes give every object its own colour and a margin, a generator's images may not.

Command line (``cli/shapes_benchmark.py``): ``python -m llm4gen.cli.shapes_benchmark prompts DIR`` writes each prompt set
as text, ``python -m llm4gen.cli.shapes_benchmark render DIR`` writes ground truth for every prompt set, ``python -m
evaluation score DIR`` scores the images a ``DIR/prompts.jsonl`` lists (``file``, ``text``, ``set``).

Over 500 lines on purpose: the analyzer is one pipeline (palette, components, shape fit, matching, scores)
whose stages share its thresholds; its tests hold it to ground truth as a whole.
"""

from __future__ import annotations

from collections import deque
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Iterable, Optional

import numpy as np
from PIL import Image, ImageFilter

from llm4gen.shapes.world import (
    BACKGROUND_RGB,
    COLORS,
    SHAPES,
    Scene,
    parse_prompt,
    shape_mask,
    size_threshold,
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
    categories: list[str] = field(default_factory=list)  # per prompt object, scene order: one of OUTCOMES
    swapped_pairs: int = 0               # pairs of drawn prompt objects that took each other's colour
    drawn_pairs: int = 0                 # pairs of prompt objects both drawn (not missing_object)

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

def attributes_fit(wanted: tuple, found: tuple) -> bool:
    """Whether a detection's attributes ``found`` are what ``wanted`` asks for (None matches anything)."""
    return all(w is None or w == v for w, v in zip(wanted, found))


def maximum_assignment(fits: list[list[int]]) -> dict[int, int]:
    """A maximum one-to-one matching of rows to columns, ``{row: column}``, where row ``i`` may take the
    columns ``fits[i]`` (Kuhn's augmenting paths, rows tried in order, each row's columns in the order
    given: the same input always gives the same matching)."""
    owner: dict[int, int] = {}   # column -> row

    def augment(i: int, visited: set) -> bool:
        for j in fits[i]:
            if j not in visited:
                visited.add(j)
                if j not in owner or augment(owner[j], visited):
                    owner[j] = i
                    return True
        return False

    for i in range(len(fits)):
        augment(i, set())
    return {i: j for j, i in owner.items()}


def max_weight_assignment(weights: list[list[int]]) -> dict[int, int]:
    """A one-to-one assignment of rows to columns, ``{row: column}``, of the largest total weight, where
    ``weights[i][j] > 0`` is what row ``i`` taking column ``j`` is worth and 0 means it may not (the
    Hungarian algorithm on integer weights: exact, and the same input always gives the same answer)."""
    n = len(weights)
    if n == 0:
        return {}
    m = len(weights[0])
    # rows x (columns + one "unassigned" column per row), minimising cost = -weight; 1-indexed
    width = m + n
    cost = [[-row[j] if j < m and row[j] > 0 else 0 for j in range(width)] for row in weights]
    u, v, owner, way = [0] * (n + 1), [0] * (width + 1), [0] * (width + 1), [0] * (width + 1)
    for i in range(1, n + 1):
        owner[0], j0 = i, 0
        least = [float("inf")] * (width + 1)
        used = [False] * (width + 1)
        while True:
            used[j0] = True
            i0, delta, j1 = owner[j0], float("inf"), 0
            for j in range(1, width + 1):
                if not used[j]:
                    reduced = cost[i0 - 1][j - 1] - u[i0] - v[j]
                    if reduced < least[j]:
                        least[j], way[j] = reduced, j0
                    if least[j] < delta:
                        delta, j1 = least[j], j
            for j in range(width + 1):
                if used[j]:
                    u[owner[j]] += delta
                    v[j] -= delta
                else:
                    least[j] -= delta
            j0 = j1
            if owner[j0] == 0:
                break
        while j0:
            j1 = way[j0]
            owner[j0] = owner[j1]
            j0 = j1
    return {owner[j] - 1: j - 1 for j in range(1, m + 1) if owner[j] and weights[owner[j] - 1][j - 1] > 0}


def max_matching(wanted: list[tuple], detected: list[tuple]) -> int:
    """Size of a maximum one-to-one matching between ``wanted`` attribute tuples (None matches
    anything) and ``detected`` ones (Kuhn's augmenting paths)."""
    return len(maximum_assignment([[j for j, d in enumerate(detected) if attributes_fit(w, d)] for w in wanted]))


# What became of each prompt object, in the order ``classify_objects`` assigns them (see its docstring).
OUTCOMES: tuple[str, ...] = ("bound", "wrong_size", "leaked_color", "foreign_color", "leaked_shape",
                             "misdrawn_shape", "missing_object")
MISSING_OBJECT = OUTCOMES[-1]


@dataclass(frozen=True)
class ObjectOutcome:
    category: str                        # one of OUTCOMES
    detection: Optional[int]             # index into the detections it was matched to; None: missing_object


def _same(wanted: Optional[str], value: Optional[str]) -> bool:
    return wanted is None or wanted == value


def _outcome_fits(scene: Scene) -> list:
    """One predicate ``fits(i, detection) -> bool`` per stage of ``classify_objects`` (OUTCOMES[:-1])."""
    objects = scene.objects
    others_colors = [{o.color for k, o in enumerate(objects) if k != i and o.color is not None}
                     for i in range(len(objects))]
    others_shapes = [{o.shape for k, o in enumerate(objects) if k != i and o.shape is not None}
                     for i in range(len(objects))]

    def bound(i, d):
        o = objects[i]
        return _same(o.color, d.color) and _same(o.shape, d.shape) and _same(o.size, d.size)

    def wrong_size(i, d):
        o = objects[i]
        return _same(o.color, d.color) and _same(o.shape, d.shape) and not _same(o.size, d.size)

    def wrong_color(i, d):   # its shape, another colour (never for an object whose colour is unstated)
        o = objects[i]
        return o.color is not None and d.color != o.color and _same(o.shape, d.shape)

    def leaked_color(i, d):
        return wrong_color(i, d) and d.color in others_colors[i]

    def foreign_color(i, d):
        return wrong_color(i, d) and d.color not in others_colors[i]

    def wrong_shape(i, d):   # its colour, another or no shape (never for an object whose shape is unstated)
        o = objects[i]
        return o.shape is not None and d.shape != o.shape and _same(o.color, d.color)

    def leaked_shape(i, d):
        return wrong_shape(i, d) and d.shape in others_shapes[i]

    def misdrawn_shape(i, d):
        return wrong_shape(i, d) and d.shape not in others_shapes[i]

    return [bound, wrong_size, leaked_color, foreign_color, leaked_shape, misdrawn_shape]


def classify_objects(scene: Scene, detected: list[DetectedObject]) -> list[ObjectOutcome]:
    """What became of each prompt object of ``scene`` (in the scene's order): one of ``OUTCOMES`` and
    the index in ``detected`` of the detection it was matched to (None for ``missing_object``).

    Detections are assigned one-to-one in stages; each stage is a maximum matching between the prompt
    objects and detections that the earlier stages left (ties: below); a pair fits one stage at most:

    1. ``bound``: the object's colour, shape and size (stage 1's count is ``ImageScore.binding`` x n);
    2. ``wrong_size``: its colour and shape, another size;
    3. ``leaked_color``: its shape (any size), in the colour of another object of the prompt;
    4. ``foreign_color``: its shape (any size), in a colour no other object of the prompt states;
    5. ``leaked_shape``: its colour (any size), the shape of another object of the prompt;
    6. ``misdrawn_shape``: its colour (any size), a shape no other object of the prompt states, or no
       readable shape (``DetectedObject.shape`` None);
    7. ``missing_object``: nothing above is left for it (a detection in another colour and another
       shape is no evidence of the object: it stays unmatched; ``missing`` / ``extra`` only compare
       how many objects were asked for and found).

    Attributes the prompt leaves out (None) match anything in every stage. An object whose colour is
    None therefore cannot be ``leaked_color`` / ``foreign_color`` (its colour is never wrong; a shape
    match is ``bound`` or ``wrong_size``), nor one whose shape is None ``leaked_shape`` /
    ``misdrawn_shape``; only stated colours / shapes of other objects count as leak sources (a colour
    nobody states is foreign). "Another" colour / shape means other than the object's own: with two
    prompt objects of one colour, that colour on one of them is never a leak.

    Convention: the shape noun identifies the object, so the shape stages (its shape, wrong colour) run
    before the colour stages (its colour, wrong shape). A colour swap ("a red circle and a blue square"
    drawn as a blue circle and a red square) gives both objects ``leaked_color``, the same image read as
    a shape swap too; ``count_swaps`` counts the pair.

    Ties: a stage often has several maximum matchings, and which one it takes decides what later stages
    have left ("a red circle, a blue square and a green cross" drawn as a red circle, a blue cross and a
    red cross: stage 3 may give the green cross the blue cross or the red cross; only the red cross
    leaves the blue cross to the square as ``leaked_shape``). Of all staged assignments the one taken
    has the most objects per stage in stage order (lexicographically: the most ``bound``, then of those
    the most ``wrong_size``, ...; a maximum-weight assignment with weight (n + 1)^(6 - stage) for a
    pair of stage 1..6, ``max_weight_assignment``), so the counts do not depend on where the objects
    sit in the image (the order of ``detected``); which object takes which detection among equally
    good assignments is fixed by the order of the inputs (the same inputs give the same outcomes).
    """
    objects = scene.objects
    fits = _outcome_fits(scene)
    base = len(objects) + 1          # a stage's count is at most len(objects) < base

    def stage_of(i: int, d: DetectedObject) -> Optional[int]:   # the stages exclude each other
        return next((k for k, fit in enumerate(fits) if fit(i, d)), None)

    stages = [[stage_of(i, d) for d in detected] for i in range(len(objects))]
    weights = [[0 if k is None else base ** (len(fits) - 1 - k) for k in row] for row in stages]
    assignment = max_weight_assignment(weights)
    return [ObjectOutcome(OUTCOMES[stages[i][assignment[i]]], assignment[i]) if i in assignment
            else ObjectOutcome(MISSING_OBJECT, None) for i in range(len(objects))]


def count_swaps(scene: Scene, detected: list[DetectedObject], outcomes: list[ObjectOutcome]) -> tuple[int, int]:
    """(swapped pairs, drawn pairs) over the pairs of prompt objects both drawn (not ``missing_object``):
    a pair (i, j) is swapped when i's detection has j's colour and j's detection has i's colour (both
    colours stated and different; such a pair is ``leaked_color`` twice)."""
    drawn = [i for i, o in enumerate(outcomes) if o.detection is not None]
    swapped = 0
    for a, i in enumerate(drawn):
        for j in drawn[a + 1:]:
            ci, cj = scene.objects[i].color, scene.objects[j].color
            if (ci is not None and cj is not None and ci != cj
                    and detected[outcomes[i].detection].color == cj and detected[outcomes[j].detection].color == ci):
                swapped += 1
    return swapped, len(drawn) * (len(drawn) - 1) // 2


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
    outcomes = classify_objects(scene, list(detected))
    swapped, drawn_pairs = count_swaps(scene, list(detected), outcomes)
    return ImageScore(
        n_objects=n, n_detected=d, missing=max(0, n - d), extra=max(0, d - n), count_correct=float(n == d),
        shape=fraction((1,)), color=fraction((0, 1)), size=fraction((1, 2)), binding=binding,
        all_bound=float(binding == 1.0), exact=float(binding == 1.0 and d <= n),
        any_correct=float(max_matching([w[:2] for w in wanted], [f[:2] for f in found]) > 0), detected=list(detected),
        categories=[o.category for o in outcomes], swapped_pairs=swapped, drawn_pairs=drawn_pairs)


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
    "any_correct", "missing", "extra", <OUTCOMES>, "swap_rate", "by_n_objects": {1: {...}, 2: {...}}}``
    (missing/extra: mean counts). Each of ``OUTCOMES`` (``bound`` .. ``missing_object``) is the mean over
    images of the share of the image's prompt objects in that category (averaged like ``binding``; the
    shares sum to 1), over the images that carry ``categories`` (None where none does); ``swap_rate`` is
    the sum of ``swapped_pairs`` over the sum of ``drawn_pairs`` (a ratio of sums, not a mean of ratios;
    None where no image has two drawn objects)."""
    scores = list(scores)
    if not scores:
        raise ValueError("aggregate needs at least one ImageScore")
    for s in scores:
        if s.categories and len(s.categories) != s.n_objects:
            raise ValueError(f"an ImageScore with {s.n_objects} prompt objects has {len(s.categories)} categories")

    def means(group: list[ImageScore]) -> dict:
        result = {"n_images": len(group), **{m: float(np.mean([getattr(s, m) for s in group])) for m in METRICS}}
        classified = [s for s in group if s.categories]
        for category in OUTCOMES:
            result[category] = (float(np.mean([s.categories.count(category) / len(s.categories) for s in classified]))
                                if classified else None)
        drawn = sum(s.drawn_pairs for s in group)
        result["swap_rate"] = sum(s.swapped_pairs for s in group) / drawn if drawn else None
        return result

    result = means(scores)
    counts = sorted({s.n_objects for s in scores})
    result["by_n_objects"] = {k: means([s for s in scores if s.n_objects == k]) for k in counts}
    return result

"""The shapes world: scenes of 1-3 coloured, sized shapes, their captions, and the held-out split.

This is the data half of the compositional shapes benchmark (the analyzer and the fixed evaluation
prompt sets live in ``evaluation/``). One module holds every fact about the world so training data,
prompt sets, rendering, caption parsing and the analyzer cannot drift apart.

- An object has three attributes: ``color`` (one of 8 in ``COLORS``), ``shape`` (circle, square,
  triangle, cross) and ``size`` (small, large); and a position: one cell of a 2x2 grid
  (``CELL_NAMES``), a side length ``scale`` and an ``offset`` inside the cell. Geometry is stored in
  fractions, so one scene renders at any resolution (``object_bbox``).
- A scene holds 1-3 objects in distinct cells and of distinct colours on a plain gray background
  (not an object colour). Objects never touch; a margin separates each from its cell's border.
- ``HELD_OUT`` colour-shape combinations never appear in training data (``sample_scene(split="train")``);
  every colour and every shape still appears in training with other partners.
- Captions come in recorded phrasings (``PHRASINGS``): ``list`` "a small red circle and a large blue
  square", ``colored`` "a small circle colored red ...", ``relative`` "a circle that is small and red
  next to ...", ``beside`` (order reversed, 2+ objects) and ``dense`` (a long description with positions).
- ``parse_prompt`` reads this caption grammar back into a scene (attributes a prompt leaves out are
  ``None``: not constrained), so a prompt's text alone is enough to score an image.
"""

from __future__ import annotations

import random
import re
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np
from PIL import Image, ImageDraw

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (240, 220, 40),
    "purple": (140, 50, 170),
    "orange": (245, 140, 20),
    "black": (15, 15, 15),
    "white": (245, 245, 245),
}
BACKGROUND = "gray"
BACKGROUND_RGB: tuple[int, int, int] = (128, 128, 128)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
SIZES: tuple[str, ...] = ("small", "large")
# The side of an object as a fraction of its cell's free space (cell minus margins), per size. The gap
# between the ranges is what lets the analyzer read size from pixels; its threshold is the midpoint.
SIZE_SCALES: dict[str, tuple[float, float]] = {"small": (0.40, 0.55), "large": (0.85, 1.0)}
SIZE_THRESHOLD = 0.70
CELL_NAMES: tuple[str, ...] = ("top left", "top right", "bottom left", "bottom right")
MAX_OBJECTS = 3

# One held-out shape per colour, each shape held out for two colours: colour i with shape i mod 4.
HELD_OUT: frozenset[tuple[str, str]] = frozenset(
    (color, SHAPES[i % len(SHAPES)]) for i, color in enumerate(COLORS))
SEEN: tuple[tuple[str, str], ...] = tuple(
    (color, shape) for color in COLORS for shape in SHAPES if (color, shape) not in HELD_OUT)
SPLITS: tuple[str, ...] = ("train", "seen", "heldout")


@dataclass(frozen=True)
class ShapeObject:
    """One object. ``color``/``shape``/``size`` None: a prompt that does not say (matches anything).
    ``cell``/``scale``/``offset`` None: not placed (a parsed prompt); rendering needs them."""

    color: Optional[str]
    shape: Optional[str]
    size: Optional[str]
    cell: Optional[int] = None              # 0..3, row-major in the 2x2 grid (CELL_NAMES)
    scale: Optional[float] = None           # side / free space of the cell, within SIZE_SCALES[size]
    offset: Optional[tuple[float, float]] = None  # (x, y) in [0, 1]: where the box sits in the leftover space

    def attributes(self) -> tuple:
        return (self.color, self.shape, self.size)


@dataclass(frozen=True)
class Scene:
    objects: tuple[ShapeObject, ...]
    background: str = BACKGROUND

    def to_dict(self) -> dict:
        return {"background": self.background, "objects": [asdict(o) for o in self.objects]}

    @classmethod
    def from_dict(cls, data: dict) -> "Scene":
        keys = ("color", "shape", "size", "cell", "scale", "offset")
        objects = []
        for o in data["objects"]:
            values = {k: o.get(k) for k in keys}
            if values["offset"] is not None:
                values["offset"] = tuple(values["offset"])
            objects.append(ShapeObject(**values))
        return cls(tuple(objects), data.get("background", BACKGROUND))


# ---------------------------------------------------------------- geometry and rendering

def cell_geometry(resolution: int) -> tuple[int, int]:
    """(cell side, margin) in pixels of a square image of side ``resolution``."""
    cell = resolution // 2
    return cell, max(1, cell // 16)


def free_space(resolution: int) -> int:
    """The largest side an object can have: the cell minus a margin on both sides."""
    cell, margin = cell_geometry(resolution)
    return cell - 2 * margin


def size_threshold(resolution: int) -> float:
    """Sides (pixels) at or above this are ``large``; the midpoint between the two size ranges."""
    return SIZE_THRESHOLD * free_space(resolution)


def object_bbox(obj: ShapeObject, resolution: int) -> tuple[int, int, int, int]:
    """Pixel box (left, top, right, bottom), right/bottom exclusive, of a placed object."""
    if obj.cell is None or obj.scale is None or obj.offset is None:
        raise ValueError(f"object {obj} has no position (cell, scale, offset); only sampled scenes render")
    cell, margin = cell_geometry(resolution)
    free = free_space(resolution)
    side = max(2, min(free, round(obj.scale * free)))
    row, col = divmod(obj.cell, 2)
    left = col * cell + margin + round(obj.offset[0] * (free - side))
    top = row * cell + margin + round(obj.offset[1] * (free - side))
    return left, top, left + side, top + side


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill) -> None:
    """Draws ``shape`` filling ``box`` (right/bottom exclusive). Integer boxes draw the same pixels
    wherever they sit, which the analyzer's templates rely on."""
    left, top, right, bottom = box
    width, height = right - left, bottom - top
    if shape == "circle":
        draw.ellipse((left, top, right - 1, bottom - 1), fill=fill)
    elif shape == "square":
        draw.rectangle((left, top, right - 1, bottom - 1), fill=fill)
    elif shape == "triangle":
        draw.polygon([((left + right - 1) / 2, top), (left, bottom - 1), (right - 1, bottom - 1)], fill=fill)
    elif shape == "cross":
        arm_w, arm_h = max(1, round(width / 3)), max(1, round(height / 3))
        x0, y0 = left + (width - arm_w) // 2, top + (height - arm_h) // 2
        draw.rectangle((x0, top, x0 + arm_w - 1, bottom - 1), fill=fill)
        draw.rectangle((left, y0, right - 1, y0 + arm_h - 1), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def shape_mask(shape: str, width: int, height: int) -> np.ndarray:
    """(height, width) bool: ``shape`` drawn to fill a box of that size."""
    image = Image.new("L", (width, height), 0)
    draw_shape(ImageDraw.Draw(image), shape, (0, 0, width, height), 255)
    return np.asarray(image) > 0


def render_scene(scene: Scene, resolution: int) -> Image.Image:
    """The scene as an RGB image of ``resolution`` x ``resolution``."""
    image = Image.new("RGB", (resolution, resolution), BACKGROUND_RGB)
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        draw_shape(draw, obj.shape, object_bbox(obj, resolution), COLORS[obj.color])
    return image


# ---------------------------------------------------------------- sampling

def is_held_out(color: str, shape: str) -> bool:
    return (color, shape) in HELD_OUT


def sample_scene(rng: random.Random, split: str = "train", n_objects: Optional[int] = None) -> Scene:
    """A random scene. ``train`` / ``seen``: only combinations outside ``HELD_OUT``. ``heldout``: at
    least one object is a held-out combination (the others are drawn from all combinations), listed
    at a random place. Colours are distinct within a scene; shapes and sizes may repeat."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    n = rng.randint(1, MAX_OBJECTS) if n_objects is None else n_objects
    if not 1 <= n <= MAX_OBJECTS:
        raise ValueError(f"n_objects must be 1..{MAX_OBJECTS}, got {n_objects}")
    pairs: list[tuple[str, str]] = []
    if split == "heldout":
        pairs.append(rng.choice(sorted(HELD_OUT)))
        pool = [(c, s) for c in COLORS for s in SHAPES]
    else:
        pool = list(SEEN)
    while len(pairs) < n:
        used = {c for c, _ in pairs}
        pairs.append(rng.choice([p for p in pool if p[0] not in used]))
    rng.shuffle(pairs)
    cells = rng.sample(range(4), n)
    objects = []
    for (color, shape), cell in zip(pairs, cells):
        size = rng.choice(SIZES)
        low, high = SIZE_SCALES[size]
        objects.append(ShapeObject(color, shape, size, cell, round(rng.uniform(low, high), 4),
                                   (round(rng.random(), 4), round(rng.random(), 4))))
    return Scene(tuple(objects))


# ---------------------------------------------------------------- captions

NUMBER_WORDS = {1: "one", 2: "two", 3: "three"}


def _adjectival(o: ShapeObject) -> str:
    return f"a {o.size} {o.color} {o.shape}"


def _colored(o: ShapeObject) -> str:
    return f"a {o.size} {o.shape} colored {o.color}"


def _relative(o: ShapeObject) -> str:
    return f"a {o.shape} that is {o.size} and {o.color}"


def _join(phrases: list[str]) -> str:
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _dense(scene: Scene) -> str:
    n = len(scene.objects)
    noun = "shape" if n == 1 else "shapes"
    sentences = [f"A picture with {NUMBER_WORDS[n]} {noun} on a plain {scene.background} background."]
    for o in scene.objects:
        where = CELL_NAMES[o.cell] if o.cell is not None else "picture"
        sentences.append(f"In the {where} there is a {o.size} {o.shape}, colored {o.color}.")
    sentences.append("Nothing else is in the picture." if n == 1 else "The shapes do not touch each other.")
    return " ".join(sentences)


# name -> (fewest objects it reads naturally with, caption function)
PHRASINGS: dict[str, tuple[int, object]] = {
    "list": (1, lambda s: _join([_adjectival(o) for o in s.objects])),
    "colored": (1, lambda s: _join([_colored(o) for o in s.objects])),
    "relative": (1, lambda s: _relative(s.objects[0]) + (
        " next to " + _join([_adjectival(o) for o in s.objects[1:]]) if len(s.objects) > 1 else "")),
    "beside": (2, lambda s: _adjectival(s.objects[-1]) + " beside "
               + _join([_adjectival(o) for o in reversed(s.objects[:-1])])),
    "dense": (1, _dense),
}


def phrasings_for(n_objects: int) -> list[str]:
    return [name for name, (fewest, _) in PHRASINGS.items() if n_objects >= fewest]


def caption(scene: Scene, phrasing: str = "list") -> str:
    """The scene described in ``phrasing`` (one of ``PHRASINGS``); every attribute is stated."""
    if phrasing not in PHRASINGS:
        raise ValueError(f"unknown phrasing {phrasing!r}; expected one of {list(PHRASINGS)}")
    fewest, describe = PHRASINGS[phrasing]
    if len(scene.objects) < fewest:
        raise ValueError(f"phrasing {phrasing!r} needs at least {fewest} objects, the scene has {len(scene.objects)}")
    if any(None in o.attributes() for o in scene.objects):
        raise ValueError(f"every object needs colour, shape and size to be captioned: {scene.objects}")
    return describe(scene)


# ---------------------------------------------------------------- parsing the caption grammar

SIZE_WORDS = {"small": "small", "large": "large", "big": "large", "little": "small"}
COLOR_WORDS = {**{c: c for c in COLORS}, "violet": "purple"}
SHAPE_WORDS = {**{s: s for s in SHAPES}, "plus": "cross"}
DETERMINERS = {"a", "an", "the", "another"}
# words after an object that make the following attributes its own ("a circle that is red",
# "a square, colored blue")
POSTNOMINAL_MARKERS = {"that", "which", "is", "colored", "coloured", ","}
_BACKGROUND = re.compile(r"\bon an? (?:plain )?(\w+) background\b")
_TOKEN = re.compile(r"[a-z]+|[,.;]")


def parse_prompt(text: str) -> Scene:
    """The scene a prompt asks for, read with the benchmark's caption grammar (every ``PHRASINGS``
    form, and plain ones like "a red circle and a blue square on a yellow background").

    Attributes before a shape word belong to it ("a small red circle"); after it, attributes belong
    to it once a marker says so ("a circle that is small and red", "a square, colored blue") until a
    determiner, a sentence end or an attribute it already has ("a red circle and blue square").
    Attributes left out are None. Raises ValueError on a prompt with no shape, a plural shape, or an
    attribute with no shape to belong to.
    """
    lowered = text.lower()
    background_match = _BACKGROUND.search(lowered)
    background = background_match.group(1) if background_match else BACKGROUND
    lowered = _BACKGROUND.sub(" ", lowered)

    objects: list[dict] = []
    pending: dict[str, str] = {}
    last: Optional[dict] = None   # the object attributes after a marker may attach to
    attaching = False

    def slot_of(word: str) -> Optional[tuple[str, str]]:
        if word in COLOR_WORDS:
            return "color", COLOR_WORDS[word]
        if word in SIZE_WORDS:
            return "size", SIZE_WORDS[word]
        return None

    for word in _TOKEN.findall(lowered):
        attribute = slot_of(word)
        if word in SHAPE_WORDS:
            last = {"color": None, "size": None, **pending, "shape": SHAPE_WORDS[word]}
            objects.append(last)
            pending, attaching = {}, False
        elif word.rstrip("s") in SHAPE_WORDS or word.endswith("es") and word[:-2] in SHAPE_WORDS:
            raise ValueError(f"plural shape {word!r} in prompt {text!r}: the benchmark describes each object "
                             f"on its own ('a red circle and a blue circle')")
        elif attribute is not None:
            slot, value = attribute
            if attaching and last is not None and last[slot] is None and not pending:
                last[slot] = value
            else:
                if slot in pending:
                    raise ValueError(f"two {slot}s ({pending[slot]!r}, {value!r}) for one object in prompt {text!r}")
                pending[slot] = value
                attaching = False
        elif word in DETERMINERS or word in {".", ";"}:
            attaching = False
            if word in {".", ";"}:
                last = None
        elif word in POSTNOMINAL_MARKERS and last is not None:
            attaching = True
    if pending:
        raise ValueError(f"attribute(s) {sorted(pending.values())} in prompt {text!r} belong to no shape; "
                         f"shapes are {list(SHAPES)}")
    if not objects:
        raise ValueError(f"no shape in prompt {text!r}; the benchmark's shapes are {list(SHAPES)}")
    return Scene(tuple(ShapeObject(o["color"], o["shape"], o["size"]) for o in objects), background)


# ---------------------------------------------------------------- training samples

def random_scene(rng: random.Random, resolution: int) -> dict:
    """A training sample's description (JSON-ready): a ``train``-split scene, a caption in a random
    phrasing, and each object's pixel box at ``resolution``."""
    scene = sample_scene(rng, "train")
    phrasing = rng.choice(phrasings_for(len(scene.objects)))
    record = scene.to_dict()
    for obj, data in zip(scene.objects, record["objects"]):
        data["bbox"] = list(object_bbox(obj, resolution))
    record.update(caption=caption(scene, phrasing), phrasing=phrasing, split="train")
    return record


__all__ = [
    "BACKGROUND", "BACKGROUND_RGB", "CELL_NAMES", "COLORS", "HELD_OUT", "PHRASINGS", "SEEN", "SHAPES",
    "SIZES", "SIZE_SCALES", "Scene", "ShapeObject", "caption", "draw_shape", "free_space", "is_held_out",
    "object_bbox", "parse_prompt", "phrasings_for", "random_scene", "render_scene", "sample_scene",
    "shape_mask", "size_threshold",
]

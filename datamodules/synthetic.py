"""Synthetic WebDataset shards: coloured shapes with attribute-entity captions.

Tests, smoke runs and CI need data without downloads. Each image holds 1-3 shapes whose colour is
stated in the caption ("a red circle and a blue square on a yellow background"), so the entity loss
has real (attribute, entity) pairs and a trained model has something checkable to learn.
The same seed writes the same samples (and, with a fixed tar mtime, the same bytes).
"""

from __future__ import annotations

import glob
import io
import json
import os
import random
import shutil
import braceexpand
import webdataset as wds
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
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
SHARD_PATTERN = "shard-%06d.tar"


def describe(objects: list[dict], background: str) -> str:
    """'a red circle and a blue square on a yellow background' (Oxford-less comma list for 3)."""
    phrases = [f"a {o['color']} {o['shape']}" for o in objects]
    if len(phrases) == 1:
        listed = phrases[0]
    else:
        listed = ", ".join(phrases[:-1]) + " and " + phrases[-1]
    return f"{listed} on a {background} background"


def random_scene(rng: random.Random, resolution: int) -> dict:
    """A scene description: background colour and 1-3 shapes with colour, shape and bounding box."""
    background = rng.choice(list(COLORS))
    # distinct (colour, shape) pairs: "a red circle and a red circle" would give the entity loss
    # two entities it cannot tell apart
    pairs = [(color, shape) for color in COLORS if color != background for shape in SHAPES]
    objects = []
    for color, shape in rng.sample(pairs, rng.randint(1, 3)):
        size = rng.randint(max(4, resolution // 4), max(5, resolution // 2))
        left, top = rng.randint(0, resolution - size), rng.randint(0, resolution - size)
        objects.append({"color": color, "shape": shape, "bbox": [left, top, left + size, top + size]})
    return {"background": background, "objects": objects, "caption": describe(objects, background)}


def render_scene(scene: dict, resolution: int) -> Image.Image:
    """Draw the scene (shapes in list order, later ones on top) as an RGB image."""
    image = Image.new("RGB", (resolution, resolution), COLORS[scene["background"]])
    draw = ImageDraw.Draw(image)
    for obj in scene["objects"]:
        left, top, right, bottom = obj["bbox"]
        fill = COLORS[obj["color"]]
        if obj["shape"] == "circle":
            draw.ellipse((left, top, right - 1, bottom - 1), fill=fill)
        elif obj["shape"] == "square":
            draw.rectangle((left, top, right - 1, bottom - 1), fill=fill)
        else:
            draw.polygon([((left + right) // 2, top), (left, bottom - 1), (right - 1, bottom - 1)], fill=fill)
    return image


def encode_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def synthetic_sample(index: int, resolution: int, seed: int) -> dict:
    """The WebDataset sample dict (members png / txt / json) of sample ``index``; same for the same seed."""
    scene = random_scene(random.Random(f"synthetic/{seed}/{index}"), resolution)
    return {
        "__key__": f"sample-{index:06d}",
        "png": encode_png(render_scene(scene, resolution)),
        "txt": scene["caption"],
        "json": json.dumps(scene, sort_keys=True).encode("utf-8"),
    }


def write_synthetic_shards(
    directory: str,
    num_samples: int = 512,
    samples_per_shard: int = 128,
    resolution: int = 32,
    seed: int = 0,
) -> list[str]:
    """Write ``num_samples`` samples into ``directory/shard-000000.tar`` ...; returns the shard paths."""
    if num_samples <= 0 or samples_per_shard <= 0:
        raise ValueError(f"num_samples ({num_samples}) and samples_per_shard ({samples_per_shard}) must be positive")
    if resolution < 8:
        raise ValueError(f"resolution must be at least 8 pixels to draw shapes, got {resolution}")
    os.makedirs(directory, exist_ok=True)
    pattern = os.path.join(directory, SHARD_PATTERN)
    with wds.ShardWriter(pattern, maxcount=samples_per_shard, verbose=0, mtime=0.0) as writer:
        for index in range(num_samples):
            writer.write(synthetic_sample(index, resolution, seed))
    num_shards = -(-num_samples // samples_per_shard)
    return [pattern % i for i in range(num_shards)]


def ensure_synthetic_shards(
    pattern_or_dir: str,
    num_samples: int = 512,
    samples_per_shard: int = 128,
    resolution: int = 32,
    seed: int = 0,
) -> list[str]:
    """The synthetic shards at ``pattern_or_dir`` (a directory or a brace pattern), written if absent.

    A directory that already holds ``*.tar`` files is trusted as is (delete it to regenerate with
    other settings). A brace pattern must name files in one directory with the ``shard-NNNNNN.tar``
    names this module writes.
    """
    if "{" in pattern_or_dir:
        wanted = list(braceexpand.braceexpand(pattern_or_dir))
        directories = {os.path.dirname(path) or "." for path in wanted}
        if len(directories) != 1:
            raise ValueError(f"pattern {pattern_or_dir!r} spans several directories {sorted(directories)}; use one")
        if all(os.path.exists(path) for path in wanted):
            return wanted
        written = write_synthetic_shards(directories.pop(), num_samples, samples_per_shard, resolution, seed)
        missing = [path for path in wanted if not os.path.exists(path)]
        if missing:
            raise ValueError(
                f"pattern {pattern_or_dir!r} names {len(wanted)} shards but the settings wrote {len(written)} "
                f"({os.path.basename(written[0])} ...); missing e.g. {missing[0]}. "
                f"Match num_samples / samples_per_shard to the pattern."
            )
        return wanted
    existing = sorted(glob.glob(os.path.join(pattern_or_dir, "*.tar")))
    if existing:
        return existing
    # Write beside, then move in: an interrupted write never leaves a directory that looks complete.
    partial = os.path.join(pattern_or_dir, f".partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    written = write_synthetic_shards(partial, num_samples, samples_per_shard, resolution, seed)
    final = [os.path.join(pattern_or_dir, os.path.basename(path)) for path in written]
    for source, target in zip(written, final):
        os.replace(source, target)
    os.rmdir(partial)
    return final


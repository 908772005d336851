"""Synthetic WebDataset shards: the shapes benchmark's training scenes with attribute-entity captions.

Tests, smoke runs and CI need data without downloads. Each image holds 1-3 shapes of the shapes world
(``shapes/world.py``: colour, shape, size, position), captioned in one of its recorded phrasings
("a small red circle and a large blue square", "a circle that is small and red next to ...", a dense
long form), so the entity loss has real (attribute, entity) pairs and a trained model has something the
exact analyzer (``evaluation/shapes.py``) can check. Training samples never contain a held-out
colour-shape combination (``shapes.HELD_OUT``). The ``json`` member records the scene, the phrasing and
each object's pixel box. The same seed writes the same samples (and, with a fixed tar mtime, the same
bytes).

``verbose_share`` (default 0: the short phrasings only, the same samples as before it existed) makes
that share of the captions ``verbose``: long LLaVA-style descriptions that run past CLIP's 77 tokens.
Their ``json`` also records ``mentions``: each object in text order with its entity spans and
``last_clip_token`` (its last token's index under the embedded CLIP tokenizer, untruncated) and
``in_clip_window``. The share is recorded in the folder's ``synthetic.json``; a folder written with
another share is refused.

``sizes`` (a list of (width, height)) gives images of several shapes for aspect-ratio bucketing: sample
``i`` is ``sizes[i % len(sizes)]``, its scene drawn on a square of the shorter side, centred on a plain
background of the full size (its boxes in ``json`` shifted to match).
"""

from __future__ import annotations

import functools
import glob
import io
import json
import os
import random
import shutil
from typing import Optional, Sequence

import braceexpand
import webdataset as wds
from PIL import Image

from llm4gen.configs.errors import ConfigError
from llm4gen.embedded.registry import CLIP_TOKENIZER_DIR
from llm4gen.losses.entity_parser import Word
from llm4gen.losses.token_alignment import word_token_positions
from llm4gen.shapes.world import (  # noqa: F401 (COLORS, SHAPES re-exported)
    BACKGROUND_RGB,
    CLIP_LAST_CONTENT_POSITION,
    COLORS,
    SHAPES,
    SHAPES_WORLD_VERSION,
    Scene,
    object_mentions,
    random_scene,
    render_scene,
)

SHARD_PATTERN = "shard-%06d.tar"
MARKER = "synthetic.json"  # written beside the shards: the shapes-world version and settings


def encode_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@functools.lru_cache(maxsize=1)
def clip_tokenizer():
    """The embedded CLIP tokenizer (``embedded/clip_tokenizer``), loaded once, on first use: what
    ``last_clip_token`` of a verbose caption's mentions is measured with."""
    from transformers import CLIPTokenizer


    return CLIPTokenizer.from_pretrained(str(CLIP_TOKENIZER_DIR))


def synthetic_sample(index: int, resolution: int, seed: int, size: Optional[Sequence[int]] = None,
                     verbose_share: float = 0.0) -> dict:
    """The WebDataset sample dict (members png / txt / json) of sample ``index``; same for the same seed.
    ``size`` (width, height): the scene drawn at the shorter side, centred on a background of that size.
    ``verbose_share``: the probability of a verbose caption (see ``random_scene``); 0 gives the samples
    of before verbose captions existed, byte for byte."""
    rng = random.Random(f"synthetic/{seed}/{index}")
    if size is None:
        scene = random_scene(rng, resolution, verbose_share)
        image = render_scene(Scene.from_dict(scene), resolution)
    else:
        width, height = int(size[0]), int(size[1])
        side = min(width, height)
        scene = random_scene(rng, side, verbose_share)
        left, top = (width - side) // 2, (height - side) // 2
        image = Image.new("RGB", (width, height), BACKGROUND_RGB)
        image.paste(render_scene(Scene.from_dict(scene), side), (left, top))
        for obj in scene["objects"]:
            x0, y0, x1, y1 = obj["bbox"]
            obj["bbox"] = [x0 + left, y0 + top, x1 + left, y1 + top]
        scene["image_size"] = [width, height]
    if "mentions" in scene:  # a verbose caption: where its objects fall in CLIP's window
        scene["mentions"] = mentions_in_clip_window(scene["caption"], clip_tokenizer())
    return {
        "__key__": f"sample-{index:06d}",
        "png": encode_png(image),
        "txt": scene["caption"],
        "json": json.dumps(scene, sort_keys=True).encode("utf-8"),
    }


def write_synthetic_shards(
    directory: str,
    num_samples: int = 512,
    samples_per_shard: int = 128,
    resolution: int = 32,
    seed: int = 0,
    sizes: Optional[Sequence[Sequence[int]]] = None,
    verbose_share: float = 0.0,
) -> list[str]:
    """Write ``num_samples`` samples into ``directory/shard-000000.tar`` ...; returns the shard paths.
    ``sizes``: (width, height) of the images, taken in turn (default: ``resolution`` squares).
    ``verbose_share``: the share of verbose captions (default 0: short phrasings only)."""
    if not 0.0 <= verbose_share <= 1.0:
        raise ValueError(f"verbose_share must be in [0, 1], got {verbose_share}")
    if num_samples <= 0 or samples_per_shard <= 0:
        raise ValueError(f"num_samples ({num_samples}) and samples_per_shard ({samples_per_shard}) must be positive")
    if resolution < 8 or (sizes and min(min(s) for s in sizes) < 8):
        raise ValueError(f"images must be at least 8 pixels a side to draw shapes, got resolution {resolution}, "
                         f"sizes {sizes}")
    os.makedirs(directory, exist_ok=True)
    pattern = os.path.join(directory, SHARD_PATTERN)
    with wds.ShardWriter(pattern, maxcount=samples_per_shard, verbose=0, mtime=0.0) as writer:
        for index in range(num_samples):
            writer.write(synthetic_sample(index, resolution, seed, sizes[index % len(sizes)] if sizes else None,
                                          verbose_share))
    num_shards = -(-num_samples // samples_per_shard)
    return [pattern % i for i in range(num_shards)]


def synthetic_shards_plan(pattern_or_dir: str, num_samples: int = 512, samples_per_shard: int = 128,
                          verbose_share: float = 0.0) -> tuple[list[str], bool]:
    """(the shard paths :func:`ensure_synthetic_shards` returns for these settings, whether it must write them),
    read from the file system without writing anything; ConfigError when it would refuse the folder or pattern
    (the preflight asks this before any model loads)."""
    num_shards = -(-num_samples // samples_per_shard)
    if pattern_or_dir.startswith("pipe:") or "://" in pattern_or_dir or os.path.isfile(pattern_or_dir):
        return [pattern_or_dir], False  # remote shards, a manifest or one tar: read as they are, never written here
    if "{" in pattern_or_dir:
        wanted = list(braceexpand.braceexpand(pattern_or_dir))
        directories = {os.path.dirname(path) or "." for path in wanted}
        if len(directories) != 1:
            raise ConfigError(f"pattern {pattern_or_dir!r} spans several directories {sorted(directories)}; use one")
        if all(os.path.exists(path) for path in wanted):
            return wanted, False
        directory = directories.pop()
        written = [os.path.join(directory, SHARD_PATTERN % i) for i in range(num_shards)]
        planned = {os.path.normpath(path) for path in written}
        missing = [path for path in wanted if not os.path.exists(path) and os.path.normpath(path) not in planned]
        if missing:
            raise ConfigError(
                f"pattern {pattern_or_dir!r} names {len(wanted)} shards but the settings write {len(written)} "
                f"({os.path.basename(written[0])} ...); missing e.g. {missing[0]}. "
                f"Match num_samples / samples_per_shard to the pattern.")
        return wanted, True
    existing = sorted(glob.glob(os.path.join(pattern_or_dir, "*.tar")))
    marker = os.path.join(pattern_or_dir, MARKER)
    if existing and os.path.exists(marker):
        with open(marker) as handle:
            recorded = json.load(handle)
        version = recorded.get("shapes_world")
        if version != SHAPES_WORLD_VERSION:
            raise ConfigError(
                f"{pattern_or_dir} holds synthetic shards of shapes world version {version}, this code writes "
                f"version {SHAPES_WORLD_VERSION} (other scenes, captions or held-out split); delete the folder "
                f"to regenerate it")
        share = float(recorded.get("verbose_share", 0.0))
        if share != float(verbose_share):
            raise ConfigError(
                f"{pattern_or_dir} holds synthetic shards written with verbose_share={share}, asked for "
                f"verbose_share={float(verbose_share)} (another share of verbose captions); delete the folder "
                f"to regenerate it")
    if existing:
        return existing, False
    return [os.path.join(pattern_or_dir, SHARD_PATTERN % i) for i in range(num_shards)], True


def ensure_synthetic_shards(
    pattern_or_dir: str,
    num_samples: int = 512,
    samples_per_shard: int = 128,
    resolution: int = 32,
    seed: int = 0,
    verbose_share: float = 0.0,
) -> list[str]:
    """The synthetic shards at ``pattern_or_dir`` (a directory or a brace pattern), written if absent.

    A directory that already holds ``*.tar`` files is trusted as is (delete it to regenerate with
    other settings), unless its ``synthetic.json`` says another version of the shapes world wrote it,
    or another ``verbose_share`` (a marker without one: 0): that is refused (it may hold held-out
    combinations or other captions). A brace pattern must name files in one directory with the
    ``shard-NNNNNN.tar`` names this module writes (:func:`synthetic_shards_plan`).
    """
    if not 0.0 <= verbose_share <= 1.0:
        raise ValueError(f"verbose_share must be in [0, 1], got {verbose_share}")
    shards, to_write = synthetic_shards_plan(pattern_or_dir, num_samples, samples_per_shard, verbose_share)
    if not to_write:
        return shards
    if "{" in pattern_or_dir:
        write_synthetic_shards(os.path.dirname(shards[0]) or ".", num_samples, samples_per_shard, resolution, seed,
                               verbose_share=verbose_share)
        return shards
    # Write beside, then move in: an interrupted write never leaves a directory that looks complete.
    partial = os.path.join(pattern_or_dir, f".partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    written = write_synthetic_shards(partial, num_samples, samples_per_shard, resolution, seed,
                                     verbose_share=verbose_share)
    final = [os.path.join(pattern_or_dir, os.path.basename(path)) for path in written]
    marker = os.path.join(pattern_or_dir, MARKER)
    with open(os.path.join(partial, MARKER), "w") as handle:
        json.dump({"shapes_world": SHAPES_WORLD_VERSION, "num_samples": num_samples,
                   "samples_per_shard": samples_per_shard, "resolution": resolution, "seed": seed,
                   "verbose_share": float(verbose_share)}, handle)
    for source, target in zip(written, final):
        os.replace(source, target)
    os.replace(os.path.join(partial, MARKER), marker)
    os.rmdir(partial)
    return final


def mentions_in_clip_window(text: str, tokenizer) -> list[dict]:
    """``llm4gen.shapes.world.object_mentions(text)``, each also with ``last_clip_token``: the largest token
    index (BOS = 0) over the object's shape and attribute words in ``tokenizer``'s untruncated tokens,
    and ``in_clip_window``: whether that is at most ``CLIP_LAST_CONTENT_POSITION`` (75: a CLIP encoder of
    77 positions sees every word of the object)."""
    mentions = object_mentions(text)
    if not mentions:
        return mentions
    words = [Word(**w) for m in mentions for w in (m["entity"], *m["attributes"])]
    length = len(tokenizer(text, verbose=False)["input_ids"])  # untruncated, BOS and EOS included
    positions = iter(word_token_positions(text, words, tokenizer, max_length=length))
    for m in mentions:
        found = [next(positions) for _ in range(1 + len(m["attributes"]))]
        if not all(found):
            raise ValueError(f"tokenizer {type(tokenizer).__name__} lost a word of {m['entity']} in {text!r}")
        m["last_clip_token"] = max(max(p) for p in found)
        m["in_clip_window"] = m["last_clip_token"] <= CLIP_LAST_CONTENT_POSITION
    return mentions

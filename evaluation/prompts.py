"""Prompt sets: T2I-CompBench category files, COCO-style caption files with reference images, and the
shapes benchmark's fixed sets. A set is a name and its prompts, in a fixed order."""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from llm4gen.evaluation import geneval
from llm4gen.evaluation.prompt_sets import PROMPT_SETS, prompt_set

COMPBENCH_ATTRIBUTE_CATEGORIES = ("color", "shape", "texture")  # the BLIP-VQA categories
COMPBENCH_PROMPTS_PER_CATEGORY = 300
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass
class PromptSet:
    name: str
    prompts: list[str]
    kind: str = "prompts"          # compbench | coco | shapes | prompts
    reference_images: str | None = None  # COCO: the folder (or shards) FID compares with
    seeds: list[int] | None = None  # the set's own seed per prompt (the shapes benchmark's)
    meta: dict = field(default_factory=dict)


def read_prompt_file(path: str | Path, limit: int | None = None) -> list[str]:
    """One prompt per line; blank lines skipped; the first ``limit`` kept."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {str(path)!r} does not exist")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"prompt file {str(path)!r} holds no prompts (one per line expected)")
    return prompts[:limit] if limit else prompts


def compbench_category(path: Path) -> str:
    """``color_val.txt`` -> ``color``; ``texture.txt`` -> ``texture``."""
    stem = path.stem
    return stem[: -len("_val")] if stem.endswith("_val") else stem


def compbench_sets(source: str | Path, categories=COMPBENCH_ATTRIBUTE_CATEGORIES,
                   limit: int | None = COMPBENCH_PROMPTS_PER_CATEGORY) -> list[PromptSet]:
    """From T2I-CompBench's ``examples/dataset`` folder (``<category>_val.txt`` per category) or from
    one category file. The benchmark's protocol uses the first 300 validation prompts of each."""
    source = Path(source)
    if source.is_file():
        files = [source]
    elif source.is_dir():
        files = [source / f"{c}_val.txt" for c in categories]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"T2I-CompBench folder {str(source)!r} lacks {missing}; point --compbench at "
                                    f"T2I-CompBench's examples/dataset folder or at one category file")
    else:
        raise FileNotFoundError(f"--compbench {str(source)!r} is neither a folder nor a prompt file")
    return [PromptSet(compbench_category(f), read_prompt_file(f, limit), kind="compbench",
                      meta={"path": str(f), "file_sha256": hashlib.sha256(f.read_bytes()).hexdigest()}) for f in files]


def coco_set(captions: str | Path, reference_images: str | Path, limit: int | None = None,
             name: str = "coco", seed: int = 0) -> PromptSet:
    """COCO caption annotations (``{"annotations": [{"image_id", "caption"}, ...]}``): the first caption
    of each image, in image-id order; with ``limit``, a random sample of that many images' captions drawn
    with ``seed`` (the 30k-caption MS-COCO FID protocol samples, rather than taking the first ids), kept in
    image-id order. FID compares with the images under ``reference_images`` (a folder, WebDataset shards,
    or a .txt list of image paths: the matched reference list)."""
    captions = Path(captions)
    if not captions.is_file():
        raise FileNotFoundError(f"COCO caption file {str(captions)!r} does not exist")
    data = json.loads(captions.read_text(encoding="utf-8"))
    annotations = data.get("annotations") if isinstance(data, dict) else None
    if not annotations:
        raise ValueError(f"{str(captions)!r} is not a COCO caption file: expected "
                         f'{{"annotations": [{{"image_id": ..., "caption": ...}}, ...]}}')
    first: dict = {}
    for item in annotations:
        first.setdefault(item["image_id"], " ".join(str(item["caption"]).split()))
    ids = sorted(first)
    if limit and limit < len(ids):
        ids = sorted(random.Random(seed).sample(ids, limit))
    prompts = [first[k] for k in ids]
    if not Path(reference_images).exists() and "{" not in str(reference_images):
        raise FileNotFoundError(f"reference images {str(reference_images)!r} do not exist (a folder of images "
                                f"or WebDataset shards, e.g. the MS-COCO val2014 images)")
    return PromptSet(name, prompts, kind="coco", reference_images=str(reference_images),
                     meta={"caption_sample": {"limit": limit, "seed": seed, "image_ids_sha256": hashlib.sha256(
                         json.dumps(ids).encode()).hexdigest()}})


def geneval_set(limit: int | None = None) -> PromptSet:
    """GenEval's 553 prompts (evaluation/geneval.py), each with its task and clauses in ``meta["metadata"]``."""
    rows = geneval.metadata(limit)
    return PromptSet("geneval", [r["prompt"] for r in rows], kind="geneval",
                     meta={"metadata": rows, "file_sha256": geneval.METADATA_SHA256, "commit": geneval.COMMIT})


def shapes_sets(names: str | list[str], limit: int | None = None, draw: int = 0) -> list[PromptSet]:
    """The shapes benchmark's fixed sets (``evaluation.prompt_sets``: seen_1..3, heldout_1..3, and the
    evidence sets phrased_2/3, verbose_2/3), with their own seeds. "all" means the six legacy sets
    (``PROMPT_SETS``); name an evidence set to get it. ``draw`` > 0: the sets over freshly drawn scenes."""
    names = list(PROMPT_SETS) if names in ("all", ["all"]) else (names.split(",") if isinstance(names, str) else names)
    sets = []
    for name in names:
        records = prompt_set(name, limit, draw)  # raises on an unknown name, listing the known ones
        sets.append(PromptSet(name, [r.text for r in records], kind="shapes", seeds=[r.seed for r in records]))
    return sets

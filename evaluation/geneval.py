"""GenEval (Ghosh et al., NeurIPS 2023 Datasets and Benchmarks): object-focused compositional scores from an
instance detector and a CLIP colour classifier, with GenEval's rules (github.com/djghosh13/geneval,
``evaluation/evaluate_images.py`` at commit af4902f; its prompts and object names ship in
``data/geneval/`` under its MIT licence).

553 prompts in six tasks (single object 80, two objects 99, counting 80, colours 94, position 100, colour
attribution 100), 4 images each. An image is correct when every ``include`` clause holds and no
``exclude`` clause does:

- detections: per class, those above 0.3 confidence (0.9 for the counting task), most confident first,
  at most 16; a clause needs ``count`` of them;
- colour: each of those objects, its mask composited over a #999 grey background and cropped to its box,
  is classified by CLIP zero-shot over 10 colours x 3 templates ("a photo of a {c} {object}", "a photo of
  a {c}-colored {object}", "a photo of a {c} object"; per colour the templates' normalised text
  embeddings are averaged and normalised again); ``count`` of them must be the asked colour;
- position: each object against each of the target clause's objects, by the centre offset with each
  axis shrunk by 0.1 x the two boxes' summed sizes; "left of" when the shrunk offset's x over the full
  offset's length is below -0.5 (right of: above 0.5; above / below: the same on y).

A task's score is the share of its correct images; the overall score the mean of the six task scores.

The official detector is mmdet's Mask2Former Swin-S (COCO instance segmentation, 8x2 50e, lsj). Through
transformers the closest is ``facebook/mask2former-swin-small-coco-instance`` (the same architecture and
training data, converted from the authors' Detectron2 release, not mmdet's re-training); its confidences
are the class probability times the mask score, as mmdet's. The colour model is the same OpenAI CLIP
ViT-L/14 (``openai/clip-vit-large-patch14``) GenEval loads through open_clip. Expect scores close to, not
equal to, the published ones (SD1.5 0.43, SDXL 0.55).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
from PIL import Image

DATA = Path(__file__).resolve().parent / "data" / "geneval"
COMMIT = "af4902f24d3ca90ebbb446dd9891a59e0f82725f"
METADATA_SHA256 = "5c48e0813e812e3c373fa5c8ed07a8f0a483be30272b4427b0559c8048e67c13"
TASKS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
COLOR_TEMPLATES = ("a photo of a {c} {object}", "a photo of a {c}-colored {object}", "a photo of a {c} object")
THRESHOLD, COUNTING_THRESHOLD, MAX_OBJECTS, POSITION_THRESHOLD = 0.3, 0.9, 16, 0.1
BACKGROUND = "#999"
IMAGES_PER_PROMPT = 4
DEFAULT_DETECTOR = "facebook/mask2former-swin-small-coco-instance"
DEFAULT_CLIP = "openai/clip-vit-large-patch14"


@dataclass(frozen=True)
class Detection:
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels
    score: float
    mask: Optional[np.ndarray] = None       # (h, w) bool, the instance's pixels


def metadata(per_task: Optional[int] = None) -> list[dict]:
    """GenEval's prompt records (``tag``, ``prompt``, ``include``, optionally ``exclude``), in file order; with
    ``per_task``, the first that many of each task (a quick run that still scores all six)."""
    rows = [json.loads(line) for line in (DATA / "evaluation_metadata.jsonl").read_text().splitlines() if line.strip()]
    if per_task:
        seen: dict[str, int] = {}
        rows = [r for r in rows if (seen.__setitem__(r["tag"], seen.get(r["tag"], 0) + 1) or seen[r["tag"]]) <= per_task]
    return rows


def sha256_of_metadata() -> str:
    return hashlib.sha256((DATA / "evaluation_metadata.jsonl").read_bytes()).hexdigest()


def object_names() -> list[str]:
    return [line.strip() for line in (DATA / "object_names.txt").read_text().splitlines() if line.strip()]


def keep_detections(raw: dict[str, list[Detection]], tag: str) -> dict[str, list[Detection]]:
    """Per class: above the task's confidence threshold, most confident first, at most MAX_OBJECTS."""
    threshold = COUNTING_THRESHOLD if tag == "counting" else THRESHOLD
    kept = {}
    for name, found in raw.items():
        above = sorted((d for d in found if d.score > threshold), key=lambda d: -d.score)[:MAX_OBJECTS]
        if above:
            kept[name] = above
    return kept


def relative_position(a: Detection, b: Detection, threshold: float = POSITION_THRESHOLD) -> set[str]:
    """Where ``a`` is relative to ``b`` ("left of", "right of", "above", "below"; image y points down)."""
    boxes = np.array([a.box, b.box], dtype=np.float64).reshape(2, 2, 2)  # (object, corner, xy)
    center_a, center_b = boxes.mean(axis=1)
    dim_a, dim_b = np.abs(boxes[:, 1] - boxes[:, 0])
    offset = center_a - center_b
    revised = np.maximum(np.abs(offset) - threshold * (dim_a + dim_b), 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    relations = set()
    if dx < -0.5:
        relations.add("left of")
    if dx > 0.5:
        relations.add("right of")
    if dy < -0.5:
        relations.add("above")
    if dy > 0.5:
        relations.add("below")
    return relations


ColourOf = Callable[[list[Detection], str], list[str]]  # the detections of one class -> their colour names


def judge(record: dict, detections: dict[str, list[Detection]], colour_of: ColourOf) -> tuple[bool, str]:
    """GenEval's verdict on one image: (correct, the reasons it is not)."""
    correct, reasons, groups = True, [], []
    for clause in record.get("include", []):
        name, count = clause["class"], clause["count"]
        found = detections.get(name, [])[:count]
        matched = len(found) >= count
        if not matched:
            reasons.append(f"expected {name}>={count}, found {len(found)}")
        else:
            if "color" in clause:
                colours = colour_of(found, name)
                if colours.count(clause["color"]) < count:
                    matched = False
                    reasons.append(f"expected {clause['color']} {name}>={count}, found {colours.count(clause['color'])} "
                                   f"{clause['color']}; and " + ", ".join(f"{colours.count(c)} {c}" for c in COLORS
                                                                         if c in colours))
            if "position" in clause and matched:
                relation, target = clause["position"]
                if groups[target] is None:
                    matched = False
                    reasons.append(f"no target for {name} to be {relation}")
                else:
                    for obj in found:
                        missing = [rel for t in groups[target] for rel in [relative_position(obj, t)]
                                   if relation not in rel]
                        if missing:
                            matched = False
                            reasons.append(f"expected {name} {relation} target, found {' and '.join(missing[0])} target")
                            break
        correct = correct and matched
        groups.append(found if matched else None)
    for clause in record.get("exclude", []):
        name = clause["class"]
        if len(detections.get(name, [])) >= clause["count"]:
            correct = False
            reasons.append(f"expected {name}<{clause['count']}, found {len(detections[name])}")
    return correct, "\n".join(reasons)


def summary(results: Sequence[tuple[str, bool]]) -> dict[str, float]:
    """(tag, correct) per image -> each task's share of correct images and ``overall``, their mean."""
    scores = {}
    for task in TASKS:
        verdicts = [ok for tag, ok in results if tag == task]
        if verdicts:
            scores[task] = float(np.mean(verdicts))
    scores["overall"] = float(np.mean(list(scores.values()))) if scores else float("nan")
    return scores


def colour_crop(image: Image.Image, detection: Detection) -> Image.Image:
    """The object as GenEval shows it to CLIP: its mask over a #999 background, cropped to its box."""
    image = image.convert("RGB")
    if detection.mask is not None:
        blank = Image.new("RGB", image.size, BACKGROUND)
        image = Image.composite(image, blank, Image.fromarray(detection.mask.astype(np.uint8) * 255))
    return image.crop(tuple(int(round(v)) for v in detection.box))


def box_of(mask: np.ndarray) -> tuple[float, float, float, float]:
    """The (x0, y0, x1, y1) box of a binary mask (x1, y1 the last pixels, as mmdet's boxes)."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return (0.0, 0.0, 0.0, 0.0)
    return (float(xs.min()), float(ys.min()), float(xs.max()), float(ys.max()))

"""A DPG-style question set over the shapes world's long prompts, answered by the shapes analyzer: DPG-Bench's
scoring (dependencies, the L1/L2 category table) tested end to end on generated images on a CPU.

Each prompt record (a scene and its caption, ``evaluation.prompt_sets``) becomes an item of questions in ELLA's
question-table schema, DSG-style (a question about an attribute or a relation depends on the question that
establishes its object):

    1  global - background (gray)                 Is the background plain gray?              parents 0
    2  other - count (shapes, ==2)                Are there exactly two shapes?              parents 0
    per object, in scene order:
    e  entity - whole (circle)                    Is there a circle?                         parents 0
    c  attribute - color (circle, red)            Is there a red circle?                     parents e
    s  attribute - size (red circle, large)       Is the red circle large?                   parents c
    p  relation - spatial (red circle, top left)  Is the red circle in the top left of the picture?  parents c

``ShapesVQA`` answers each question "yes" or "no" from ``evaluation.shapes.analyze`` of the image: a question is a
check on the analyzed scene (any detected object of that shape / colour and shape / ... ; the background: the
border's median colour is the nearest palette colour to the asked one; the count: the number of detections).
"""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np

from llm4gen.evaluation.dpg_bench import Item, read_question_rows
from llm4gen.evaluation.prompt_sets import PromptRecord
from llm4gen.evaluation.shapes import PALETTE, PALETTE_NAMES, analyze, as_rgb_array
from llm4gen.shapes.world import BACKGROUND_RGB, CELL_NAMES, NUMBER_WORDS

WORD_NUMBERS = {word: n for n, word in NUMBER_WORDS.items()}
BACKGROUND_COLORS = {"gray": BACKGROUND_RGB}


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def question_rows(record: PromptRecord) -> list[dict]:
    """The record's questions as rows of ELLA's CSV schema (``dpg_bench.CSV_COLUMNS``)."""
    scene = record.scene
    n = len(scene.objects)
    rows = [("global - background (gray)", f"Is the background plain {scene.background}?", "0"),
            (f"other - count (shapes, =={n})", f"Are there exactly {NUMBER_WORDS[n]} shape{'s' if n > 1 else ''}?",
             "0")]
    for o in scene.objects:
        entity = len(rows) + 1
        rows.append((f"entity - whole ({o.shape})", f"Is there a {o.shape}?", "0"))
        colour = len(rows) + 1
        rows.append((f"attribute - color ({o.shape}, {o.color})", f"Is there {_article(o.color)} {o.color} {o.shape}?",
                     str(entity)))
        rows.append((f"attribute - size ({o.color} {o.shape}, {o.size})", f"Is the {o.color} {o.shape} {o.size}?",
                     str(colour)))
        rows.append((f"relation - spatial ({o.color} {o.shape}, {CELL_NAMES[o.cell]})",
                     f"Is the {o.color} {o.shape} in the {CELL_NAMES[o.cell]} of the picture?", str(colour)))
    return [{"item_id": record.id, "text": record.text, "keywords": "", "proposition_id": str(i + 1),
             "dependency": parents, "category_broad": t.split(" - ")[0], "category_detailed": t.split(" - ")[1]
             .split(" (")[0], "tuple": t, "question_natural_language": q} for i, (t, q, parents) in enumerate(rows)]


def question_table(records: Sequence[PromptRecord]) -> dict[str, Item]:
    """Items for ``records``; this table has no row to drop (ELLA's first-row rule is a property of its CSV)."""
    return read_question_rows([row for r in records for row in question_rows(r)], drop_first_row=False)


_QUESTIONS = [
    ("background", re.compile(r"^Is the background plain (\w+)\?$")),
    ("count", re.compile(r"^Are there exactly (\w+) shapes?\?$")),
    ("entity", re.compile(r"^Is there an? (\w+)\?$")),
    ("color", re.compile(r"^Is there an? (\w+) (\w+)\?$")),
    ("size", re.compile(r"^Is the (\w+) (\w+) (small|large)\?$")),
    ("spatial", re.compile(r"^Is the (\w+) (\w+) in the (\w+ \w+) of the picture\?$")),
]


def quadrant(bbox: tuple[int, int, int, int], width: int, height: int) -> str:
    """The cell name (``CELL_NAMES``) holding the centre of a (left, top, right, bottom) box."""
    cx, cy = (bbox[0] + bbox[2]) / 2, (bbox[1] + bbox[3]) / 2
    return CELL_NAMES[2 * int(cy >= height / 2) + int(cx >= width / 2)]


def check(image, question: str, found=None) -> bool:
    """The analyzed ``image``'s answer to one of ``question_rows``' questions. ``found``: its ``analyze`` result."""
    for kind, pattern in _QUESTIONS:
        match = pattern.match(question)
        if match:
            break
    else:
        raise ValueError(f"not a shapes DPG question: {question!r}")
    if kind == "background":
        rgb = as_rgb_array(image)
        border = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]])  # (n, 3)
        median = np.median(border, axis=0)
        nearest = int(np.linalg.norm(PALETTE - median, axis=1).argmin())
        names = (*PALETTE_NAMES, "gray")
        return names[nearest] == match.group(1)
    found = analyze(image) if found is None else found
    if kind == "count":
        return len(found) == WORD_NUMBERS[match.group(1)]
    if kind == "entity":
        return any(o.shape == match.group(1) for o in found)
    colour, shape = match.group(1), match.group(2)
    same = [o for o in found if o.color == colour and o.shape == shape]
    if kind == "color":
        return bool(same)
    if kind == "size":
        return any(o.size == match.group(3) for o in same)
    height, width = as_rgb_array(image).shape[:2]
    return any(quadrant(o.bbox, width, height) == match.group(3) for o in same)


class ShapesVQA:
    """The shapes analyzer as DPG's VQA model: "yes" when the check holds, else "no"."""
    name = "shapes"

    def answer(self, images: Sequence, questions: Sequence[str]) -> list[str]:
        analyzed: dict[int, list] = {}
        answers = []
        for image, question in zip(images, questions):
            if id(image) not in analyzed:
                analyzed[id(image)] = analyze(image)
            answers.append("yes" if check(image, question, analyzed[id(image)]) else "no")
        return answers

    def record(self) -> dict:
        return {"vqa": "shapes analyzer", "comparable_with_published": False}

"""DPG-Bench (ELLA, Hu et al. 2024): dense prompts, each with its own yes/no questions, scored with ELLA's rules
(github.com/TencentQQGYLab/ELLA, ``dpg_bench/compute_dpg_bench.py`` at commit 3c228f1; prompts and licence in
``data/dpg_bench/``, Apache-2.0).

What ELLA fixes and what it leaves open:

- fixed: the 1,065 prompts (``dpg_bench/prompts/<item_id>.txt``, shipped here byte for byte and pinned by their
  git tree id), the question table (``dpg_bench/dpg_bench.csv``, pinned by its git blob id: it is too large for
  this project's source snapshot, so the user supplies it, and a table that is not byte-identical is flagged);
  4 images per prompt laid out as a 2x2 grid named after the item (tile order: top left, top right, bottom left,
  bottom right), the tile side passed as ``--resolution``; mPLUG-large VQA
  (``damo/mplug_visual-question-answering_coco_large_en`` through modelscope); the scoring below.
- open (not in the paper nor the repository; ELLA issue #67 asks about seeds and has no answer): seeds, sampler,
  steps, guidance, image size. ``PROTOCOL`` pins them to what ELLA's own ``inference.py`` samples its SD1.5
  comparisons with: DPM-Solver multistep, 50 steps, guidance 12, image j of every prompt with seed 1001 + j, the
  base model's native size (SD1.5 512 px; ELLA samples in fp16, this project in fp32 or bf16).

The scoring rules, exactly as ``compute_dpg_bench.py`` applies them (quirks included, so scores are comparable):

1. Question table: the first data row of the CSV is skipped (its loop ``continue``s at index 0), so item
   ``questions[0]``'s first question does not exist; an item with a question that depends on a missing question
   fails (a ``KeyError`` there) and is left out of every score.
2. Per tile: a question scores 1 if the VQA's answer is exactly ``"yes"``, else 0. Then, in table order, a
   question with a parent (dependency ids other than 0) whose *current* score is 0 is set to 0; a parent is
   read after its own zeroing only if it comes earlier in the table. The tile's score is the mean over the
   item's questions; the item's score the mean over its 4 tiles.
3. Categories: a question's category is its tuple's text before ``(`` (L2, e.g. ``entity - whole``), its L1
   the part before ``-``; the category scores read each question's score of the *last* tile, before zeroing
   (ELLA issue #60), pooled over items; L1 pools all its L2 questions (not a mean of L2 means).
4. DPG-Bench score: the mean of the item scores; everything x100.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from PIL import Image

DATA = Path(__file__).resolve().parent / "data" / "dpg_bench"
UPSTREAM = "https://github.com/TencentQQGYLab/ELLA"
COMMIT = "3c228f1dc6c4d3cad0a47493816151a419f14db3"
PROMPTS_TREE = "ac3ba27bf2e1c3ec189fe2e00681f75f4b78d683"    # git tree id of dpg_bench/prompts/ at COMMIT
QUESTIONS_BLOB = "98457fc9901943f51ff9a30367250fc292533bed"  # git blob id of dpg_bench/dpg_bench.csv at COMMIT
PROMPTS_FILE_SHA256 = "b39d269aeb34db543823e8b97e18bc30f991de9abee926d02b0d1d8d9389ff05"  # data/dpg_bench/prompts.jsonl
PROMPTS = 1065
TILES = 4                   # images per prompt, one per tile of the 2x2 grid
MPLUG = "damo/mplug_visual-question-answering_coco_large_en"
CSV_COLUMNS = ("item_id", "text", "keywords", "proposition_id", "dependency", "category_broad", "category_detailed",
               "tuple", "question_natural_language")
L1_CATEGORIES = ("global", "entity", "attribute", "relation", "other")  # the published table's columns


@dataclass(frozen=True)
class Protocol:
    """DPG-Bench's generation, with the settings ELLA leaves open pinned (see the module docstring)."""
    name: str = "dpg-bench"
    images_per_prompt: int = TILES
    seed: int = 1001            # image j of every prompt: seed + j
    steps: int = 50
    scheduler: str = "DPMSolverMultistepScheduler"
    guidance_scale: float = 12.0


PROTOCOL = Protocol()

# ELLA's DPG-Bench table (arXiv 2403.05135), overall score x100, as issue 45 cites it; only 74.91 was re-checked
# against a second source here (docs/evaluation.md says which and how).
PUBLISHED = {"SD1.5": 63.18, "SDXL": 74.65, "PixArt-alpha": 71.11, "ELLA-SD1.5": 74.91, "ELLA-SDXL": 80.23}


# ---------------------------------------------------------------- pinned files

def git_blob_id(data: bytes) -> str:
    """The id git gives a file's content (sha1 of ``blob <size>\\0`` + content): pins a file known only by id."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def git_tree_id(files: dict[str, bytes]) -> str:
    """The id git gives a flat folder of regular files (mode 100644), entries sorted by name."""
    entries = b"".join(b"100644 " + name.encode() + b"\0" + bytes.fromhex(git_blob_id(data))
                       for name, data in sorted(files.items()))
    return hashlib.sha1(b"tree %d\0" % len(entries) + entries).hexdigest()


def prompts() -> dict[str, str]:
    """item_id -> prompt text, exactly as ELLA's prompt files hold it (sorted by item id)."""
    rows = [json.loads(line) for line in (DATA / "prompts.jsonl").read_text(encoding="utf-8").splitlines()]
    return {r["item_id"]: r["text"] for r in rows}


def is_published_table(path: Path) -> bool:
    return git_blob_id(Path(path).read_bytes()) == QUESTIONS_BLOB


# ---------------------------------------------------------------- the question table

@dataclass(frozen=True)
class Question:
    id: int
    tuple: str              # e.g. "entity - whole (cat)"
    text: str               # the question asked, e.g. "Is there a cat?"
    parents: tuple[int, ...]

    @property
    def category(self) -> str:
        """L2: the tuple's text before its first "(" (ELLA's split)."""
        return self.tuple.split("(")[0].strip()

    @property
    def l1(self) -> str:
        return self.category.split("-")[0].strip()


@dataclass
class Item:
    id: str
    text: str
    questions: dict[int, Question] = field(default_factory=dict)   # in table order


def read_question_rows(rows: Sequence[dict], drop_first_row: bool = True) -> dict[str, Item]:
    """Items from rows of ELLA's CSV schema (``CSV_COLUMNS``), in table order. ``drop_first_row``: ELLA's loader
    skips the first data row (the published protocol); a table written for this rule set may keep it."""
    items: dict[str, Item] = {}
    for index, row in enumerate(rows):
        if drop_first_row and index == 0:
            continue
        missing = [c for c in ("item_id", "proposition_id", "dependency", "tuple", "question_natural_language")
                   if row.get(c) in (None, "")]
        if missing:
            raise ValueError(f"question table row {index + 2}: no {', '.join(missing)}; expected ELLA's columns "
                             f"{', '.join(CSV_COLUMNS)}")
        item = items.setdefault(row["item_id"], Item(row["item_id"], row.get("text", "")))
        qid = int(row["proposition_id"])
        item.questions[qid] = Question(qid, row["tuple"], row["question_natural_language"],
                                       tuple(int(d.strip()) for d in str(row["dependency"]).split(",")))
    return items


def read_question_table(path: str | Path, drop_first_row: bool = True) -> dict[str, Item]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"DPG-Bench question table {str(path)!r} does not exist; it is dpg_bench/dpg_bench.csv "
                                f"of {UPSTREAM} at commit {COMMIT[:7]} (git blob {QUESTIONS_BLOB[:12]}...)")
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        absent = [c for c in CSV_COLUMNS if c not in (reader.fieldnames or [])]
        if absent:
            raise ValueError(f"{path} is not a DPG-Bench question table: it lacks the columns {absent} "
                             f"(ELLA's dpg_bench.csv has {', '.join(CSV_COLUMNS)})")
        return read_question_rows(list(reader), drop_first_row)


# ---------------------------------------------------------------- scoring

class SkippedItem(ValueError):
    """ELLA's script fails on this item (a question depends on one the table does not hold) and skips it."""


@dataclass
class ItemScore:
    item_id: str
    tile_scores: list[float]                   # per tile: mean over questions after zeroing
    score: float                               # mean over tiles
    last_tile_raw: dict[int, float]            # the last tile's scores before zeroing (what the categories read)
    tile_answers: list[dict[int, str]]
    tile_zeroed: list[dict[int, float]]


def score_item(item: Item, tile_answers: Sequence[dict[int, str]]) -> ItemScore:
    """One item from its tiles' answers (question id -> the VQA's answer text), by ELLA's rules 2 and 3."""
    if not tile_answers:
        raise ValueError(f"item {item.id}: no tiles answered")
    tile_scores, zeroed_tiles, raw = [], [], {}
    for answers in tile_answers:
        scores = {qid: float(answers[qid] == "yes") for qid in item.questions}
        raw = dict(scores)
        for qid, question in item.questions.items():      # table order; reads scores zeroed so far
            for parent in question.parents:
                if parent == 0:
                    continue
                if parent not in scores:
                    raise SkippedItem(f"item {item.id}: question {qid} depends on question {parent}, which the "
                                      f"table does not hold")
                if scores[parent] == 0:
                    scores[qid] = 0.0
                    break
        tile_scores.append(sum(scores.values()) / len(scores))
        zeroed_tiles.append(scores)
    return ItemScore(item.id, tile_scores, sum(tile_scores) / len(tile_scores), raw, list(tile_answers), zeroed_tiles)


@dataclass
class BenchmarkScore:
    score: float                                 # mean item score (0..1)
    l1: dict[str, float]                         # pooled question scores per L1 category (0..1)
    l2: dict[str, float]
    items: int
    skipped: list[str]

    def values(self, prefix: str = "dpg") -> dict[str, float]:
        """``{prefix}_score`` and ``{prefix}_<l1>`` for the published table's five L1 columns present."""
        return {f"{prefix}_score": self.score, **{f"{prefix}_{c}": self.l1[c] for c in L1_CATEGORIES if c in self.l1}}


def aggregate(items: dict[str, Item], scores: Sequence[ItemScore], skipped: Sequence[str] = ()) -> BenchmarkScore:
    if not scores:
        raise ValueError("no DPG item could be scored")
    by_l2: dict[str, list[float]] = defaultdict(list)
    by_l1: dict[str, list[float]] = defaultdict(list)
    for s in scores:
        for qid, value in s.last_tile_raw.items():
            question = items[s.item_id].questions[qid]
            by_l2[question.category].append(value)
            by_l1[question.l1].append(value)
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    return BenchmarkScore(mean([s.score for s in scores]), {k: mean(v) for k, v in by_l1.items()},
                          {k: mean(v) for k, v in sorted(by_l2.items())}, len(scores), list(skipped))


def category_table(result: BenchmarkScore, title: str) -> str:
    """The L1 and L2 table as ELLA's script prints it (x100), in markdown."""
    lines = [f"{title}: DPG-Bench score {result.score * 100:.2f} over {result.items} items"
             + (f" ({len(result.skipped)} skipped as ELLA's script skips them: {', '.join(result.skipped[:5])})"
                if result.skipped else ""),
             "", "| level | category | score (x100) |", "| --- | --- | ---: |"]
    lines += [f"| L1 | {k} | {v * 100:.2f} |" for k, v in result.l1.items()]
    lines += [f"| L2 | {k} | {v * 100:.2f} |" for k, v in result.l2.items()]
    return "\n".join(lines)


# ---------------------------------------------------------------- the 2x2 grid

def grid(images: Sequence[Image.Image]) -> Image.Image:
    """Four images of one size as ELLA's 2x2 grid (image j at tile j: top left, top right, bottom left, bottom
    right)."""
    if len(images) != TILES:
        raise ValueError(f"a DPG-Bench grid holds {TILES} images, got {len(images)}")
    sizes = {im.size for im in images}
    if len(sizes) != 1 or len({s for size in sizes for s in size}) != 1:
        raise ValueError(f"a DPG-Bench grid needs square images of one size, got {sorted(sizes)}")
    side = images[0].width
    canvas = Image.new("RGB", (2 * side, 2 * side))
    for j, image in enumerate(images):
        canvas.paste(image.convert("RGB"), ((j % 2) * side, (j // 2) * side))
    return canvas


def tiles(grid_image: Image.Image, resolution: int, count: int = TILES) -> list[Image.Image]:
    """The crops ELLA's script asks about: (0, 0, r, r), (r, 0, 2r, r), (0, r, r, 2r), (r, r, 2r, 2r), first
    ``count`` of them (its ``--pic-num``; 4 in its ``dist_eval.sh``)."""
    r = resolution
    boxes = [(0, 0, r, r), (r, 0, 2 * r, r), (0, r, r, 2 * r), (r, r, 2 * r, 2 * r)]
    return [grid_image.crop(box) for box in boxes[:count]]

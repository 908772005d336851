"""DPG-Bench's scorer (evaluation/dpg_bench.py: the rules, the pins) over prompt sets of kind ``dpg``: the published
set (``dpg_bench_set``: ELLA's prompts with the question table the user gives) and the shapes world's long prompts
with analyzer questions (``shapes_dpg_set``). The 4 images of a prompt are laid out as ELLA's 2x2 grid and its
4 tiles cropped back out, as ``compute_dpg_bench.py`` does, then every question is asked of every tile.

Metrics: ``<prefix>_score`` (the DPG-Bench score) and ``<prefix>_<l1>`` for the published table's L1 columns;
the prefix names the VQA model: ``dpg`` for mPLUG (the published scorer), ``dpg_blip`` for the BLIP variant and
``dpg_shapes`` for the analyzer, so a variant never shares a column with the published score. Each image's
details hold its tile's answers, its tile score after zeroing (``<prefix>_score``: the mean over images is the
set's score) and its item's score.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Optional

from llm4gen.evaluation import dpg_bench as D
from llm4gen.evaluation.blip_vqa import DEFAULT_BLIP_VQA
from llm4gen.evaluation.dpg_vqa import BlipAnswerVQA, MplugVQA
from llm4gen.evaluation.prompt_sets import prompt_set
from llm4gen.evaluation.prompts import PromptSet
from llm4gen.evaluation.scorers import Scorer, load_images
from llm4gen.evaluation.shapes_dpg import ShapesVQA, question_table

VQA_CHOICES = ("mplug", "blip")


def dpg_bench_set(questions: str | Path, limit: Optional[int] = None) -> PromptSet:
    """ELLA's prompts (shipped) for the items of the question table at ``questions`` (ELLA's dpg_bench.csv), in
    item-id order; ``limit``: the first N items (a quick run; the protocol is all of them)."""
    table = D.read_question_table(questions)
    shipped = D.prompts()
    unknown = sorted(set(table) - set(shipped))
    if unknown:
        raise ValueError(f"the question table {questions} holds items DPG-Bench's prompts do not: {unknown[:5]}; "
                         f"is it ELLA's dpg_bench/dpg_bench.csv?")
    ids = sorted(table)[:limit] if limit else sorted(table)
    published = D.is_published_table(Path(questions))
    return PromptSet("dpg_bench", [shipped[i] for i in ids], kind="dpg",
                     meta={"item_ids": ids, "questions": table, "path": str(questions), "published_table": published,
                           "file_sha256": D.PROMPTS_FILE_SHA256, "questions_git_blob": D.git_blob_id(
                               Path(questions).read_bytes()), "commit": D.COMMIT})


def shapes_dpg_set(name: str, limit: Optional[int] = None) -> PromptSet:
    """The shapes prompt set ``name`` (e.g. verbose_2, verbose_3, phrased_3) with analyzer questions."""
    records = prompt_set(name, limit)
    return PromptSet(f"dpg_shapes_{name}", [r.text for r in records], kind="dpg", seeds=[r.seed for r in records],
                     meta={"item_ids": [r.id for r in records], "questions": question_table(records), "vqa": "shapes"})


class DPGScorer(Scorer):
    name = "dpg"
    kinds = ("dpg",)

    def __init__(self, vqa: str = "mplug", model: Optional[str] = None, device: str = "cpu", needs_model: bool = True):
        """``needs_model``: some set is answered by the VQA model (not only shapes sets, which the analyzer answers)."""
        if vqa not in VQA_CHOICES:
            raise ValueError(f"--dpg-vqa {vqa!r}: expected one of {VQA_CHOICES}")
        self.vqa_name, self.model, self.device, self.needs_model = vqa, model, device, needs_model
        self.vqa = None
        self.shapes_vqa = ShapesVQA()
        self.results: dict[str, tuple[str, D.BenchmarkScore, bool]] = {}
        self.tables: dict[str, str] = {}

    def load(self) -> None:
        if not self.needs_model:
            return
        if self.vqa_name == "mplug":
            self.vqa = MplugVQA(self.model or D.MPLUG, self.device)
        else:
            self.vqa = BlipAnswerVQA(self.model or DEFAULT_BLIP_VQA, self.device)

    def _vqa_for(self, prompt_set):
        return self.shapes_vqa if prompt_set.meta.get("vqa") == "shapes" else self.vqa

    def prefix(self, prompt_set) -> str:
        vqa = self._vqa_for(prompt_set)
        return "dpg" if vqa.name == "mplug" else f"dpg_{vqa.name}"

    def score(self, prompt_set, records):
        items: dict[str, D.Item] = prompt_set.meta["questions"]
        ids: list[str] = prompt_set.meta["item_ids"]
        vqa, prefix = self._vqa_for(prompt_set), self.prefix(prompt_set)
        by_prompt: dict[int, list] = defaultdict(list)
        for r in records:
            by_prompt[r.prompt_index].append(r)
        scores, skipped, details = [], [], {}
        for index, group in sorted(by_prompt.items()):
            group.sort(key=lambda r: r.image_index)
            if len(group) != D.TILES:
                raise ValueError(f"DPG-Bench scores {D.TILES} images per prompt (a 2x2 grid); prompt {index} of set "
                                 f"{prompt_set.name!r} has {len(group)}: use --images-per-prompt {D.TILES}")
            item = items[ids[index]]
            images = load_images(group)
            crops = D.tiles(D.grid(images), images[0].width)   # what ELLA's script crops out of the grid
            questions = list(item.questions.values())
            pairs = [(crop, q) for crop in crops for q in questions]
            answers = vqa.answer([c for c, _ in pairs], [q.text for _, q in pairs])
            tile_answers = [{q.id: answers[t * len(questions) + k] for k, q in enumerate(questions)}
                            for t in range(len(crops))]
            try:
                result = D.score_item(item, tile_answers)
            except D.SkippedItem as err:
                skipped.append(item.id)
                for t, r in enumerate(group):
                    details[(r.prompt_index, r.image_index)] = {"item_id": item.id, "skipped": str(err),
                                                                "answers": tile_answers[t]}
                continue
            scores.append(result)
            for t, r in enumerate(group):
                details[(r.prompt_index, r.image_index)] = {
                    "item_id": item.id, "answers": tile_answers[t], f"{prefix}_score": result.tile_scores[t],
                    f"{prefix}_item": result.score}
        summary = D.aggregate(items, scores, skipped)
        published = bool(prompt_set.meta.get("published_table"))
        self.results[prompt_set.name] = (prefix, summary, published)
        self.tables[prompt_set.name] = prompt_set.meta.get("questions_git_blob", "shapes analyzer questions")
        return summary.values(prefix), [details[(r.prompt_index, r.image_index)] for r in records]

    def summary_markdown(self) -> str:
        """Each scored set's L1/L2 table, and what it is comparable with."""
        parts = []
        for set_name, (prefix, result, published) in self.results.items():
            if prefix == "dpg" and not published:
                note = (f"the question table is not ELLA's published dpg_bench.csv (git blob "
                        f"{D.QUESTIONS_BLOB[:12]}...): not comparable with ELLA's published rows")
            elif prefix == "dpg":
                note = ("published rows (ELLA's table, overall x100, as cited; see docs/evaluation.md for which were "
                        "re-checked): " + ", ".join(f"{k} {v:.2f}" for k, v in D.PUBLISHED.items()))
            elif prefix == "dpg_blip":
                note = ("BLIP-VQA variant: NOT comparable with ELLA's published rows, which mPLUG-large answered; "
                        "compare it only with other dpg_blip runs")
            else:
                note = "shapes analyzer as the VQA: a CPU test bed of DPG-Bench's rules, no published counterpart"
            parts.append(D.category_table(result, f"{set_name} ({prefix})") + "\n\n" + note)
        return "\n\n".join(parts)

    def record(self) -> dict:
        vqa = self.vqa.record() if self.vqa is not None else {"vqa": self.vqa_name, "model": self.model}
        return {**vqa, "tiles": D.TILES, "question_tables": dict(self.tables), "answer_rule": "exactly 'yes'",
                "rules": f"ELLA compute_dpg_bench.py @{D.COMMIT[:7]} (first CSV row dropped, categories from the last "
                         f"tile before zeroing)"}

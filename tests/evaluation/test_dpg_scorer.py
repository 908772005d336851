"""DPG-style questions over the shapes world, answered by the analyzer, and the DPG scorer over image records:
dependency zeroing and the category table on rendered images whose truth is known."""

import json

import pytest
from PIL import Image

from llm4gen.evaluation import dpg_bench as D
from llm4gen.evaluation.dpg_scorer import DPGScorer, dpg_bench_set, shapes_dpg_set
from llm4gen.evaluation.prompt_sets import prompt_set
from llm4gen.evaluation.scorers import ImageRecord
from llm4gen.evaluation.shapes_dpg import ShapesVQA, question_rows, question_table
from llm4gen.shapes.world import COLORS, Scene, ShapeObject, render_scene


def scene_two():
    return Scene((ShapeObject("red", "circle", "large", 0, 0.9, (0.5, 0.5)),
                  ShapeObject("blue", "square", "small", 3, 0.45, (0.5, 0.5))))


def test_questions_follow_the_scene_with_dsg_dependencies():
    record = prompt_set("verbose_2", 1)[0]
    rows = question_rows(record)
    assert len(rows) == 2 + 4 * 2
    by_id = {int(r["proposition_id"]): r for r in rows}
    assert by_id[1]["tuple"] == "global - background (gray)" and by_id[2]["tuple"] == "other - count (shapes, ==2)"
    first = record.scene.objects[0]
    assert by_id[3]["question_natural_language"] == f"Is there a {first.shape}?" and by_id[3]["dependency"] == "0"
    assert by_id[4]["dependency"] == "3" and by_id[5]["dependency"] == "4" and by_id[6]["dependency"] == "4"
    assert first.color in by_id[4]["question_natural_language"]


def test_the_analyzer_answers_yes_to_every_question_about_the_true_scene_and_no_to_a_wrong_one():
    vqa = ShapesVQA()
    for record in prompt_set("verbose_3", 4):
        image = render_scene(record.scene, 64)
        questions = [r["question_natural_language"] for r in question_rows(record)]
        assert vqa.answer([image] * len(questions), questions) == ["yes"] * len(questions)
    image = render_scene(scene_two(), 64)
    asks = ["Is there a triangle?", "Is there a blue circle?", "Is the red circle small?",
            "Is the red circle in the bottom right of the picture?", "Are there exactly three shapes?",
            "Is the background plain red?"]
    assert vqa.answer([image] * len(asks), asks) == ["no"] * len(asks)


def records_for(tmp_path, prompt_sets_images: list[list[Image.Image]], prompts: list[str]):
    records = []
    for i, images in enumerate(prompt_sets_images):
        for j, image in enumerate(images):
            path = tmp_path / f"{i:05d}_{j:02d}.png"
            image.save(path)
            records.append(ImageRecord(i, j, prompts[i], 1001 + j, path))
    return records


def test_scorer_tiles_four_images_zeroes_dependents_and_tables_categories(tmp_path):
    pset = shapes_dpg_set("verbose_2", 2)
    truth = [render_scene(r.scene, 32) for r in prompt_set("verbose_2", 2)]
    # prompt 0: four true images. prompt 1: the last image with its first object recoloured: its colour, size and
    # position questions ask for an object of the old colour, so all three fail -> tile 3 keeps 7 of 10
    first = prompt_set("verbose_2", 2)[1].scene.objects[0]
    other = next(c for c in COLORS if c not in {o.color for o in prompt_set("verbose_2", 2)[1].scene.objects})
    wrong = Scene((ShapeObject(other, first.shape, first.size, first.cell, first.scale, first.offset),
                   *prompt_set("verbose_2", 2)[1].scene.objects[1:]))
    images = [[truth[0]] * 4, [truth[1]] * 3 + [render_scene(wrong, 32)]]
    scorer = DPGScorer(needs_model=False)
    scorer.load()
    values, details = scorer.score(pset, records_for(tmp_path, images, pset.prompts))
    assert values["dpg_shapes_score"] == pytest.approx((1 + (3 + 0.7) / 4) / 2)
    assert [d["dpg_shapes_score"] for d in details] == pytest.approx([1] * 7 + [0.7])
    # categories (the last tile of each prompt): 4 colour + 4 size questions, 2 fail; 4 positions, 1 fails; the
    # shape itself is still drawn
    assert values["dpg_shapes_attribute"] == pytest.approx(6 / 8)
    assert values["dpg_shapes_relation"] == pytest.approx(3 / 4) and values["dpg_shapes_entity"] == 1.0
    table = scorer.summary_markdown()
    assert "| L2 | attribute - color | 75.00 |" in table and "| L2 | attribute - size | 75.00 |" in table
    assert "no published counterpart" in table


def test_scorer_refuses_other_than_four_images_per_prompt(tmp_path):
    pset = shapes_dpg_set("verbose_2", 1)
    image = render_scene(prompt_set("verbose_2", 1)[0].scene, 32)
    scorer = DPGScorer(needs_model=False)
    with pytest.raises(ValueError, match="4 images per prompt"):
        scorer.score(pset, records_for(tmp_path, [[image] * 2], pset.prompts))


class RecordedVQA:
    """Answers read from a recording: {question: answer}."""
    name = "blip"

    def __init__(self, answers):
        self.answers = answers

    def answer(self, images, questions):
        return [self.answers[q] for q in questions]

    def record(self):
        return {"vqa": "recorded"}


def test_published_set_reads_ellas_prompts_for_the_tables_items_and_labels_a_variant(tmp_path):
    import csv

    def row(item, qid, parents):
        return {"item_id": item, "text": "", "keywords": "", "proposition_id": str(qid), "dependency": parents,
                "category_broad": "", "category_detailed": "", "tuple": "entity - whole (x)",
                "question_natural_language": "?"}

    prompts = D.prompts()
    # ELLA drops the first row: item 0's second question then depends on a missing one, and item 0 is skipped
    rows = [row("0", 1, "0"), row("0", 2, "1"), row("1", 1, "0"), row("1", 2, "1"), row("10", 1, "0")]
    path = tmp_path / "dpg_bench.csv"
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, D.CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    pset = dpg_bench_set(path)
    assert pset.meta["item_ids"] == ["0", "1", "10"] and pset.prompts == [prompts[i] for i in ("0", "1", "10")]
    assert pset.meta["published_table"] is False
    scorer = DPGScorer("blip", needs_model=False)
    scorer.vqa = RecordedVQA({"?": "yes"})
    image = Image.new("RGB", (8, 8), "white")
    values, details = scorer.score(pset, records_for(tmp_path, [[image] * 4] * 3, pset.prompts))
    assert values["dpg_blip_score"] == 1.0                            # item 0 skipped, as ELLA's script does
    assert "skipped" in details[0] and details[4]["dpg_blip_score"] == 1.0
    assert "NOT comparable" in scorer.summary_markdown()
    unknown = [{**rows[2], "item_id": "not-an-item"}]
    with (tmp_path / "bad.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, D.CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(rows[:1] + unknown)
    with pytest.raises(ValueError, match="DPG-Bench's prompts do not"):
        dpg_bench_set(tmp_path / "bad.csv")
    assert json.dumps(scorer.record())  # the protocol record is JSON


def test_question_table_of_shapes_records_keeps_every_row():
    records = prompt_set("verbose_2", 3)
    items = question_table(records)
    assert [len(items[r.id].questions) for r in records] == [10, 10, 10]

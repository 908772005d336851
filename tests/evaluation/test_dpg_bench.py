"""DPG-Bench: the shipped prompts are ELLA's files, and recorded answers score exactly as ELLA's
compute_dpg_bench.py scores them (expected values worked out by hand from its rules, quirks included)."""

import hashlib

import numpy as np
import pytest
from PIL import Image

from llm4gen.evaluation import dpg_bench as D


def test_shipped_prompts_are_ellas_prompt_folder_byte_for_byte():
    prompts = D.prompts()
    assert len(prompts) == D.PROMPTS == 1065
    # the git tree id of dpg_bench/prompts/ at ELLA's commit: every file's name and bytes
    assert D.git_tree_id({f"{k}.txt": v.encode("utf-8") for k, v in prompts.items()}) == D.PROMPTS_TREE
    assert hashlib.sha256((D.DATA / "prompts.jsonl").read_bytes()).hexdigest() == D.PROMPTS_FILE_SHA256
    assert (D.DATA / "LICENSE").read_text().lstrip().startswith("Apache License")


def test_git_blob_id_is_gits_and_a_table_of_ones_own_is_not_the_published_one(tmp_path):
    assert D.git_blob_id(b"hello\n") == "ce013625030ba8dba906f756967f9e9ca394464a"  # `git hash-object` of it
    table = tmp_path / "dpg_bench.csv"
    table.write_text(",".join(D.CSV_COLUMNS) + "\n")
    assert not D.is_published_table(table)


def row(item, qid, parents, tuple_, question="?"):
    return {"item_id": item, "text": "", "keywords": "", "proposition_id": str(qid), "dependency": parents,
            "category_broad": "", "category_detailed": "", "tuple": tuple_, "question_natural_language": question}


# Table order matters: ELLA reads a parent's score as zeroed so far, in this order.
ROWS = [
    row("A", 1, "0", "entity - whole (dog)"),             # the first data row: ELLA drops it
    row("A", 2, "1", "attribute - color (dog, brown)"),   # so A depends on a missing question: A is skipped
    row("B", 1, "0", "entity - whole (cat)"),
    row("B", 2, "1", "attribute - color (cat, black)"),
    row("B", 3, "1,4", "relation - spatial (cat, mat, on)"),   # its second parent comes later in the table
    row("B", 4, "0", "entity - whole (mat)"),
    row("B", 5, "0", "global - (indoor)"),
    row("B", 6, "4", "attribute - texture (mat, woven)"),
    row("C", 1, "0", "entity - whole (tree)"),
    row("C", 2, "3", "attribute - color (leaves, green)"),     # parent 3 is zeroed only after 2 was checked
    row("C", 3, "1", "entity - part (leaves)"),
]


def answers(**by_qid):
    return {int(k[1:]): v for k, v in by_qid.items()}


B_TILES = [answers(q1="yes", q2="yes", q3="yes", q4="yes", q5="yes", q6="yes"),
           answers(q1="no", q2="yes", q3="yes", q4="yes", q5="yes", q6="yes"),
           answers(q1="yes", q2="yes", q3="yes", q4="no", q5="yes", q6="yes"),
           answers(q1="Yes", q2="yes", q3="yes", q4="yes", q5="no", q6="yes")]   # "Yes" is not "yes"
C_TILES = [answers(q1="no", q2="yes", q3="yes")] * 4


def test_recorded_answers_score_as_ellas_rules_give_by_hand():
    items = D.read_question_rows(ROWS)
    assert list(items) == ["A", "B", "C"] and list(items["A"].questions) == [2]   # row 0 dropped
    with pytest.raises(D.SkippedItem):
        D.score_item(items["A"], [answers(q2="yes")] * 4)

    b = D.score_item(items["B"], B_TILES)
    # tile 0: all yes -> 6/6. tile 1: q1 no zeroes q2 and q3 -> q4 q5 q6 = 3/6.
    # tile 2: q4 no zeroes q3 (parent 4) and q6 -> q1 q2 q5 = 3/6. tile 3: "Yes" and "no" -> q1 0, q5 0; q2 q3 zeroed
    # (parent 1) -> q4 q6 = 2/6
    assert b.tile_scores == pytest.approx([1, 0.5, 0.5, 2 / 6])
    assert b.score == pytest.approx((1 + 0.5 + 0.5 + 2 / 6) / 4)
    c = D.score_item(items["C"], C_TILES)
    # q2 is checked while its parent q3 still scores 1 (q3 is zeroed afterwards, by q1): q2 keeps its 1 -> 1/3
    assert c.tile_scores == pytest.approx([1 / 3] * 4)

    result = D.aggregate(items, [b, c], ["A"])
    assert result.score == pytest.approx(((1 + 0.5 + 0.5 + 2 / 6) / 4 + 1 / 3) / 2)   # A left out
    # categories read the last tile before zeroing: B q1..q6 = 0 1 1 1 0 1, C q1..q3 = 0 1 1
    assert result.l2 == pytest.approx({"attribute - color": 1.0, "attribute - texture": 1.0, "entity - part": 1.0,
                                       "entity - whole": 1 / 3, "global -": 0.0, "relation - spatial": 1.0})
    # L1 pools its questions: entity = (0 + 1 + 0 + 1) / 4, not the mean of its L2 means (2/3)
    assert result.l1 == pytest.approx({"entity": 0.5, "attribute": 1.0, "relation": 1.0, "global": 0.0})
    assert result.values() == pytest.approx({"dpg_score": result.score, "dpg_global": 0.0, "dpg_entity": 0.5,
                                             "dpg_attribute": 1.0, "dpg_relation": 1.0})
    table = D.category_table(result, "run")
    assert "1 skipped" in table and "| L1 | entity | 50.00 |" in table and "| L2 | entity - whole | 33.33 |" in table


def test_question_table_file_is_read_with_its_first_row_dropped_and_bad_tables_refused(tmp_path):
    import csv

    path = tmp_path / "dpg_bench.csv"
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, D.CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(ROWS)
    assert list(D.read_question_table(path)["B"].questions) == [1, 2, 3, 4, 5, 6]
    assert D.read_question_table(path)["B"].questions[3].parents == (1, 4)
    (tmp_path / "other.csv").write_text("prompt,question\na,b\n")
    with pytest.raises(ValueError, match="lacks the columns"):
        D.read_question_table(tmp_path / "other.csv")
    with pytest.raises(FileNotFoundError, match="dpg_bench.csv"):
        D.read_question_table(tmp_path / "absent.csv")


def test_grid_lays_out_four_images_and_ellas_crops_give_them_back():
    images = [Image.fromarray(np.full((8, 8, 3), 40 * (j + 1), dtype=np.uint8)) for j in range(4)]
    grid = D.grid(images)
    assert grid.size == (16, 16)
    assert np.asarray(grid)[0, 15, 0] == 80 and np.asarray(grid)[15, 0, 0] == 120   # top right, bottom left
    for tile, image in zip(D.tiles(grid, 8), images):
        assert np.array_equal(np.asarray(tile), np.asarray(image))
    with pytest.raises(ValueError, match="4 images"):
        D.grid(images[:3])

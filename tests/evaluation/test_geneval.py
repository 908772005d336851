"""GenEval's rules on constructed detections (thresholds, counting with its exclude clause, colours,
positions, the summary), its shipped prompts, and the whole path on tiny random models."""

import json

import numpy as np
import pytest
from PIL import Image

from llm4gen.evaluation import geneval as G


def det(x0, y0, x1, y1, score=0.99, mask=None):
    return G.Detection((x0, y0, x1, y1), score, mask)


def test_the_shipped_prompts_are_genevals():
    rows = G.metadata()
    assert len(rows) == 553 and G.sha256_of_metadata() == G.METADATA_SHA256
    counts = {t: sum(r["tag"] == t for r in rows) for t in G.TASKS}
    assert counts == {"single_object": 80, "two_object": 99, "counting": 80, "colors": 94, "position": 100,
                      "color_attr": 100}
    quick = G.metadata(per_task=2)
    assert len(quick) == 12 and {r["tag"] for r in quick} == set(G.TASKS)
    assert len(G.object_names()) == 80


def test_detections_are_thresholded_by_task_ordered_and_capped():
    raw = {"dog": [det(0, 0, 1, 1, 0.5), det(0, 0, 1, 1, 0.95), det(0, 0, 1, 1, 0.2)],
           "cat": [det(0, 0, 1, 1, 0.31 + i / 100) for i in range(20)]}
    kept = G.keep_detections(raw, "two_object")
    assert [d.score for d in kept["dog"]] == [0.95, 0.5] and len(kept["cat"]) == 16
    assert kept["cat"][0].score == pytest.approx(0.50)
    counting = G.keep_detections(raw, "counting")
    assert [d.score for d in counting["dog"]] == [0.95] and "cat" not in counting


def test_relative_position_uses_the_shrunk_centre_offset():
    left, right = det(0, 40, 20, 60), det(60, 40, 80, 60)
    assert G.relative_position(left, right) == {"left of"} and G.relative_position(right, left) == {"right of"}
    top, bottom = det(40, 0, 60, 20), det(40, 60, 60, 80)
    assert G.relative_position(top, bottom) == {"above"} and G.relative_position(bottom, top) == {"below"}
    # offset -10 px, boxes 20 + 20 wide: shrunk by 0.1 x 40 = 4 to -6, over the offset's length 10: dx = -0.6
    assert G.relative_position(det(0, 0, 20, 20), det(10, 0, 30, 20)) == {"left of"}
    # offset 3 px against a 4 px shrink: no relation at all
    assert G.relative_position(det(0, 0, 20, 20), det(3, 0, 23, 20)) == set()
    # diagonal: dx = dy = (40 - 4) / 56.6 = 0.64 each, so both relations
    assert G.relative_position(det(40, 40, 60, 60), det(0, 0, 20, 20)) == {"right of", "below"}


def never(found, name):
    raise AssertionError("no colour asked")


def test_counting_needs_the_count_and_its_exclude_clause_refuses_more():
    record = {"tag": "counting", "include": [{"class": "clock", "count": 2}], "exclude": [{"class": "clock", "count": 3}]}
    clocks = lambda n: {"clock": [det(0, 0, 1, 1) for _ in range(n)]}  # noqa: E731
    assert G.judge(record, clocks(2), never)[0]
    assert not G.judge(record, clocks(1), never)[0] and "expected clock>=2, found 1" in G.judge(record, clocks(1), never)[1]
    ok, reason = G.judge(record, clocks(3), never)
    assert not ok and "expected clock<3, found 3" in reason


def test_colour_clauses_count_the_asked_colour_among_the_most_confident_objects():
    record = {"tag": "color_attr", "include": [{"class": "wine glass", "count": 1, "color": "purple"},
                                               {"class": "apple", "count": 1, "color": "black"}]}
    found = {"wine glass": [det(0, 0, 1, 1)], "apple": [det(2, 2, 3, 3)]}
    right = {"wine glass": ["purple"], "apple": ["black"]}
    assert G.judge(record, found, lambda objects, name: right[name])[0]
    wrong = {"wine glass": ["purple"], "apple": ["red"]}
    ok, reason = G.judge(record, found, lambda objects, name: wrong[name])
    assert not ok and "expected black apple>=1, found 0 black; and 1 red" in reason


def test_position_clauses_need_their_target_and_the_relation():
    record = {"tag": "position", "include": [{"class": "teddy bear", "count": 1},
                                             {"class": "dog", "count": 1, "position": ["right of", 0]}]}
    bear = det(0, 40, 20, 60)
    assert G.judge(record, {"teddy bear": [bear], "dog": [det(60, 40, 80, 60)]}, never)[0]
    ok, reason = G.judge(record, {"teddy bear": [bear], "dog": [det(-60, 40, -40, 60)]}, never)
    assert not ok and "expected dog right of target, found left of target" in reason
    ok, reason = G.judge(record, {"dog": [det(60, 40, 80, 60)]}, never)
    assert not ok and "no target for dog" in reason


def test_the_overall_score_is_the_mean_of_the_task_means():
    results = [("single_object", True), ("single_object", False), ("counting", True), ("colors", False),
               ("colors", False), ("colors", True), ("position", False), ("two_object", True), ("color_attr", False)]
    scores = G.summary(results)
    assert scores["single_object"] == 0.5 and scores["colors"] == pytest.approx(1 / 3)
    assert scores["overall"] == pytest.approx((0.5 + 1 + 1 / 3 + 0 + 1 + 0) / 6)


def test_a_colour_crop_is_the_mask_over_grey_cut_to_its_box():
    pixels = np.zeros((10, 10, 3), dtype=np.uint8)
    pixels[..., 0] = 200
    mask = np.zeros((10, 10), dtype=bool)
    mask[2:6, 3:8] = True
    mask[2, 3] = False  # a box corner outside the object: grey
    crop = np.asarray(G.colour_crop(Image.fromarray(pixels), det(*G.box_of(mask), mask=mask)))
    assert G.box_of(mask) == (3.0, 2.0, 7.0, 5.0)
    assert crop.shape == (3, 4, 3)  # PIL's crop box is exclusive: mmdet's last pixel is not included
    assert tuple(crop[0, 0]) == (0x99, 0x99, 0x99) and tuple(crop[1, 1]) == (200, 0, 0)


@pytest.mark.slow
def test_geneval_end_to_end_on_tiny_models_writes_the_six_task_scores(tmp_path):
    from llm4gen.cli import evaluate
    from tests.helpers.scorer_models import build_tiny_clip, build_tiny_mask2former

    detector, clip = build_tiny_mask2former(tmp_path / "m2f"), build_tiny_clip(tmp_path / "clip")
    out = tmp_path / "geneval"
    assert evaluate.main(["--base", "embedded:tiny-sd", "--geneval", "--geneval-limit", "1", "--images-per-prompt",
                          "1", "--steps", "2", "--geneval-detector", str(detector), "--geneval-clip", str(clip),
                          "--output-dir", str(out), "--no-progress"]) == 0
    data = json.loads((out / "scores.json").read_text())
    scores = data["scores"]["geneval"]
    assert set(scores) == {f"geneval_{t}" for t in (*G.TASKS, "overall")}
    assert all(0 <= v <= 1 for v in scores.values())
    assert scores["geneval_overall"] == pytest.approx(np.mean([scores[f"geneval_{t}"] for t in G.TASKS]))
    details = [json.loads(line) for line in (out / "details" / "geneval.geneval.jsonl").read_text().splitlines()]
    assert [d["tag"] for d in details] == list(G.TASKS) and all("correct" in d for d in details)
    assert data["protocol"]["scorers"]["geneval"]["counting_threshold"] == 0.9

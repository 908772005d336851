"""evaluate.py compare's differences with uncertainty: paired over the same prompts and seeds, a bootstrap CI over
prompts, marked when it excludes 0; and the aesthetic vs CLIP score plot (LLM4GEN's Fig. 6)."""

import json

import numpy as np
import pytest

from llm4gen.evaluation.run_comparison import fig6, fig6_points, paired_markdown, paired_rows, per_image_values


def write_run(root, label, aesthetic, clip, seeds=(5, 6), set_name="dense"):
    """A run folder as evaluate.py writes it: 3 prompts x 2 images, per-image aesthetic and clip_score_long."""
    run = root / label
    (run / "details").mkdir(parents=True)
    (run / "prompts").mkdir()
    keys = [(p, j) for p in range(3) for j in range(2)]
    (run / "prompts" / f"{set_name}.json").write_text(json.dumps({
        "prompts": ["a", "b", "c"], "images": [{"prompt_index": p, "image_index": j, "seed": seeds[j] + 1000 * p}
                                               for p, j in keys]}))
    for scorer, values in (("aesthetic", aesthetic), ("clip_score_long", clip)):
        (run / "details" / f"{set_name}.{scorer}.jsonl").write_text("".join(
            json.dumps({"prompt_index": p, "image_index": j, scorer: v}) + "\n" for (p, j), v in zip(keys, values)))
    (run / "scores.json").write_text(json.dumps({"label": label, "scores": {set_name: {
        "aesthetic": float(np.mean(aesthetic)), "clip_score_long": float(np.mean(clip))}}}))
    return run


def test_paired_difference_is_over_the_same_draws_with_a_prompt_bootstrap(tmp_path):
    a = write_run(tmp_path, "ours", [6.0, 6.2, 5.0, 5.4, 6.6, 6.8], [30, 31, 25, 26, 29, 28])
    b = write_run(tmp_path, "base", [5.5, 5.9, 4.8, 5.0, 6.0, 6.1], [30, 30, 26, 26, 30, 29])
    rows = {r["metric"]: r for r in paired_rows(a, b)}
    aes = rows["aesthetic"]
    assert aes["difference"] == pytest.approx(np.mean([0.5, 0.3, 0.2, 0.4, 0.6, 0.7]))
    assert aes["prompts"] == 3 and aes["images"] == 6
    # every prompt's mean difference is positive, so every resample's mean is too: the CI excludes 0
    assert 0 < aes["low"] <= aes["difference"] <= aes["high"] and aes["excludes_zero"]
    clip = rows["clip_score_long"]
    assert clip["difference"] == pytest.approx(np.mean([0, 1, -1, 0, -1, -1])) and not clip["excludes_zero"]
    table = paired_markdown(list(rows.values()), "ours", "base")
    assert "| dense | aesthetic | 6 | 5.55 | +0.45 * |" in table
    assert "| dense | clip_score_long | 28.17 | 28.5 | -0.3333 |" in table


def test_one_prompt_gives_a_difference_but_no_interval(tmp_path):
    a = write_run(tmp_path, "a", [2.0] * 6, [1.0] * 6)
    b = write_run(tmp_path, "b", [1.0] * 6, [1.0] * 6)
    for run in (a, b):   # keep prompt 0 only
        for path in (run / "details").glob("*.jsonl"):
            path.write_text("".join(line + "\n" for line in path.read_text().splitlines()[:2]))
        prompts = json.loads((run / "prompts" / "dense.json").read_text())
        prompts["images"] = prompts["images"][:2]
        (run / "prompts" / "dense.json").write_text(json.dumps(prompts))
    aesthetic = {r["metric"]: r for r in paired_rows(a, b)}["aesthetic"]
    assert aesthetic["difference"] == 1.0 and aesthetic["low"] is None and not aesthetic["excludes_zero"]
    assert "| +1 | none: 1 prompt | 1 |" in paired_markdown([aesthetic], "a", "b")


def test_runs_drawn_with_other_seeds_or_details_that_do_not_give_the_metric_are_not_paired(tmp_path):
    a = write_run(tmp_path, "a", [1.0] * 6, [2.0] * 6)
    b = write_run(tmp_path, "b", [1.0] * 6, [2.0] * 6, seeds=(7, 8))
    assert paired_rows(a, b) == []
    scores = json.loads((a / "scores.json").read_text())
    scores["scores"]["dense"]["aesthetic"] = 9.0   # the details no longer reproduce the set's value
    (a / "scores.json").write_text(json.dumps(scores))
    assert ("dense", "aesthetic") not in per_image_values(a)


def test_fig6_places_each_run_at_its_means_with_bootstrap_intervals(tmp_path):
    runs = [write_run(tmp_path, "ours", [6.0, 6.2, 5.0, 5.4, 6.6, 6.8], [30, 31, 25, 26, 29, 28]),
            write_run(tmp_path, "base", [5.5, 5.9, 4.8, 5.0, 6.0, 6.1], [30, 30, 26, 26, 30, 29])]
    points = fig6_points(runs)
    assert [(p["run"], p["x_metric"]) for p in points] == [("ours", "clip_score_long"), ("base", "clip_score_long")]
    assert points[0]["y"] == pytest.approx(6.0) and points[0]["x"] == pytest.approx(28.1667, abs=1e-3)
    assert points[0]["y_low"] < 6.0 < points[0]["y_high"]
    path = fig6(runs, tmp_path / "fig6.png")
    assert path.is_file() and path.read_bytes()[:4] == b"\x89PNG"

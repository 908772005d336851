"""``python train.py`` as a new user runs it, whole: the embedded default trains the CAM on the shipped
shapes base for 300 steps and ends with pictures of the prompts' objects, scored before and after."""

import csv

import pytest

from llm4gen.lightning_modules.callbacks import read_validation_scores


@pytest.mark.slow
def test_the_default_run_learns_and_ends_with_samples_of_the_prompts_objects(tmp_path, capsys):
    from llm4gen.cli import train
    out = tmp_path / "run"
    assert train.main([f"output_dir={out}", f"data.shards={tmp_path / 'data'}",
                       "trainer.enable_progress_bar=false"]) == 0
    printed = capsys.readouterr().out

    with (out / "logs" / "metrics.csv").open() as handle:
        losses = [float(r["train/loss"]) for r in csv.DictReader(handle) if r.get("train/loss")]
    assert len(losses) == 30 and sum(losses) / len(losses) < 0.5  # over the random base it stays at 1.0

    grids = read_validation_scores(out / "samples")
    assert [g["step"] for g in grids] == [0, 100, 200, 300]
    before, after = grids[0]["scores"], grids[-1]["scores"]
    # seen two-object prompts: the analyzer finds an object of the prompt, in its colour and shape, in
    # at least 90% of the final images (the evidence issue's bar; measured 1.000, 0.750 before training)
    assert after["val/seen_shapes_any_correct"] >= 0.9
    # held-out prompts are scored too, and both sets' before and after are printed with their grids
    assert 0 <= after["val/shapes_binding"] <= 1
    for prefix, grid in (("val/", "grid"), ("val/seen_", "seen_grid")):
        for line in (grids[0], grids[-1]):
            assert f"binding {line['scores'][prefix + 'shapes_binding']:.3f}" in printed
            assert str(out / "samples" / line[grid]) in printed
    assert before != after

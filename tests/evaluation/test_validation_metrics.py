"""Scores during training: the shapes analyzer and CLIPScore on the validation grid's images, logged
to logs/metrics.csv, final_metrics.json and a sweep's summary.csv; the shapes scorer itself."""

import csv
import json
import textwrap

import pytest
from PIL import Image

from llm4gen.cli import sweep as sweep_cli
from llm4gen.cli.train import validation_summary
from llm4gen.configs.schema import load_config
from llm4gen.datamodules.synthetic import write_synthetic_shards
from llm4gen.evaluation.prompt_sets import prompt_set
from llm4gen.evaluation.shapes_scorer import ShapesScorer
from llm4gen.evaluation.validation import ValidationScorer
from llm4gen.lightning_modules.callbacks import GRID_COLUMNS, GRID_SIDE, read_validation_scores
from llm4gen.shapes.world import Scene, ShapeObject, render_scene


def grid_images(grid: Image.Image, n: int, side: int = GRID_SIDE, columns: int = GRID_COLUMNS, size: int = 32):
    """The ``n`` sampled images of a validation grid (rows of ``columns`` cells, each image nearest-upscaled
    to ``side`` at the cell's top left, 6 px in, 4 px down), back at their ``size``."""
    rows = -(-n // columns)
    cell_w, cell_h = grid.width // columns, grid.height // rows
    return [grid.crop(((i % columns) * cell_w + 6, (i // columns) * cell_h + 4,
                       (i % columns) * cell_w + 6 + side, (i // columns) * cell_h + 4 + side)).resize((size, size), Image.NEAREST)
            for i in range(n)]

def test_shapes_scorer_gives_ground_truth_full_binding_and_swapped_colours_none():
    records = prompt_set("seen_2", 6)
    truth = [render_scene(r.scene, 64) for r in records]
    prompts = [r.text for r in records]
    scores = ShapesScorer().score_images(truth, prompts)
    assert scores["binding"] == 1.0 and scores["all_bound"] == 1.0 and scores["parsed"] == 1.0
    def scene(circle_colour, square_colour):
        return Scene((ShapeObject(circle_colour, "circle", "large", 0, 0.9, (0.5, 0.5)),
                      ShapeObject(square_colour, "square", "large", 3, 0.9, (0.5, 0.5))))

    red_circle_blue_square, swapped = scene("red", "blue"), scene("blue", "red")
    scores = ShapesScorer().score_images([render_scene(swapped, 64), render_scene(red_circle_blue_square, 64)],
                                         ["a large red circle and a large blue square"] * 2)
    assert scores["binding"] == 0.5 and scores["shape"] == 1.0  # the swapped image binds nothing


def test_prompts_outside_the_shapes_grammar_are_skipped():
    image = render_scene(prompt_set("seen_1", 1)[0].scene, 64)
    scores = ShapesScorer().score_images([image, image], [prompt_set("seen_1", 1)[0].text, "a photo of a cat"])
    assert scores["parsed"] == 0.5 and scores["binding"] == 1.0
    assert ShapesScorer().score_images([image], ["a photo of a cat"]) == {}
    assert ValidationScorer([])([image], ["x"]) == {}
    with pytest.raises(ValueError, match="validation.metrics"):
        ValidationScorer(["fid"])


@pytest.mark.slow
def test_validation_scores_reach_metrics_csv_final_metrics_and_the_sweep_summary(tmp_path):
    from llm4gen.evaluation.scorers import ClipScoreScorer
    from tests.helpers.scorer_models import build_tiny_clip

    clip = build_tiny_clip(tmp_path / "clip", seed=3)
    shards = tmp_path / "shards"
    write_synthetic_shards(str(shards), num_samples=16, samples_per_shard=16, resolution=32, seed=0)
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(f"config: configs/tiny.yaml\noutput_root: {tmp_path / 'out'}\n" + textwrap.dedent(f"""
        base_overrides:
          - trainer.max_steps=4
          - data.shards={shards}
          - data.synthetic_if_missing=false
          - data.batch_size=4
          - validation.num_inference_steps=2
          - trainer.enable_progress_bar=false
          - validation.metrics=[shapes,clip_score]
          - validation.clip_model={clip}
        grid:
          validation.every_n_steps: [2]
    """))
    assert sweep_cli.main([str(sweep_file)]) == 0
    run = tmp_path / "out" / "validation.every_n_steps=2"
    with (run / "logs" / "metrics.csv").open() as handle:
        rows = [r for r in csv.DictReader(handle) if r.get("val/clip_score")]
    assert [int(r["step"]) for r in rows] == [0, 2, 4]  # validation.at_start: the "before" at step 0
    assert all(r["val/shapes_binding"] != "" and r["val/shapes_parsed"] == "1.0" for r in rows)

    # the logged CLIPScore is the score of the grid's images (PNG: lossless) against the prompts
    prompts = list(load_config().validation.prompts)
    grid = Image.open(run / "samples" / "step_0000004.png").convert("RGB")
    images = grid_images(grid, len(prompts))
    scorer = ClipScoreScorer(str(clip))
    scorer.load()
    assert float(rows[-1]["val/clip_score"]) == pytest.approx(scorer.score_images(images, prompts)[0], abs=1e-4)

    # samples/scores.jsonl: a line per grid, the numbers logged at that step; train.py prints first and last
    lines = read_validation_scores(run / "samples")
    assert [(line["step"], line["grid"], line["seen_grid"]) for line in lines] == [
        (step, f"step_{step:07d}.png", f"step_{step:07d}_seen.png") for step in (0, 2, 4)]
    assert lines[-1]["scores"]["val/clip_score"] == pytest.approx(float(rows[-1]["val/clip_score"]))
    # the seen prompts: their own grid, scored apart under val/seen_
    seen_prompts = list(load_config().validation.seen_prompts)
    seen_grid = Image.open(run / "samples" / "step_0000004_seen.png").convert("RGB")
    seen_images = grid_images(seen_grid, len(seen_prompts))
    seen_shapes = ShapesScorer().score_images(seen_images, seen_prompts)
    assert lines[-1]["scores"]["val/seen_shapes_binding"] == pytest.approx(seen_shapes["binding"])
    assert lines[-1]["scores"]["val/seen_clip_score"] == pytest.approx(scorer.score_images(seen_images, seen_prompts)[0],
                                                                     abs=1e-4)
    assert float(rows[-1]["val/seen_shapes_any_correct"]) == pytest.approx(seen_shapes["any_correct"])
    summary_text = validation_summary(run / "samples")
    assert "before step      0: binding" in summary_text and "after  step      4" in summary_text
    assert str(run / "samples" / "step_0000004.png") in summary_text
    assert "validation.seen_prompts:" in summary_text and str(run / "samples" / "step_0000004_seen.png") in summary_text

    final = json.loads((run / "final_metrics.json").read_text())
    assert final["val/clip_score"] == pytest.approx(float(rows[-1]["val/clip_score"]))
    with (tmp_path / "out" / "summary.csv").open() as handle:
        summary = list(csv.DictReader(handle))
    assert float(summary[0]["val/clip_score"]) == pytest.approx(final["val/clip_score"])
    assert float(summary[0]["val/shapes_binding"]) == pytest.approx(final["val/shapes_binding"])


def test_the_default_validation_prompts_are_the_held_out_and_seen_two_object_sets():
    assert list(load_config().validation.prompts) == [r.text for r in prompt_set("heldout_2", 16)]
    assert list(load_config().validation.seen_prompts) == [r.text for r in prompt_set("seen_2", 16)]
    paper = load_config("configs/llm4gen_sd15.yaml")
    assert list(paper.validation.seen_prompts) == []  # not shapes prompts: no seen grid

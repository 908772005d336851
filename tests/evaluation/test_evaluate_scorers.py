"""Every requested prompt set gets a score or a refusal: the shapes analyzer scores a plain prompt file of
shapes-world captions, evaluate.py refuses an impossible scorer / set pair before any model loads or any image is
generated, and an evaluation never writes an empty table silently (issue 50, item 4)."""

import json
import random

import pytest

from llm4gen.cli import evaluate
from llm4gen.evaluation.prompts import PromptSet
from llm4gen.evaluation.runner import Evaluation, EvaluationError, plan_images
from llm4gen.evaluation.scorers import ClipScoreScorer, FIDScorer, Scorer
from llm4gen.evaluation.shapes_scorer import ShapesScorer
from llm4gen.shapes.world import caption, render_scene, sample_scene

NOT_SHAPES = ["a photo of a cat on a sofa", "a red circle and a blue square", "two green dogs"]


def shapes_captions(n=4, seed=0):
    """Captions of random scenes in several phrasings, and the scenes (their ground truth)."""
    rng = random.Random(seed)
    scenes = [sample_scene(rng, "seen", 1 + i % 3) for i in range(n)]
    return [caption(s, phrasing) for s, phrasing in zip(scenes, ("list", "colored", "dense", "list"))], scenes


def test_the_shapes_scorer_scores_a_plain_prompt_file_of_shapes_captions(tmp_path):
    prompts, scenes = shapes_captions()
    prompt_set = PromptSet("mine", prompts)  # what --prompts FILE builds: kind "prompts"
    scorer = ShapesScorer()
    assert scorer.cannot_score(prompt_set) is None and scorer.applies(prompt_set)
    records = plan_images(tmp_path, prompt_set, 1, 0)
    for record, scene in zip(records, scenes):  # the ground truth drawn: every object bound
        record.path.parent.mkdir(parents=True, exist_ok=True)
        render_scene(scene, 64).save(record.path)
    values, details = scorer.score(prompt_set, records)
    assert values["shapes_binding"] == values["shapes_all_bound"] == 1.0 and len(details) == len(prompts)
    assert [len(d["categories"]) for d in details] == [len(s.objects) for s in scenes]


def test_a_prompt_file_the_caption_grammar_cannot_read_is_refused_naming_its_lines():
    reason = ShapesScorer().cannot_score(PromptSet("mine", NOT_SHAPES))
    assert "2 of its 3 prompts" in reason and "line 1: 'a photo of a cat on a sofa'" in reason
    assert "line 3: 'two green dogs'" in reason and "clip_score" in reason
    assert "not a coco set" in ShapesScorer().cannot_score(PromptSet("coco", ["a red circle"], kind="coco"))
    assert "--fid-reference" in FIDScorer().cannot_score(PromptSet("mine", ["x"]))
    assert ClipScoreScorer().cannot_score(PromptSet("mine", NOT_SHAPES)) is None  # reads any prompt


def refusal(capsys, monkeypatch, tmp_path, *args):
    """evaluate.py's exit code and stderr with loading any sampler or scorer model made a test failure."""
    monkeypatch.setattr(evaluate, "load_sampler", lambda *a, **k: pytest.fail("a model was loaded"))
    monkeypatch.setattr(Scorer, "load", lambda self: pytest.fail("a scorer loaded"))
    monkeypatch.setattr(ShapesScorer, "load", lambda self: pytest.fail("a scorer loaded"))
    code = evaluate.main(["--base", "embedded:tiny-sd", "--output-dir", str(tmp_path / "out"), *args])
    return code, capsys.readouterr().err.strip()


def test_evaluate_refuses_an_impossible_scorer_and_set_before_any_work(tmp_path, monkeypatch, capsys):
    mine = tmp_path / "my_prompts.txt"
    mine.write_text("\n".join(NOT_SHAPES) + "\n")
    code, err = refusal(capsys, monkeypatch, tmp_path, "--prompts", str(mine), "--scorers", "shapes")
    assert code == 2 and err.startswith("evaluate.py: error: ") and "\n" not in err
    assert "shapes cannot score prompt set 'my_prompts' (--prompts)" in err and "clip_score" in err
    assert not (tmp_path / "out").exists()
    # FID without reference images on the benchmark's own set
    code, err = refusal(capsys, monkeypatch, tmp_path, "--shapes", "seen_1", "--scorers", "shapes,fid")
    assert code == 2 and "fid cannot score prompt set 'seen_1' (--shapes)" in err and "--fid-reference" in err
    # no --scorers: a file the analyzer cannot read would get no scorer at all, an empty table
    code, err = refusal(capsys, monkeypatch, tmp_path, "--prompts", str(mine))
    assert code == 2 and "no scorer scores prompt set 'my_prompts'" in err and not (tmp_path / "out").exists()


def test_an_evaluation_never_writes_an_empty_table_silently(tmp_path):
    prompt_set = PromptSet("mine", NOT_SHAPES)
    evaluation = Evaluation(tmp_path, [prompt_set], [ShapesScorer()], images_per_prompt=1, progress=False)
    plan = evaluation.plan()
    for record in plan["mine"]:
        record.path.parent.mkdir(parents=True, exist_ok=True)
        render_scene(sample_scene(random.Random(0), "seen", 1), 32).save(record.path)
    with pytest.raises(EvaluationError, match="no scorer scored prompt set 'mine'"):
        evaluation.score(plan)


@pytest.mark.slow
def test_evaluate_scores_a_shapes_caption_file_end_to_end(tmp_path, capsys):
    """The issue's command, as a new user runs it, on the tiny base: images, then a table with the analyzer's
    numbers for the file's set (it printed an empty table and exited 0 before)."""
    prompts, _ = shapes_captions(3)
    mine = tmp_path / "my_shapes_prompts.txt"
    mine.write_text("\n".join(prompts) + "\n")
    out = tmp_path / "out"
    assert evaluate.main(["--base", "embedded:tiny-sd", "--prompts", str(mine), "--scorers", "shapes", "--steps", "1",
                          "--images-per-prompt", "1", "--output-dir", str(out), "--no-progress"]) == 0
    scores = json.loads((out / "scores.json").read_text())["scores"]
    assert set(scores) == {"my_shapes_prompts"} and 0.0 <= scores["my_shapes_prompts"]["shapes_binding"] <= 1.0
    assert {"shapes_bound", "shapes_missing_object", "shapes_exact"} <= set(scores["my_shapes_prompts"])
    assert "shapes_binding" in capsys.readouterr().out  # the printed table is not empty
    assert len(list((out / "images").rglob("*.png"))) == 3

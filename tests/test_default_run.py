"""``python train.py`` as a new user runs it, whole: the embedded default trains the CAM on the shipped
shapes base for 300 steps and ends with pictures of the prompts' objects, scored before and after."""

import csv
import re
from pathlib import Path

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
    check_readme_excerpt(printed, out)


NUMBER = re.compile(r"\d+(?:\.\d+)?")
README = Path(__file__).resolve().parents[1] / "README.md"


def readme_excerpt() -> list[str]:
    """The lines of the README's default-run output block (after its marker comment)."""
    text = README.read_text()
    block = text.split("<!-- default-run-output:", 1)[1].split("```", 2)[1]
    return [line for line in block.splitlines() if line.strip()]


def check_readme_excerpt(printed: str, out: Path) -> None:
    """Every README line (but the progress bar and the elided "...") is a printed line with the same words,
    its scores within one image of 16 (0.0625) and its other numbers equal: the README shows what the
    command prints."""
    lines = [line.rstrip() for line in printed.replace(str(out), "runs/tiny").splitlines()]
    shape = lambda line: NUMBER.sub("#", line).strip()  # noqa: E731
    for expected in readme_excerpt():
        if expected.startswith("step ") or expected.strip() == "...":
            continue  # the progress bar (off in this test) and the elided folder listing
        integers = lambda line: [v for v in NUMBER.findall(line) if "." not in v]  # noqa: E731 (steps, sizes)
        matches = [line for line in lines if shape(line) == shape(expected) and integers(line) == integers(expected)]
        assert matches, f"the README shows {expected!r}, the run printed no such line"
        want = [float(v) for v in NUMBER.findall(expected) if "." in v]
        got = [float(v) for v in NUMBER.findall(matches[0]) if "." in v]
        assert all(abs(a - b) <= 0.0625 for a, b in zip(want, got)), (expected, matches[0])

"""The miniature experiment's report: arms read from configs, statistics over seeds, the verdict lines,
and a whole (tiny) sweep reported end to end."""

import json
import math

import pytest

from evaluation.experiment import (
    ARMS, SETS, Evaluated, arm_of, comparisons, main, markdown, mean_std, split_categories, summarize,
)


def model(enabled=True, unet="frozen", lam=0.0):
    return {"adapter": {"enabled": enabled}, "unet_training": unet, "objective": {"lambda_entity": lam}}


def test_arms_are_read_from_the_resolved_model_config():
    assert arm_of(model(enabled=False, unet="full")) == "b"
    assert arm_of(model()) == "c"
    assert arm_of(model(unet="full")) == "d"
    assert arm_of(model(unet="full", lam=0.01)) == "e"
    assert arm_of({"adapter": {}, "unet_training": "lora", "objective": {"lambda_entity": 0}}) == "d"


def test_mean_and_sample_std():
    assert mean_std([0.5]) == (0.5, 0.0)
    mean, std = mean_std([0.2, 0.4, 0.6])
    assert mean == pytest.approx(0.4) and std == pytest.approx(0.2)


def scores(binding, color=None):
    return {name: {"shapes_binding": binding[i] if isinstance(binding, list) else binding,
                   "shapes_color": color if color is not None else 0.5, "shapes_shape": 1.0, "shapes_size": 0.25}
            for i, name in enumerate(SETS)}


def test_summaries_per_set_and_per_split_category():
    results = [Evaluated("b", s, None, scores(0.1 * (s + 1))) for s in range(3)]
    results += [Evaluated("d", s, None, scores([0.5, 0.5, 0.5, 0.6, 0.6 + 0.01 * s, 0.7], color=0.2 * s)) for s in range(3)]
    table = summarize(results)
    assert list(table) == ["b", "d"]
    mean, std, n = table["b"]["heldout_2"]
    assert (mean, n) == (pytest.approx(0.2), 3) and std == pytest.approx(0.1)
    assert table["d"]["heldout_2"][0] == pytest.approx(0.61)
    cats = split_categories(results)
    assert cats["d"]["heldout color"][0] == pytest.approx(0.2) and cats["d"]["seen size"] == (0.25, 0.0, 3)
    text = markdown(table)
    assert "| (d) CAM + UNet ft | 3 | 0.500 ± 0.000" in text and text.count("\n") == 3
    lines = comparisons(table)
    # heldout_2: 0.61 - 0.2 = 0.41 > spread 0.1; the verdict names both numbers
    assert any("beats (b) on heldout_2: 0.610 vs 0.200" in line for line in lines)
    assert all(not line.startswith("- (e)") for line in lines)  # no (e) runs, no (e) verdict


def test_a_difference_inside_the_spread_is_called_so():
    table = {"b": {"heldout_2": (0.5, 0.1, 3), "heldout_3": (0.5, 0.0, 3)},
             "d": {"heldout_2": (0.55, 0.02, 3), "heldout_3": (0.3, 0.05, 3)}}
    lines = comparisons(table)
    assert "is within the seed spread of (b) on heldout_2" in lines[0]
    assert "loses to (b) on heldout_3" in lines[1]


@pytest.mark.slow
def test_a_tiny_sweep_trains_and_is_reported(tmp_path, monkeypatch):
    """Two arms x two seeds through sweep.py on the random tiny base, then the report: table, plot, grids."""
    import sweep

    monkeypatch.chdir(tmp_path)
    config = tmp_path / "experiment.yaml"
    config.write_text(
        "model: {base: {pretrained: 'embedded:tiny-sd'}, objective: {entity_parser: shapes}}\n"
        "data: {shards: data, synthetic_if_missing: false, batch_size: 4}\n"
        "validation: {every_n_steps: 0}\n"
        "trainer: {max_steps: 2, enable_progress_bar: false}\n")
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(
        f"config: {config}\noutput_root: {tmp_path / 'runs'}\n"
        "runs:\n  - {model.adapter.enabled: false, model.unet_training: full}\n  - {model.unet_training: frozen}\n"
        "grid: {seed: [0, 1]}\n")
    import evaluation.experiment as experiment

    monkeypatch.setattr(experiment, "DATA_SAMPLES", 24)
    assert main(["data", str(sweep_file)]) == 0
    assert sorted(p.name for p in (tmp_path / "data").glob("*.tar")) == ["shard-000000.tar"]
    assert sweep.main([str(sweep_file)]) == 0
    assert main(["report", str(sweep_file), "--limit", "2", "--steps", "2"]) == 0
    out = tmp_path / "runs" / "report"
    results = json.loads((out / "results.json").read_text())
    assert sorted((r["arm"], r["seed"]) for r in results["runs"]) == [
        ("a", 0), ("a", 1), ("b", 0), ("b", 1), ("c", 0), ("c", 1)]
    assert set(results["binding"]) == {"a", "b", "c"}
    for row in results["binding"].values():
        assert set(row) == set(SETS) and all(n == 2 and 0 <= m <= 1 and not math.isnan(s) for m, s, n in row.values())
    report = (out / "report.md").read_text()
    assert all(ARMS[arm] in report for arm in "abc")
    from PIL import Image

    assert Image.open(out / "binding.png").size[0] > 500
    for arm in "abc":  # 2 prompts per set at 32 px, doubled: 2 x 64 wide, 6 rows of 64
        assert Image.open(out / f"grid_{arm}.png").size == (128, 384)
    # a second report generates nothing and gives the same numbers
    first = results["binding"]
    assert main(["report", str(sweep_file), "--limit", "2", "--steps", "2"]) == 0
    assert json.loads((out / "results.json").read_text())["binding"] == first


def test_report_without_finished_runs_says_what_to_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "experiment.yaml"
    config.write_text("model: {base: {pretrained: 'embedded:tiny-sd'}}\ndata: {shards: data}\n")
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(f"config: {config}\noutput_root: {tmp_path / 'runs'}\ngrid: {{seed: [0]}}\n")
    assert main(["report", str(sweep_file), "--limit", "1", "--steps", "1"]) == 2
    assert "python sweep.py" in capsys.readouterr().err

"""The connector comparison's decision rules (docs/connectors/protocol.md) on records whose outcome is known,
and its sweep: four kinds x three seeds on the evidence recipe, UNet frozen, every config valid."""

from __future__ import annotations

import random

import pytest

from llm4gen.experiments import connectors
from llm4gen.experiments.shapes_evidence import ObjectRecord
from llm4gen.launch.slurm import load_experiment_config
from llm4gen.launch.sweep import expand_runs, load_sweep


def records(shares: dict[str, float], sets=("seen_1", "phrased_2"), scenes=40, seeds=(0, 1, 2), seed=0):
    """Per arm, objects drawn bound with the given probability, on the same (seed, set, prompt) keys."""
    rng = random.Random(seed)
    out = []
    for arm, share in shares.items():
        for s in seeds:
            for name in sets:
                for prompt in range(scenes):
                    bound = rng.random() < share
                    out.append(ObjectRecord(arm, s, name, prompt, 0, f"scene-{prompt}", "list", 1,
                                            "bound" if bound else "missing_object", "short"))
    return out


def test_a_clear_gain_is_better_a_clear_loss_worse_and_a_small_one_neither():
    data = records({"a": 0.9, "cam": 0.5, "mlp": 0.95, "ella": 0.1, "lavi_bridge": 0.51})
    verdicts = connectors.verdicts(data, ["a", "cam", "mlp", "ella", "lavi_bridge"])
    assert verdicts["mlp"]["short"]["class"] == "better"
    assert verdicts["ella"]["short"]["class"] == "worse"
    assert verdicts["lavi_bridge"]["short"]["class"] == "no difference shown"
    assert verdicts["mlp"]["outside"]["class"] == "not measured"  # no verbose objects in these records


def test_an_arm_that_damages_the_base_is_never_called_better():
    data = records({"a": 0.95, "cam": 0.2, "mlp": 0.6})
    assert connectors.damages_base(data, "mlp") and connectors.damages_base(data, "cam")
    assert connectors.verdicts(data, ["a", "cam", "mlp"])["mlp"]["short"]["class"].startswith("better, but it damages")


@pytest.mark.parametrize("shares, outcome", [
    ({"a": 0.9, "mlp": 0.82, "ella": 0.97}, "replicates"),
    ({"a": 0.9, "mlp": 0.5, "ella": 0.9}, "not decided (mlp damages the base)"),
    ({"a": 0.9, "mlp": 0.9, "ella": 0.5}, "contradicted"),
    ({"a": 0.9, "mlp": 0.85, "ella": 0.86}, "not decided"),
    ({"a": 0.95, "mlp": 0.2, "ella": 0.6}, "not decided (ella and mlp damage the base)"),
])
def test_ellas_ablation_is_read_by_the_protocols_rule(shares, outcome):
    assert connectors.ella_ablation(records(shares))["outcome"] == outcome


def test_the_sweep_trains_four_kinds_at_three_seeds_with_the_unet_frozen():
    spec = load_sweep("configs/sweeps/connectors.yaml")
    runs = expand_runs(spec)
    assert len(runs) == 12
    seen = set()
    for run in runs:
        cfg = load_experiment_config(spec.config, [*spec.base_overrides, *run.override_args])
        seen.add((cfg.model.adapter.kind, cfg.seed))
        assert cfg.model.unet_training == "frozen" and cfg.trainer.max_steps == 300
        assert cfg.model.objective.lambda_entity == 0 and cfg.model.llm.max_length == 192
        assert connectors.arm_of(dict(cfg.model)) == cfg.model.adapter.kind
    assert seen == {(kind, seed) for kind in ("cam", "mlp", "lavi_bridge", "ella") for seed in (0, 1, 2)}


@pytest.mark.slow
def test_a_tiny_comparison_runs_end_to_end(tmp_path, monkeypatch):
    """Data, cam and ella x one seed for two steps on the random tiny base, and the report."""
    import json

    from llm4gen.cli import sweep as sweep_entry
    from llm4gen.experiments import shapes_evidence as evidence

    monkeypatch.chdir(tmp_path)
    text = (evidence.ROOT / "configs" / "shapes_evidence.yaml").read_text()
    for old, new in (("runs/shapes-evidence/cache", str(tmp_path / "cache")), ("  batch_size: 16", "  batch_size: 4")):
        text = text.replace(old, new)
    config = tmp_path / "experiment.yaml"
    config.write_text(text)
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(f"config: {config}\noutput_root: {tmp_path / 'runs'}\n"
                     "base_overrides: ['model.base.pretrained=embedded:tiny-sd', trainer.max_steps=2]\n"
                     "runs:\n  - {model.adapter.kind: cam}\n"
                     "  - {model.adapter.kind: ella, model.adapter.ella.width: 64, model.adapter.ella.num_blocks: 1,"
                     " model.adapter.ella.num_latents: 8, model.adapter.ella.time_channels: 16}\n"
                     "grid: {seed: [0]}\n")
    tiny = evidence.Protocol(data_samples=16, samples_per_shard=8, sampling_steps=1, eval_batch=4, prompts_per_set=2)
    evidence.write_data(load_sweep(str(sweep)), tiny, log=lambda *a: None)
    assert sweep_entry.main([str(sweep)]) == 0
    report = connectors.report(str(sweep), jobs=1, log=lambda *a: None, protocol=tiny)
    results = json.loads((report / "results.json").read_text())
    assert {row[0] for row in results["objects"]} == {"a", "cam", "ella"}
    assert set(results["verdicts"]) == {"ella"} and set(results["verdicts"]["ella"]) == set(connectors.SUBSETS)
    assert results["sizes"]["ella"]["params"] > 0 and results["sizes"]["cam"]["step_seconds"] > 0
    assert "| ella |" in (report / "report.md").read_text()

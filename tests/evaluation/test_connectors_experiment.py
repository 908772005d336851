"""The connector comparison's decision rules (docs/connectors/protocol.md, protocol_lora.md) on records whose
outcome is known, and its sweeps: four kinds x three seeds on the evidence recipe, UNet frozen or with LoRA,
every config valid."""

from __future__ import annotations

import json
import random

import pytest

from llm4gen.experiments import connectors
from llm4gen.experiments.evidence_tasks import ObjectRecord
from llm4gen.launch.slurm import load_experiment_config
from llm4gen.launch.sweep import expand_runs, load_sweep
from tests.helpers.experiments import TINY_PROTOCOL, tiny_experiment_config


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


def test_a_lora_sweep_is_read_against_cam_lora_and_its_ablation_pairs_the_lora_arms():
    data = records({"a": 0.9, "cam+lora": 0.5, "mlp+lora": 0.85, "ella+lora": 0.1, "lavi_bridge+lora": 0.51})
    arms, variant = connectors.sweep_arms([r.arm for r in data])
    assert arms == ["a", "cam+lora", "mlp+lora", "lavi_bridge+lora", "ella+lora"] and variant == "+lora"
    verdicts = connectors.verdicts(data, arms, reference="cam+lora")
    assert set(verdicts) == {"mlp+lora", "ella+lora", "lavi_bridge+lora"}
    assert verdicts["mlp+lora"]["short"]["class"] == "better" and verdicts["ella+lora"]["short"]["class"] == "worse"
    ablation = connectors.ella_ablation(data, variant="+lora")
    assert ablation["outcome"] == "contradicted" and ablation["difference"]["mean"] < -0.5
    assert connectors.label("cam+lora") == "cam (LLM4GEN)+lora" and connectors.label("a") == "(a) base"


def test_a_rate_cell_pools_the_seeds_and_lists_each():
    data = [ObjectRecord("cam", seed, "seen_1", prompt, 0, f"scene-{prompt}", "list", 1,
                         "bound" if prompt < bound else "missing_object", "short")
            for seed, bound in ((0, 1), (1, 3)) for prompt in range(4)]
    assert connectors.rate_cell(data, "cam", "seen_1") == "0.500 (0.25 / 0.75)"
    assert connectors.rate_cell(data, "cam", "outside") == "-" and connectors.rate_cell(data, "mlp", "seen_1") == "-"


def test_a_sweep_that_mixes_frozen_and_lora_arms_is_refused():
    with pytest.raises(ValueError, match=r"mix \['', '\+lora'\]"):
        connectors.sweep_arms(["a", "cam", "mlp+lora"])
    with pytest.raises(ValueError, match="no connector protocol for the variant '\+full'"):
        connectors.sweep_arms(["a", "cam+full"])


def test_lora_effects_pair_each_lora_arm_with_its_frozen_kind():
    frozen = records({"a": 0.9, "cam": 0.3, "ella": 0.05, "mlp": 0.5})
    lora = records({"a": 0.9, "cam+lora": 0.3, "ella+lora": 0.8, "mlp+lora": 0.1})
    effects = connectors.lora_effects(lora, frozen, ["a", "cam+lora", "mlp+lora", "ella+lora"])
    assert effects["outcome"] == "measured" and set(effects["by_kind"]) == {"cam", "mlp", "ella"}
    by_kind = effects["by_kind"]
    assert by_kind["ella"]["short"]["class"] == "LoRA helps" and by_kind["mlp"]["short"]["class"] == "LoRA hurts"
    assert by_kind["cam"]["short"]["class"] == "no difference shown"
    assert by_kind["ella"]["short"]["difference"]["mean"] > 0.6 and by_kind["ella"]["outside"]["difference"] is None


def test_lora_effects_are_not_measured_when_the_base_drew_otherwise():
    frozen = records({"a": 0.9, "cam": 0.3})
    lora = records({"a": 0.9, "cam+lora": 0.8}, seed=1)  # other draws: the base's outcomes differ
    effects = connectors.lora_effects(lora, frozen, ["a", "cam+lora"])
    assert effects["outcome"] == "not measured" and "the base's outcome differs on" in effects["reason"]
    fewer = records({"a": 0.9, "cam+lora": 0.8}, seeds=(0, 1))
    assert "different prompts or seeds" in connectors.lora_effects(fewer, frozen, ["a", "cam+lora"])["reason"]


def test_the_shipped_frozen_records_load_with_their_base_and_every_kind():
    frozen = connectors.load_records(connectors.FROZEN_RESULTS)
    assert {r.arm for r in frozen} == {"a", "cam", "mlp", "lavi_bridge", "ella"}
    assert {r.seed for r in frozen} == {0, 1, 2}
    assert connectors.base_agrees(frozen, frozen) is None


def test_the_shipped_lora_report_plots_every_difference_against_cam_lora_and_what_lora_does(tmp_path):
    recorded = connectors.evidence_report.read_results(connectors.evidence_protocol.ROOT / "docs/connectors/lora/results.json.gz")
    rows = connectors.plot_rows(recorded["verdicts"], recorded["lora_effects"], recorded["reference"])
    assert len(rows) == 3 * 4 + 4 * 4  # three arms against cam+lora, four kinds against their frozen selves
    labels = dict(rows)
    assert labels["ella+lora - cam+lora, short"].mean == recorded["verdicts"]["ella+lora"]["short"]["difference"]["mean"]
    assert "lavi_bridge+lora - lavi_bridge (frozen), seen_1" in labels
    out = connectors.replot(connectors.evidence_protocol.ROOT / "docs/connectors/lora/results.json.gz", tmp_path / "d.png")
    assert out.stat().st_size > 10_000


def test_the_lora_sweep_differs_from_the_frozen_one_in_the_unets_lora_alone():
    frozen, lora = (load_sweep(f"configs/sweeps/{name}.yaml") for name in ("connectors", "connectors_lora"))
    assert [r.override_args for r in expand_runs(frozen)] == [r.override_args for r in expand_runs(lora)]
    for run in expand_runs(lora):
        cfg = load_experiment_config(lora.config, [*lora.base_overrides, *run.override_args])
        twin = load_experiment_config(frozen.config, [*frozen.base_overrides, *run.override_args])
        assert cfg.model.unet_training == "lora" and cfg.model.optim.unet_lr == 1e-4
        assert cfg.model.lora.rank == 4 and cfg.model.optim.lr == twin.model.optim.lr == 1e-3
        assert connectors.arm_of(dict(cfg.model)) == f"{cfg.model.adapter.kind}+lora"
        assert str(cfg.data.shards) == "runs/connectors-lora/cache"
        assert {k: v for k, v in dict(cfg.trainer).items()} == dict(twin.trainer) and cfg.seed == twin.seed


@pytest.mark.slow
def test_a_tiny_comparison_runs_end_to_end(tmp_path, monkeypatch):
    """Data, cam and ella x one seed for two steps on the random tiny base, and the report."""
    from llm4gen.cli import sweep as sweep_entry
    from llm4gen.experiments import evidence_data

    monkeypatch.chdir(tmp_path)
    config = tiny_experiment_config(tmp_path)
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(f"config: {config}\noutput_root: {tmp_path / 'runs'}\n"
                     "base_overrides: ['model.base.pretrained=embedded:tiny-sd', trainer.max_steps=2]\n"
                     "runs:\n  - {model.adapter.kind: cam}\n"
                     "  - {model.adapter.kind: ella, model.adapter.ella.width: 64, model.adapter.ella.num_blocks: 1,"
                     " model.adapter.ella.num_latents: 8, model.adapter.ella.time_channels: 16}\n"
                     "grid: {seed: [0]}\n")
    tiny = TINY_PROTOCOL
    evidence_data.write_data(load_sweep(str(sweep)), tiny, log=lambda *a: None)
    assert sweep_entry.main([str(sweep), "--jobs", "2"]) == 0
    report = connectors.report(str(sweep), jobs=2, log=lambda *a: None, protocol=tiny)
    results = json.loads((report / "results.json").read_text())
    assert {row[0] for row in results["objects"]} == {"a", "cam", "ella"}
    assert set(results["verdicts"]) == {"ella"} and set(results["verdicts"]["ella"]) == set(connectors.SUBSETS)
    assert results["sizes"]["ella"]["params"] > 0 and results["sizes"]["cam"]["step_seconds"] > 0
    assert "| ella |" in (report / "report.md").read_text()

    # The LoRA variant of the same sweep: its arms are kind+lora, read against cam+lora, and paired with the
    # frozen report's records (rule 4), which holds because the base draws the same images in both.
    lora = tmp_path / "sweep_lora.yaml"
    lora.write_text(sweep.read_text().replace(f"output_root: {tmp_path / 'runs'}", f"output_root: {tmp_path / 'lora'}")
                    .replace("trainer.max_steps=2]", "trainer.max_steps=2, model.unet_training=lora, "
                             "model.optim.unet_lr=1.0e-4]"))
    assert sweep_entry.main([str(lora), "--jobs", "2"]) == 0
    lora_report = connectors.report(str(lora), jobs=2, log=lambda *a: None, protocol=tiny,
                                    frozen_results=report / "results.json")
    lora_results = json.loads((lora_report / "results.json").read_text())
    assert lora_results["reference"] == "cam+lora" and set(lora_results["verdicts"]) == {"ella+lora"}
    assert lora_results["lora_effects"]["outcome"] == "measured"
    assert set(lora_results["lora_effects"]["by_kind"]) == {"cam", "ella"}
    size = lora_results["sizes"]["cam+lora"]
    assert size["params"] > size["connector_params"] == results["sizes"]["cam"]["params"]
    text = (lora_report / "report.md").read_text()
    assert "| ella+lora |" in text and "What LoRA does to each kind" in text and "protocol_lora.md" in text


def test_the_v3_sweep_trains_each_kind_for_its_pilot_length_with_padding_masked():
    spec = load_sweep("configs/sweeps/connectors_v3.yaml")
    lengths = {}
    for run in expand_runs(spec):
        cfg = load_experiment_config(spec.config, [*spec.base_overrides, *run.override_args])
        assert cfg.model.unet_training == "frozen" and cfg.model.adapter.use_llm_mask
        assert cfg.model.objective.lambda_entity == 0 and cfg.seed in (0, 1, 2)
        lengths.setdefault(cfg.model.adapter.kind, set()).add(cfg.trainer.max_steps)
    assert lengths == {"cam": {1500}, "mlp": {2000}, "lavi_bridge": {1500}, "ella": {2000}}  # docs/evidence/pilot_v3
    assert connectors.RULES_V3.damage == 0.03 and connectors.RULES_V3.effect == connectors.RULES.effect

"""The evidence experiment (experiments/shapes_evidence.py): arms read from configs, the tasks a sweep gives, paired
statistics, the pre-registered gates and decision rules on constructed outcomes, and a whole tiny
experiment (data, cache, two arms x one seed, the report) end to end."""

import dataclasses
import json
from pathlib import Path

import pytest

from llm4gen.evaluation.paired import Difference, Observation, cluster_bootstrap, paired_difference
from llm4gen.experiments.evidence_protocol import ARMS, PROTOCOLS
from llm4gen.experiments.evidence_report import damages_base, rate_table, replication_section
from llm4gen.experiments.evidence_rules import compare, decisions, gates
from llm4gen.experiments.evidence_tasks import ObjectRecord, arm_of, donor_prompts, evaluation_tasks
from llm4gen.cli.shapes_evidence import main
from tests.helpers.experiments import TINY_PROTOCOL, tiny_experiment_config


def model(enabled=True, unet="frozen", lam=0.0, chunks=1, start=0):
    return {"adapter": {"enabled": enabled}, "unet_training": unet, "objective": {"lambda_entity": lam},
            "base": {"clip_chunks": chunks}, "optim": {"unet_start_step": start}}


def test_arms_are_read_from_the_resolved_model_config():
    assert arm_of(model(enabled=False, unet="full")) == "b"
    assert arm_of(model(enabled=False, unet="full", chunks=3)) == "b2"
    assert arm_of(model()) == "c"
    assert arm_of(model(unet="full", start=200)) == "d"
    assert arm_of(model(unet="full", lam=0.01)) == "e"


def test_paired_difference_pairs_by_key_and_resamples_scenes():
    a = [Observation((s, i), f"scene{i // 2}", s, 1.0) for s in (0, 1) for i in range(10)]
    b = [Observation((s, i), f"scene{i // 2}", s, float(i % 2)) for s in (0, 1) for i in range(10)]
    diff = paired_difference(a, list(reversed(b)))  # order does not matter: keys pair them
    assert diff.mean == pytest.approx(0.5) and diff.n == 20 and diff.clusters == 5
    assert diff.low == diff.high == pytest.approx(0.5)  # every scene differs by exactly 0.5: no spread
    assert diff.per_seed == {0: 0.5, 1: 0.5} and diff.positive_in_every_seed
    with pytest.raises(ValueError, match="do not pair"):
        paired_difference(a, b[:-1])


def test_a_difference_survives_its_results_json_form():
    a = [Observation((s, i), f"scene-{i}", s, float(i % 3 == 0)) for s in (0, 1) for i in range(30)]
    b = [Observation((s, i), f"scene-{i}", s, float(i % 2 == 0)) for s in (0, 1) for i in range(30)]
    diff = paired_difference(a, b, samples=200)
    back = Difference.from_dict(json.loads(json.dumps(diff.to_dict())))
    assert back == diff and set(back.per_seed) == {0, 1}


def test_the_bootstrap_interval_is_reproducible_and_covers_the_mean():
    import random

    rng = random.Random(0)
    values = [float(rng.random() < 0.6) for _ in range(50)]
    clusters = [i // 5 for i in range(len(values))]
    first, second = cluster_bootstrap(values, clusters), cluster_bootstrap(values, clusters)
    assert first == second and first[1] < first[0] < first[2]
    # outcomes that move together within a scene: resampling scenes gives a wider interval than
    # resampling the objects as if independent
    together = [float(i // 5 % 2) for i in range(50)]
    scenes = cluster_bootstrap(together, [i // 5 for i in range(50)])
    objects = cluster_bootstrap(together, list(range(50)))
    assert scenes[2] - scenes[1] > 1.5 * (objects[2] - objects[1])


def records(arm, bound_share, n=40, window="outside", phrasing="verbose", set_name="verbose_2", seeds=(0, 1, 2),
            other="missing_object"):
    """``n`` objects per seed, the first ``bound_share`` of them bound (the same objects in every seed)."""
    out = []
    for seed in seeds:
        for i in range(n):
            category = "bound" if i < bound_share * n else other
            out.append(ObjectRecord(arm, seed, set_name, i, 0, f"{set_name}/{i}", phrasing, 2, category, window))
    return out


def constructed(d_outside, b_outside=0.2, b2_outside=0.2, shuffled=0.2, d_inside=0.8, post_d=0.5, post_b=0.5,
                post_other="missing_object"):
    rows = []
    for arm, outside in (("b", b_outside), ("b2", b2_outside), ("d", d_outside), ("d_shuffled", shuffled)):
        rows += records(arm, outside)
    for arm in ("b", "d"):
        rows += records(arm, 0.8 if arm == "b" else d_inside, window="inside")
        rows += records(arm, 0.9, window="short", phrasing="list", set_name="seen_1")
        rows += records(arm, post_b if arm == "b" else post_d, window="short", phrasing="colored", set_name="phrased_2",
                        other=post_other)
        rows += records(arm, 0.5, window="short", phrasing="list", set_name="phrased_3")
    rows += records("a", 0.9, window="short", phrasing="list", set_name="seen_1")
    rows += records("a", 0.5, window="short", phrasing="list", set_name="phrased_3")
    rows += records("a", 0.5, window="short", phrasing="colored", set_name="phrased_2")
    return rows


SPLIT = {"d": {"clip": 0.7, "llm": 0.3, "padding": 0.0}}  # the attention split the gates report
PROBE = {"layer": 3, "test": {"all": {"own": 0.93}, "short": {"own": 0.97}, "verbose": {"own": 0.73}}}


def test_a_large_llm_gain_past_clips_window_is_shown_and_the_literal_probe_gate_says_inconclusive():
    rows = constructed(d_outside=0.6)
    checks = gates(rows, PROBE, truncated=0, attention=SPLIT)
    assert [c.passed for c in checks] == [True, True, True, False, True, True]
    rules = decisions(rows, checks)
    assert rules["primary"]["outcome"] == "shown", rules["primary"]
    assert rules["primary"]["literal"] == "inconclusive (a gate failed)"
    assert rules["secondary"]["outcome"] == "refuted"  # post-nominal (d) - (b) = 0 exactly: CI [0, 0] < 0.02


def test_no_gain_refutes_and_more_tokens_alone_matching_refutes_too():
    checks = gates(constructed(d_outside=0.2), PROBE, 0, SPLIT)
    assert decisions(constructed(d_outside=0.2), checks)["primary"]["outcome"] == "refuted"
    matched = constructed(d_outside=0.6, b2_outside=0.6)
    assert decisions(matched, gates(matched, PROBE, 0, SPLIT))["primary"]["outcome"] == "refuted"


def test_a_gain_the_shuffled_ablation_keeps_is_not_shown():
    rows = constructed(d_outside=0.6, shuffled=0.55)
    rule = decisions(rows, gates(rows, PROBE, 0, SPLIT))["primary"]
    assert rule["outcome"] == "inconclusive"
    assert [c["passed"] for c in rule["checks"]] == [True, True, False, True, True]


def test_a_failed_gate_makes_the_rules_it_guards_inconclusive():
    rows = constructed(d_outside=0.6)
    damaged = [dataclasses.replace(r, category="missing_object") if r.arm == "b" and r.set == "seen_1" and r.prompt < 4
               else r for r in rows]  # (b) - (a) on seen_1 = -0.1
    checks = gates(damaged, PROBE, 0, SPLIT)
    assert checks[0].passed is False
    assert decisions(damaged, checks)["primary"]["outcome"] == "inconclusive (a gate failed)"
    truncated = gates(rows, PROBE, truncated=3, attention=SPLIT)
    assert decisions(rows, truncated)["primary"]["outcome"] == "inconclusive (a gate failed)"


def test_a_binding_gain_from_fewer_leaks_on_post_nominal_prompts_is_shown():
    rows = constructed(d_outside=0.6, post_d=0.7, post_b=0.5, post_other="leaked_color")
    rule = decisions(rows, gates(rows, PROBE, 0, SPLIT))["secondary"]
    assert rule["outcome"] == "shown", rule
    fewer_missing = constructed(d_outside=0.6, post_d=0.7, post_b=0.5, post_other="missing_object")
    rule = decisions(fewer_missing, gates(fewer_missing, PROBE, 0, SPLIT))["secondary"]
    assert rule["outcome"] == "inconclusive" and rule["checks"][1]["passed"] is False


def test_compare_needs_both_arms():
    rows = records("d", 0.5)
    assert compare(rows, "d", "b", "outside") is None
    assert compare(rows + records("b", 0.25), "d", "b", "outside").mean == pytest.approx(0.25, abs=0.02)


def test_the_ablation_takes_each_prompts_llm_features_from_the_next_scene():
    from llm4gen.evaluation.prompt_sets import prompt_set

    records_ = prompt_set("verbose_2", 4)
    donors = donor_prompts(records_)
    texts = [r.text for r in records_]
    assert [donors[t] for t in texts] == texts[1:] + texts[:1]


def test_the_sweep_gives_every_arm_and_c_from_ds_checkpoint(tmp_path):
    from llm4gen.launch.sweep import expand_runs, load_sweep

    spec = load_sweep("configs/sweeps/shapes_evidence.yaml")
    spec = dataclasses.replace(spec, output_root=tmp_path)
    for run in expand_runs(spec):  # pretend every run finished
        run.output_dir.mkdir(parents=True)
        from omegaconf import OmegaConf

        from llm4gen.launch.sweep import load_experiment_config

        OmegaConf.save(load_experiment_config(spec.config, run.override_args), run.output_dir / "config.yaml")
        (run.output_dir / "final_metrics.json").write_text("{}")
    tasks, unfinished = evaluation_tasks(spec, "embedded:shapes-sd")
    assert not unfinished
    # protocol v3 added the gated arms, v4 (a chunked) and (c shuffled)
    v2_arms = [arm for arm in ARMS if not arm.endswith("_gated") and arm not in ("a_chunked", "c_shuffled")]
    assert sorted({(t.arm, t.seed) for t in tasks}) == sorted((arm, s) for arm in v2_arms for s in (0, 1, 2))
    c = next(t for t in tasks if t.arm == "c" and t.seed == 1)
    assert c.checkpoint.endswith("step=0000200.ckpt") and "unet_start_step=200" in c.checkpoint
    assert next(t for t in tasks if t.arm == "d_shuffled").shuffle_llm
    assert next(t for t in tasks if t.arm == "b2").sets == ("seen_1", "verbose_2", "verbose_3")


@pytest.mark.slow
def test_a_tiny_experiment_runs_end_to_end(tmp_path, monkeypatch):
    """The data step (render, length check, cache), (b) and (d) x one seed on the random tiny base, the report."""
    import llm4gen.experiments.evidence_report as evidence_report
    import llm4gen.experiments.shapes_evidence as experiment
    from llm4gen.cli import sweep as sweep_entry
    from llm4gen.launch.sweep import load_sweep

    monkeypatch.chdir(tmp_path)
    config = tiny_experiment_config(tmp_path, ("  max_steps: 300", "  max_steps: 2"),
                                    ("  every_n_steps: 200 ", "  every_n_steps: 1 "))
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(f"config: {config}\noutput_root: {tmp_path / 'runs'}\n"
                     "base_overrides: ['model.base.pretrained=embedded:tiny-sd']\n"
                     "runs:\n  - {model.adapter.enabled: false, model.unet_training: full}\n"
                     "  - {model.unet_training: full, model.optim.unet_start_step: 1}\n"
                     "grid: {seed: [0]}\n")
    tiny = TINY_PROTOCOL
    monkeypatch.setattr(evidence_report, "run_probe", lambda spec, path, log=print: PROBE)  # the probe has its own tests

    experiment.write_data(load_sweep(str(sweep)), tiny, log=lambda *a: None)
    assert sorted(p.name for p in (tmp_path / "cache").glob("*.tar")) == ["shard-000000.tar", "shard-000001.tar"]
    assert json.loads((tmp_path / "cache" / "cache_key.json").read_text())["fields"].keys() == {
        "latent_moments", "llm_features", "entities"}
    assert sweep_entry.main([str(sweep), "--jobs", "2"]) == 0
    report = experiment.report(str(sweep), jobs=2, log=lambda *a: None, protocol=tiny)
    results = json.loads((report / "results.json").read_text())
    assert {row[0] for row in results["objects"]} == {"a", "b", "c", "d", "d_shuffled"}
    assert set(results["decisions"]) == {"primary", "secondary"}
    text = (report / "report.md").read_text()
    assert "## Gates" in text and "## Decision rules" in text and "(d) - (b)" in text
    from PIL import Image

    assert Image.open(report / "samples.png").size[0] > 600 and Image.open(report / "differences.png").size[0] > 500
    # a second report generates nothing new and gives the same numbers
    again = experiment.report(str(sweep), jobs=2, log=lambda *a: None, protocol=tiny)
    assert json.loads((again / "results.json").read_text())["differences"] == results["differences"]


def test_report_without_finished_runs_says_what_to_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "experiment.yaml"
    config.write_text("model: {base: {pretrained: 'embedded:tiny-sd'}}\ndata: {shards: data}\n")
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(f"config: {config}\noutput_root: {tmp_path / 'runs'}\ngrid: {{seed: [0]}}\n")
    assert main(["report", str(sweep_file)]) == 2
    assert "python -m llm4gen.cli.shapes_evidence run" in capsys.readouterr().err


# ---------------------------------------------------------------- protocol v3 (docs/evidence/protocol_v3.md)


def test_v3_reads_the_gated_arms_and_marks_an_arm_that_damages_the_base():
    gated = {"adapter": {"enabled": True, "fusion": "gated"}, "unet_training": "full", "objective": {"lambda_entity": 0},
             "base": {}}
    assert arm_of(gated) == "d_gated" and arm_of({**gated, "unet_training": "frozen"}) == "c_gated"
    rows = (records("a", 0.9, window="short", phrasing="list", set_name="seen_1")
            + records("c", 0.88, window="short", phrasing="list", set_name="seen_1")
            + records("d", 0.8, window="short", phrasing="list", set_name="seen_1"))
    v3, v2 = PROTOCOLS["v3"], PROTOCOLS["v2"]
    assert damages_base(rows, "c", v3) is False and damages_base(rows, "d", v3) is True  # 0.02 / 0.10 below
    assert damages_base(rows, "d", v2) is None  # v2 wrote no such label
    assert "damages the base" in rate_table(rows, ["a", "c", "d"], ["seen_1"], v3)
    assert "**yes**" in rate_table(rows, ["a", "c", "d"], ["seen_1"], v3).splitlines()[-1]


def test_the_replication_draws_fresh_scenes_and_seeds_for_every_set():
    from llm4gen.evaluation.prompt_sets import prompt_set

    for name in ("seen_1", "phrased_2", "verbose_3", "heldout_2"):
        fixed, fresh = prompt_set(name), prompt_set(name, draw=1)
        assert len(fixed) == len(fresh) and [r.phrasing for r in fixed] == [r.phrasing for r in fresh]
        assert not {r.scene_id for r in fixed} & {r.scene_id for r in fresh}
        assert not {r.seed for r in fixed} & {r.seed for r in fresh}
        assert sum(a.text == b.text for a, b in zip(fixed, fresh)) < len(fixed) / 4  # other scenes (a few coincide)
    assert prompt_set("seen_1", 3, draw=0) == prompt_set("seen_1", 3)  # draw 0: the set as it always was


def test_the_replication_section_reads_a_report_and_applies_the_same_rules(tmp_path):
    from dataclasses import asdict

    rows = constructed(d_outside=0.6)
    checks = gates(rows, PROBE, 0, SPLIT)
    (tmp_path / "results.json").write_text(json.dumps({
        "protocol": asdict(PROTOCOLS["v3-replication"]), "gates": [asdict(c) for c in checks],
        "decisions": decisions(rows, checks), "objects": [list(asdict(r).values()) for r in rows],
        "object_fields": list(ObjectRecord.__dataclass_fields__)}))
    text = "\n".join(replication_section(tmp_path, PROTOCOLS["v3"]))
    assert "evaluation scenes of draw 1" in text and "**primary: shown**" in text
    assert "(d) - (b), outside" in text and "Replicated?" not in text
    # beside a first study: each rule replicates only where both studies reach the same outcome
    study = {name: dict(rule) for name, rule in decisions(rows, checks).items()}
    study["secondary"]["outcome"] = "inconclusive (a gate failed)" if study["secondary"]["outcome"] != \
        "inconclusive (a gate failed)" else "shown"
    lines = replication_section(tmp_path, PROTOCOLS["v3"], study)
    assert "- primary: this study shown, the replication shown: the same outcome: **replicated**" in lines
    assert [line for line in lines if line.startswith("- secondary:")][0].endswith("**the two disagree**")


@pytest.mark.parametrize("sweep, seeds", [("configs/sweeps/evidence_v3.yaml", (0, 1, 2)),
                                          ("configs/sweeps/evidence_v3_replication.yaml", (3, 4, 5))])
def test_the_v3_sweeps_train_the_pilots_lengths_with_padding_masked(sweep, seeds):
    from omegaconf import OmegaConf

    from llm4gen.launch.sweep import expand_runs, load_experiment_config, load_sweep

    spec = load_sweep(sweep)
    arms = {}
    for run in expand_runs(spec):
        cfg = load_experiment_config(spec.config, [*spec.base_overrides, *run.override_args])
        arm = arm_of(OmegaConf.to_container(cfg.model, resolve=True))
        arms.setdefault(arm, set()).add(cfg.seed)
        assert cfg.model.adapter.use_llm_mask and cfg.data.shards == "runs/shapes-evidence/cache"
        if arm in ("d", "e", "d_gated"):  # the CAM phase: the pilot's 1500 steps, then 300 with the UNet
            assert (cfg.model.optim.unet_start_step, cfg.trainer.max_steps) == (1500, 1800)
            assert 1500 % cfg.checkpoint.every_n_steps == 0  # (c) is the checkpoint at the start step
        else:
            assert cfg.trainer.max_steps == 300
    assert arms == {arm: set(seeds) for arm in ("b", "b2", "d", "e", "d_gated")}


def test_the_sample_grid_shows_the_first_seed_the_tasks_have(tmp_path):
    """A replication's seeds start at 3: its grid shows seed 3 (as its report says), not an empty seed 0."""
    from PIL import Image

    from llm4gen.evaluation.runner import image_path
    from llm4gen.experiments.evidence_report import sample_grid
    from llm4gen.experiments.evidence_tasks import Task

    sets = ("phrased_2", "verbose_2", "verbose_3")
    colours = {3: (255, 0, 0), 4: (0, 0, 255)}
    tasks = []
    for seed, colour in colours.items():
        for arm in ("a", "b"):
            task = Task(arm, seed, str(tmp_path / f"{arm}-{seed}"), sets)
            for name in sets:
                for index in range(TINY_PROTOCOL.prompts_per_set):
                    file = image_path(Path(task.out), name, index, 0)
                    file.parent.mkdir(parents=True, exist_ok=True)
                    Image.new("RGB", (32, 32), colour).save(file)
            tasks.append(task)
    grid = Image.open(sample_grid(tasks, tmp_path / "samples.png", protocol=TINY_PROTOCOL)).convert("RGB")
    present = {colour for _, colour in grid.getcolors(1 << 20)}
    assert colours[3] in present and colours[4] not in present
    grid = Image.open(sample_grid(tasks, tmp_path / "seed4.png", seed=4, protocol=TINY_PROTOCOL)).convert("RGB")
    assert colours[4] in {colour for _, colour in grid.getcolors(1 << 20)}

"""Protocol v4 (docs/evidence/protocol_v4.md): its arms and sets from the sweep, its rules on constructed
outcomes, the set sizes from an earlier study's variance, and a tiny v4 study end to end."""

import dataclasses
import json
import random

import pytest
from omegaconf import OmegaConf

from llm4gen.evaluation.prompt_sets import prompt_set
from llm4gen.experiments.evidence_power import scene_variance
from llm4gen.experiments.evidence_protocol import PROTOCOLS
from llm4gen.experiments.evidence_rules import compare, decisions_v4
from llm4gen.experiments.evidence_tasks import ObjectRecord, arm_of, evaluation_tasks
from llm4gen.launch.sweep import expand_runs, load_experiment_config, load_sweep
from tests.helpers.experiments import tiny_experiment_config

V4 = PROTOCOLS["v4"]


def records(arm, bound_share, n=40, window="outside", phrasing="verbose", set_name="verbose_2", seeds=(6, 7, 8)):
    """``n`` objects per seed, the first ``bound_share`` of them bound (the same objects in every seed)."""
    return [ObjectRecord(arm, seed, set_name, i, 0, f"{set_name}/{i}", phrasing, 2,
                         "bound" if i < bound_share * n else "missing_object", window)
            for seed in seeds for i in range(n)]


def study(c=0.4, a=0.05, shuffled=0.08, chunked=0.2, c_seen=0.9, c_short=0.5, c_post=0.5):
    """Every arm v4 compares, (a) at 0.9 on seen_1 and 0.5 on the short sets."""
    rows = records("a", a) + records("c", c) + records("c_shuffled", shuffled) + records("a_chunked", chunked)
    for arm, seen, short, post in (("a", 0.9, 0.5, 0.5), ("c", c_seen, c_short, c_post)):
        rows += records(arm, seen, window="short", phrasing="list", set_name="seen_1")
        rows += records(arm, short, window="short", phrasing="list", set_name="phrased_3")
        rows += records(arm, post, window="short", phrasing="colored", set_name="phrased_2")
    return rows


def test_the_primary_is_shown_only_when_every_part_holds():
    rules = decisions_v4(study(), V4)
    assert rules["primary"]["outcome"] == "shown" and len(rules["primary"]["checks"]) == 5
    assert rules["secondary"]["outcome"] == "refuted"  # post-nominal (c) - (a) = 0 exactly: CI [0, 0] < 0.02
    # a gain the ablation keeps: not from the description, and nothing refutes it
    kept = decisions_v4(study(shuffled=0.35), V4)["primary"]
    assert kept["outcome"] == "inconclusive" and [c["passed"] for c in kept["checks"]] == [True, False, True, True, True]
    assert any("half of (c) - (a)" in reason for reason in kept["because"])
    # a small loss on seen_1 passes (point estimate), a larger one fails the no-damage check
    assert decisions_v4(study(c_seen=0.875), V4)["primary"]["outcome"] == "shown"
    assert decisions_v4(study(c_seen=0.85), V4)["primary"]["checks"][3]["passed"] is False


def test_what_refutes_the_primary():
    no_gain = decisions_v4(study(c=0.05, shuffled=0.05), V4)["primary"]
    assert no_gain["outcome"] == "refuted" and "the gain's CI ends below +0.05" in no_gain["because"][0]
    chunking_wins = decisions_v4(study(chunked=0.6), V4)["primary"]
    assert chunking_wins["outcome"] == "refuted" and "chunked CLIP" in chunking_wins["because"][0]
    damage = decisions_v4(study(c_short=0.3), V4)["primary"]
    assert damage["outcome"] == "refuted" and "damages the base on short" in damage["because"][0]


def test_a_binding_gain_on_post_nominal_prompts_is_shown():
    assert decisions_v4(study(c_post=0.6), V4)["secondary"]["outcome"] == "shown"
    assert decisions_v4(study(c_post=0.52), V4)["secondary"]["outcome"] == "inconclusive"


def test_a_missing_arm_leaves_the_rule_inconclusive():
    rows = [r for r in study() if r.arm != "a_chunked"]
    rule = decisions_v4(rows, V4)["primary"]
    assert rule["outcome"] == "inconclusive" and "1 of 5 checks not measured" in rule["because"]


def test_the_predicted_half_width_follows_the_bootstrap_and_shrinks_with_more_scenes():
    rng = random.Random(0)
    rows = []
    for arm, p in (("c", 0.4), ("a", 0.1)):
        for scene in range(120):
            for seed in (0, 1, 2):
                for k in range(2):
                    rng_scene = random.Random(f"{scene}/{seed}/{k}")
                    bound = rng_scene.random() < p + (0.2 if scene % 3 == 0 else 0.0)
                    rows.append(ObjectRecord(arm, seed, "verbose_2", scene, k, f"v/{scene}", "verbose", 2,
                                             "bound" if bound else "missing_object", "outside"))
    rng.shuffle(rows)
    v = scene_variance(rows, "c", "a", "outside")
    assert v.scenes == 120 and v.mean == pytest.approx(compare(rows, "c", "a", "outside").mean)
    assert v.half_width(120) == pytest.approx(v.bootstrap_half_width, rel=0.15)
    assert v.half_width(480) == pytest.approx(v.half_width(120) / 2)
    needed = v.scenes_for(0.04)
    assert v.half_width(needed) <= 0.04 < v.half_width(needed - 1)


def test_v4_draws_scenes_no_earlier_study_used_at_its_sizes():
    assert V4.prompts("verbose_2") == V4.prompts("verbose_3") == V4.prompts("seen_1") == 96
    assert V4.prompts("phrased_2") is None and "heldout_2" not in V4.sets
    for name in ("seen_1", "verbose_3", "phrased_2"):
        fresh = prompt_set(name, V4.prompts(name), draw=V4.scene_draw)
        for draw in (0, 1):  # v2 / v3 and the v3 replication
            used = prompt_set(name, V4.prompts(name), draw=draw)
            assert not {r.scene_id for r in fresh} & {r.scene_id for r in used}
            assert not {r.seed for r in fresh} & {r.seed for r in used}


def test_the_v4_sweep_trains_c_alone_for_the_pilots_length_on_v3s_recipe():
    spec = load_sweep("configs/sweeps/evidence_v4.yaml")
    v3 = load_sweep("configs/sweeps/evidence_v3.yaml")
    v3_d = next(r for r in expand_runs(v3) if "unet_start_step" in str(r.override_args)
                and "lambda_entity" not in str(r.override_args) and "gated" not in str(r.override_args))
    reference = load_experiment_config(v3.config, [*v3.base_overrides, *v3_d.override_args])
    seeds = set()
    for run in expand_runs(spec):
        cfg = load_experiment_config(spec.config, [*spec.base_overrides, *run.override_args])
        assert arm_of(OmegaConf.to_container(cfg.model, resolve=True)) == "c"
        assert cfg.trainer.max_steps == reference.model.optim.unet_start_step == 1500
        for key in ("optim.lr", "optim.warmup_steps", "ema.decay", "objective.min_snr_gamma", "llm.layer",
                    "adapter.use_llm_mask", "adapter.kind"):
            assert OmegaConf.select(cfg.model, key) == OmegaConf.select(reference.model, key), key
        assert cfg.data == reference.data
        seeds.add(cfg.seed)
    assert seeds == {6, 7, 8}


def test_v4_tasks_are_a_a_chunked_c_and_c_shuffled(tmp_path):
    spec = dataclasses.replace(load_sweep("configs/sweeps/evidence_v4.yaml"), output_root=tmp_path)
    for run in expand_runs(spec):  # pretend every run finished
        run.output_dir.mkdir(parents=True)
        OmegaConf.save(load_experiment_config(spec.config, [*spec.base_overrides, *run.override_args]),
                       run.output_dir / "config.yaml")
        (run.output_dir / "final_metrics.json").write_text("{}")
    tasks, unfinished = evaluation_tasks(spec, "embedded:shapes-sd", V4)
    assert not unfinished
    assert sorted({(t.arm, t.seed) for t in tasks}) == sorted(
        (arm, s) for arm in ("a", "a_chunked", "c", "c_shuffled") for s in (6, 7, 8))
    by_arm = {t.arm: t for t in tasks if t.seed == 7}
    assert by_arm["c"].sets == by_arm["a"].sets == V4.sets and by_arm["c"].checkpoint.endswith("last.ckpt")
    assert by_arm["c_shuffled"].shuffle_llm and by_arm["c_shuffled"].checkpoint == by_arm["c"].checkpoint
    chunked = OmegaConf.load(by_arm["a_chunked"].initial)
    assert by_arm["a_chunked"].sets == ("verbose_2", "verbose_3") and by_arm["a_chunked"].checkpoint is None
    assert chunked.model.base.clip_chunks == 3 and not chunked.model.adapter.enabled
    assert chunked.model.base.pretrained == "embedded:shapes-sd"


@pytest.mark.slow
def test_a_tiny_v4_study_runs_end_to_end(tmp_path, monkeypatch):
    """The data step, (c) x one seed for 2 steps on the random tiny base, the four arms sampled, the v4 report."""
    import llm4gen.experiments.evidence_report as evidence_report
    import llm4gen.experiments.shapes_evidence as experiment

    monkeypatch.chdir(tmp_path)
    config = tiny_experiment_config(tmp_path, ("  every_n_steps: 200 ", "  every_n_steps: 1 "))
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(f"config: {config}\noutput_root: {tmp_path / 'runs'}\n"
                     "base_overrides: ['model.base.pretrained=embedded:tiny-sd']\n"
                     "runs:\n  - {model.unet_training: frozen, trainer.max_steps: 2}\ngrid: {seed: [6]}\n")
    tiny = dataclasses.replace(V4, data_samples=16, samples_per_shard=8, sampling_steps=1, eval_batch=4,
                               prompts_per_set=2, set_sizes=(("verbose_2", 3),), training_jobs=1)
    monkeypatch.setattr(evidence_report, "run_probe", lambda spec, path, log=print: {})  # v4 decides nothing by it
    monkeypatch.setattr(experiment, "run_probe", lambda spec, path, log=print: {})

    report = experiment.run(str(sweep), jobs=2, log=lambda *a: None, protocol=tiny, name="v4")
    results = json.loads((report / "results.json").read_text())
    objects = {(row[0], row[2]) for row in results["objects"]}
    assert {arm for arm, _ in objects} == {"a", "a_chunked", "c", "c_shuffled"}
    assert {name for arm, name in objects if arm == "a_chunked"} == {"verbose_2", "verbose_3"}
    assert set(results["decisions"]) == {"primary", "secondary"}
    assert results["decisions"]["primary"]["outcome"] in ("shown", "refuted", "inconclusive")
    text = (report / "report.md").read_text()
    assert "docs/evidence/protocol_v4.md` (" in text and "## Preconditions" in text
    assert "(c) - (a chunked), outside" in text and "**primary: " in text
    assert "wall_time" not in text and (report / "wall_time.txt").read_text().endswith("--protocol v4`\n")


def test_a_report_names_the_commit_of_its_protocol():
    from llm4gen.experiments.evidence_report import protocol_commit

    assert protocol_commit("docs/evidence/protocol_v3.md").startswith("committed in ")
    assert protocol_commit("docs/evidence/no_such_protocol.md") == "not committed"


def test_the_size_command_reproduces_the_protocols_table(capsys):
    """docs/evidence/protocol_v4.md's sizing table comes from v3's shipped records by this command."""
    from llm4gen.cli.shapes_evidence import main

    assert main(["size", "docs/evidence/v3/results.json.gz", "--replication",
                 "docs/evidence/v3/replication/results.json.gz", "--protocol", "v4"]) == 0
    out = capsys.readouterr().out
    assert "| (c) - (a), outside | docs/evidence/v3/results.json.gz | +0.173 | 128 | 0.0425 / 0.0419 | 145 | 192 | 0.0347 |" in out
    assert "| (c) - (a), outside | docs/evidence/v3/replication/results.json.gz | +0.237 | 128 | 0.0432 / 0.0444 | 150 | 192 | 0.0353 |" in out

"""The pilot of protocol v3 (docs/evidence/pilot_v3.md): its rule on records whose learning curve is known, its
sweep (five connectors, seed 0, 2,000 steps, every config valid), its tasks and the loss it reports."""

from __future__ import annotations

import random

import pytest
from omegaconf import OmegaConf

from llm4gen.experiments import pilot
from llm4gen.experiments.evidence_tasks import ObjectRecord
from llm4gen.launch.sweep import expand_runs, load_experiment_config, load_sweep


def curve(kind: str, shares: dict[int, float], scenes: int = 60, seed: int = 0):
    """Records of ``kind`` at each step, the step's share of objects drawn bound (the same objects as the share
    grows), on seen_1 and on verbose objects outside CLIP's window, the same (prompt, object) keys at every step."""
    order = list(range(scenes))
    random.Random(seed).shuffle(order)
    out = []
    for step, share in shares.items():
        for name, window in (("seen_1", "short"), ("verbose_2", "outside")):
            for prompt in range(scenes):
                bound = order[prompt] < round(share * scenes)
                out.append(ObjectRecord(pilot.at(kind, step), 0, name, prompt, 0, f"scene-{prompt}",
                                        "verbose" if window == "outside" else "list", 1,
                                        "bound" if bound else "missing_object", window))
    return out


@pytest.mark.parametrize("shares, steps, stopped", [
    ({0: 0.1, 300: 0.2, 1000: 0.8, 1500: 0.8, 2000: 0.8}, 1000, True),     # learns until 1000, flat after
    ({0: 0.1, 300: 0.6, 1000: 0.6, 1500: 0.62, 2000: 0.6}, 300, True),     # flat from 300
    ({0: 0.0, 300: 0.1, 1000: 0.35, 1500: 0.6, 2000: 0.95}, 2000, False),  # still learning at the end
    ({0: 0.9, 300: 0.5, 1000: 0.45, 1500: 0.5, 2000: 0.4}, 300, True),     # damaged and never recovering
])
def test_the_length_is_where_no_later_step_improves_on_seen_1_or_outside(shares, steps, stopped):
    length = pilot.training_length(curve("cam", shares), "cam")
    assert (length.steps, length.stopped) == (steps, stopped)


def test_a_gain_on_one_rule_subset_alone_keeps_the_arm_training():
    records = curve("mlp", {0: 0.5, 300: 0.5, 1000: 0.5, 1500: 0.5, 2000: 0.5})
    records = [r if not (r.window == "outside" and r.arm == pilot.at("mlp", 2000)) else
               ObjectRecord(**{**r.__dict__, "category": "bound"}) for r in records]  # outside only, at 2000
    assert pilot.training_length(records, "mlp").steps == 2000


def test_the_sweep_trains_five_connectors_at_seed_0_with_the_unet_frozen():
    spec = load_sweep("configs/sweeps/pilot.yaml")
    runs = expand_runs(spec)
    kinds = []
    for run in runs:
        cfg = load_experiment_config(spec.config, [*spec.base_overrides, *run.override_args])
        model = OmegaConf.to_container(cfg.model, resolve=True)
        kinds.append(pilot.kind_of(model))
        assert (cfg.seed, cfg.trainer.max_steps, cfg.model.unet_training) == (0, 2000, "frozen")
        assert cfg.model.objective.lambda_entity == 0 and cfg.model.adapter.use_llm_mask
        assert cfg.checkpoint.every_n_steps == 100 and all(s % 100 == 0 for s in pilot.STEPS)
    assert sorted(kinds) == sorted(pilot.KINDS)


def test_tasks_sample_each_kind_at_its_initial_weights_and_each_checkpoint(tmp_path):
    spec = load_sweep("configs/sweeps/pilot.yaml")
    run = expand_runs(spec)[0]
    tasks = pilot.evaluation_tasks(spec, "embedded:shapes-sd", {"cam": run})
    assert [t.arm for t in tasks] == ["a"] + [pilot.at("cam", s) for s in pilot.STEPS]
    assert tasks[1].initial == str(run.output_dir / "config.yaml") and tasks[1].checkpoint is None
    assert tasks[2].checkpoint.endswith("step=0000300.ckpt") and tasks[0].base == "embedded:shapes-sd"


def test_the_loss_beside_a_step_is_the_mean_of_the_steps_before_it(tmp_path):
    (tmp_path / "logs").mkdir()
    rows = ["epoch,step,train/diffusion,train/lr"] + [f"0,{s},{1.0 if s < 200 else 0.5},0.001" for s in range(0, 400, 20)]
    (tmp_path / "logs" / "metrics.csv").write_text("\n".join(rows) + "\n")
    assert pilot.loss_before(tmp_path, 300) == pytest.approx(0.5)       # steps 200..299 logged
    assert pilot.loss_before(tmp_path, 200) == pytest.approx(1.0)
    assert pilot.loss_before(tmp_path, 0) is None

"""Exact resume with the real train.py: a run killed with SIGKILL and started again ends with the
weights of an uninterrupted run and has trained on the same samples in the same order.

Each run is a subprocess (the tiny default, CPU fp32, batch 4, 8 steps, a checkpoint every 2 steps).
The killed run is stopped the moment ``step=0000004.ckpt`` appears; it may have trained (and recorded)
a few steps beyond its newest checkpoint, which the restarted run trains again, so the key sequence
is compared per global step, taking each step from the last run that trained it.
"""

from __future__ import annotations

import json

import pytest

from llm4gen.cli import train

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

STEPS = 8
TOLERANCE = 1e-6


def overrides(num_workers: int) -> tuple[str, ...]:
    return (f"trainer.max_steps={STEPS}", "checkpoint.every_n_steps=2", f"data.num_workers={num_workers}")


@pytest.mark.parametrize("num_workers", [0, 2])
def test_killed_run_resumes_to_the_uninterrupted_weights_and_sample_order(tiny_runs, tmp_path, num_workers):
    baseline = tiny_runs.baseline(*overrides(num_workers))
    run_dir = tmp_path / "run"
    argv = tiny_runs.argv(run_dir, *overrides(num_workers))
    killed_keys, resumed_keys = tmp_path / "killed.jsonl", tmp_path / "resumed.jsonl"

    tiny_runs.start_and_kill_after(argv, tiny_runs.env(killed_keys), run_dir / "checkpoints" / "step=0000004.ckpt",
                                   tmp_path / "killed.log")
    assert not (run_dir / "final_metrics.json").exists()
    newest = train.find_resume_checkpoint(run_dir)  # read now: the rerun overwrites last.ckpt
    start_checkpoint = tiny_runs.load_checkpoint(newest)
    start_step = start_checkpoint["global_step"]
    assert 4 <= start_step < STEPS, f"newest checkpoint {newest} is at step {start_step}"

    output = tiny_runs.run(argv, tiny_runs.env(resumed_keys))  # the very same command again

    assert tiny_runs.resumed_from(output) == newest, output[-3000:]
    # It continues at the saved step: its first batch is the step after the checkpoint's last one.
    assert [r["global_step"] for r in tiny_runs.batch_records(resumed_keys)] == list(range(start_step, STEPS))

    expected = tiny_runs.keys_by_step(baseline / "keys.jsonl")
    assert sorted(expected) == list(range(STEPS))
    assert len({key for keys in expected.values() for key in keys}) == 4 * STEPS  # no sample twice
    assert tiny_runs.keys_by_step(killed_keys, resumed_keys) == expected

    final = tiny_runs.load_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    reference = tiny_runs.load_checkpoint(baseline / "checkpoints" / "last.ckpt")
    assert final["global_step"] == reference["global_step"] == STEPS
    difference = tiny_runs.max_abs_difference(final["state_dict"], reference["state_dict"])
    moved = tiny_runs.max_abs_difference(reference["state_dict"], start_checkpoint["state_dict"])
    print(f"num_workers={num_workers}: resumed at step {start_step}; max |resumed - uninterrupted| = {difference:.3g}, "
          f"max weight change after the resume point = {moved:.3g}")
    assert difference <= TOLERANCE
    assert moved > 100 * TOLERANCE  # the steps after the resume moved the weights far beyond the tolerance

    metrics = json.loads((run_dir / "final_metrics.json").read_text())
    reference_metrics = json.loads((baseline / "final_metrics.json").read_text())
    assert metrics["global_step"] == STEPS
    assert metrics["train/loss"] == pytest.approx(reference_metrics["train/loss"], abs=TOLERANCE)


def test_checkpoint_holds_step_optimizer_scheduler_and_only_the_trainable_weights(tiny_runs):
    baseline = tiny_runs.baseline(*overrides(0))
    path = baseline / "checkpoints" / "step=0000004.ckpt"
    checkpoint = tiny_runs.load_checkpoint(path)

    assert checkpoint["global_step"] == 4
    weights = checkpoint["state_dict"]
    assert weights and all(key.startswith("adapter.") for key in weights), sorted(weights)[:5]
    trainable_numel = sum(v.numel() for v in weights.values())
    trainable_bytes = sum(v.numel() * v.element_size() for v in weights.values())

    (optimizer,) = checkpoint["optimizer_states"]
    assert len(optimizer["state"]) == len(weights)  # AdamW state for every trainable tensor, nothing else
    assert {float(state["step"]) for state in optimizer["state"].values()} == {4.0}
    assert sum(state["exp_avg"].numel() for state in optimizer["state"].values()) == trainable_numel
    assert sum(state["exp_avg_sq"].numel() for state in optimizer["state"].values()) == trainable_numel
    (scheduler,) = checkpoint["lr_schedulers"]
    assert scheduler["last_epoch"] == 4
    assert scheduler["_last_lr"] == pytest.approx([1e-3 * 4 / 6])  # linear warmup over 6 steps to 1e-3
    assert checkpoint["WebDatasetDataModule"]["ranks"][0]["batches"] == 4  # the data position

    # weights + Adam's two moments = 3x the trainable bytes, plus pickling overhead; the frozen
    # UNet/VAE/CLIP/LLM (~110 MB) would be ~370x more.
    size = path.stat().st_size
    print(f"checkpoint {size} bytes, trainable {trainable_bytes} bytes ({trainable_numel} fp32 values), "
          f"ratio {size / trainable_bytes:.2f}")
    assert 3 * trainable_bytes < size < 3 * trainable_bytes * 1.1 + 100 * 1024

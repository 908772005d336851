"""A non-finite step loses nothing (lightning_modules/nonfinite.py): the step whose batch makes the loss inf
changes no weight, no EMA and no optimizer state, is counted, and a run resumed after it reaches the
uninterrupted run's weights; too many in a row stop the run naming the last good checkpoint; no checkpoint
holds a non-finite trained tensor, and resuming passes over one that does."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from llm4gen.cli import train
from llm4gen.lightning_modules.nonfinite import nonfinite_tensors, nonfinite_terms
from llm4gen.lightning_modules.run_checkpoints import find_resume_checkpoint
from tests.helpers.shards import write_latent_shards
from tests.helpers.training import FAST

COMMON = ["model.base.pretrained=embedded:tiny-sd", "data.synthetic_if_missing=false", "validation.at_start=false",
          "data.precomputed_keys=[latent_moments]", "model.ema.enabled=true", "model.optim.lr=1e-3",
          "checkpoint.every_n_steps=1", "checkpoint.keep_last=-1", *FAST]


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def same_state(a: dict, b: dict) -> bool:
    """Trained weights, EMA and optimizer moments bitwise equal."""
    weights = a["state_dict"].keys() == b["state_dict"].keys() and all(
        torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    ema = all(torch.equal(x, y) for x, y in zip(a["ema"]["shadow_params"], b["ema"]["shadow_params"]))
    sa, sb = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    moments = sa.keys() == sb.keys() and all(torch.equal(sa[i][m], sb[i][m]) for i in sa for m in ("exp_avg", "exp_avg_sq"))
    return weights and ema and moments


def skipped_counts(run: Path) -> list[float]:
    with open(run / "logs" / "metrics.csv") as handle:
        return [float(r["train/skipped_nonfinite"]) for r in csv.DictReader(handle) if r.get("train/skipped_nonfinite")]


@pytest.fixture(scope="module")
def poisoned_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("poisoned")
    write_latent_shards(root, num_samples=24, samples_per_shard=12, poisoned={9})  # 24 samples: 6 batches, one epoch
    return root


@pytest.mark.slow
@pytest.mark.parametrize("extra, steps", [(["model.objective.lambda_entity=0.1"], 6),
                                          (["trainer.accumulate_grad_batches=2"], 3)])
def test_the_step_with_an_inf_loss_changes_nothing_and_a_resumed_run_reaches_the_same_weights(
        poisoned_shards, tmp_path, extra, steps):
    straight = tmp_path / "straight"
    args = [f"data.shards={poisoned_shards}", *COMMON, *extra]
    assert train.main([f"output_dir={straight}", f"trainer.max_steps={steps}", *args]) == 0
    states = [load(straight / "checkpoints" / f"step={s:07d}.ckpt") for s in range(1, steps + 1)]
    assert all(not nonfinite_tensors(state) for state in states)
    unchanged = [s for s in range(1, steps) if same_state(states[s - 1], states[s])]
    assert len(unchanged) == 1, unchanged  # exactly one step (the one holding sample 9) changed nothing
    assert max(skipped_counts(straight)) == 1 and states[-1]["nonfinite_steps"]["skipped"] == 1
    assert not same_state(states[0], states[-1])  # the other steps trained

    skipped = unchanged[0] + 1  # the checkpoint after the skipped step
    resumed = tmp_path / "resumed"
    assert train.main([f"output_dir={resumed}", f"trainer.max_steps={skipped}", *args]) == 0
    assert train.main([f"output_dir={resumed}", f"trainer.max_steps={steps}", *args]) == 0
    assert same_state(load(resumed / "checkpoints" / "last.ckpt"), load(straight / "checkpoints" / "last.ckpt"))


@pytest.mark.slow
def test_too_many_in_a_row_stop_the_run_naming_the_step_the_terms_and_the_last_good_checkpoint(tmp_path, capsys):
    shards = tmp_path / "shards"
    shards.mkdir()
    write_latent_shards(shards, num_samples=24, samples_per_shard=24, poisoned=set(range(8, 24)))  # good, then all bad
    out = tmp_path / "run"
    code = train.main([f"output_dir={out}", f"data.shards={shards}", "data.shuffle_buffer=0", "trainer.max_steps=6",
                       "model.optim.max_nonfinite_steps=3", *COMMON])
    error = capsys.readouterr().err
    assert code == 2
    assert "step 4: 3 steps in a row with a non-finite loss" in error and "train/diffusion" in error
    assert str(out / "checkpoints") in error and "run the same command to resume" in error
    written = sorted((out / "checkpoints").glob("step=*.ckpt"))
    assert written and all(not nonfinite_tensors(load(p)) for p in written)
    assert same_state(load(out / "checkpoints" / "step=0000002.ckpt"), load(written[-1]))  # nothing moved after step 2


def test_a_checkpoint_with_non_finite_weights_is_passed_over_on_resume(tmp_path, capsys):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    good = {"global_step": 4, "state_dict": {"adapter.w": torch.ones(3)}, "ema": {"shadow_params": [torch.ones(3)]}}
    bad = {"global_step": 6, "state_dict": {"adapter.w": torch.tensor([1.0, float("nan"), 1.0])}}
    worse = {"global_step": 8, "state_dict": {"adapter.w": torch.ones(3)},
             "optimizer_states": [{"state": {0: {"exp_avg": torch.full((3,), float("inf"))}}}]}
    for name, checkpoint in (("step=0000004.ckpt", good), ("step=0000006.ckpt", bad), ("last.ckpt", worse)):
        torch.save(checkpoint, folder / name)
    assert find_resume_checkpoint(tmp_path) == folder / "step=0000004.ckpt"
    warned = capsys.readouterr().err
    assert "step=0000006.ckpt: its trained state is not finite (state_dict.adapter.w)" in warned
    assert "optimizer_states[0].state.0.exp_avg" in warned


def test_the_non_finite_terms_are_named():
    assert nonfinite_terms({"train/loss": torch.tensor(float("inf")), "train/diffusion": torch.tensor(float("nan")),
                            "train/entity": torch.tensor(0.5)}) == ["train/loss", "train/diffusion"]

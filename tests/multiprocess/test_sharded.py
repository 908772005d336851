"""Sharded data parallel (``trainer.strategy: fsdp2``, lightning_modules/sharding.py) with the real train.py on 2
gloo processes: the tiny SD1.5 and SDXL runs with the UNet trained follow DDP's losses within float tolerance,
their checkpoints (folders of DCP shards) hold no frozen weight, a run resumed at the same world size reaches
the uninterrupted one's weights bitwise, and a run saved on 2 processes resumes on 1 (and 1 on 2) from exactly
the consolidated weights and trains on."""

from __future__ import annotations

import csv
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint import FileSystemReader

from llm4gen.lightning_modules.sharding import consolidated_checkpoint

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

SHARDED = ("trainer.strategy=fsdp2", "trainer.accelerator=cpu", "model.unet_training=full", "model.ema.enabled=true",
           "checkpoint.every_n_steps=1", "checkpoint.keep_last=-1", "validation.at_start=false")
TIMEOUT_S = 300


def losses(run: Path) -> list[float]:
    with open(run / "logs" / "metrics.csv") as handle:
        return [float(r["train/loss"]) for r in csv.DictReader(handle) if r.get("train/loss")]


def trained(path: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's trained weights, consolidated from a sharded folder or read from a file."""
    checkpoint = consolidated_checkpoint(path) if path.is_dir() else torch.load(path, map_location="cpu", weights_only=False)
    return checkpoint["state_dict"]


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def assert_within_adamw_noise(sharded: dict[str, torch.Tensor], ddp: dict[str, torch.Tensor]) -> None:
    """AdamW normalises each step by the gradient's running size, so where a gradient is near zero (a few biases)
    the reduction order's float noise can move an element by up to ~lr (1e-4) a step; all others agree to 1e-5."""
    differences = torch.cat([(sharded[k] - ddp[k]).abs().flatten() for k in ddp])
    assert float(differences.max()) < 5 * 1e-4 and float((differences > 1e-5).float().mean()) < 1e-3


def train(tiny_runs, out: Path, *overrides: str, devices: int = 2, config: str = "tiny.yaml") -> str:
    strategy = SHARDED if "trainer.strategy=ddp" not in overrides else tuple(o for o in SHARDED if "fsdp2" not in o)
    # Lightning gives each of 2 processes one thread; a 1-process run here starts beside another run: one too.
    env = tiny_runs.env() | ({"OMP_NUM_THREADS": "1"} if devices == 1 else {})
    return tiny_runs.run(tiny_runs.argv(out, *strategy, f"trainer.devices={devices}", *overrides, config=config),
                         env, timeout_s=TIMEOUT_S)


def side_by_side(*calls):
    """Independent runs at once (each start is mostly a single-threaded import; 2 cores take two or three runs
    of 2 processes with little loss); their results in order, the first failure raised."""
    with ThreadPoolExecutor(len(calls)) as pool:
        return [future.result() for future in [pool.submit(call) for call in calls]]


def sharded_five_steps(tiny_runs) -> Path:
    """The tiny SD1.5 run sharded on 2 processes for 5 steps, every step saved: made once for the session and
    read by two tests (its losses against DDP's, its step-4 checkpoint against a resumed run's)."""
    return tiny_runs.baseline(*SHARDED, "trainer.devices=2", "trainer.max_steps=5", timeout_s=TIMEOUT_S)


@pytest.mark.parametrize("config", ["tiny.yaml", "tiny_sdxl.yaml"])
def test_sharded_training_follows_ddp_and_saves_only_what_trains(tiny_runs, tmp_path, config):
    def sharded() -> Path:
        if config == "tiny.yaml":
            return sharded_five_steps(tiny_runs)
        (tmp_path / "fsdp2" / "output.txt").write_text(train(tiny_runs, tmp_path / "fsdp2", "trainer.max_steps=5",
                                                              config=config))
        return tmp_path / "fsdp2"

    # diffusers' gradient checkpointing recomputes under FSDP2 (tiny SD1.5): its losses are compared below
    checkpointed = (lambda: train(tiny_runs, tmp_path / "checkpointed", "trainer.max_steps=5",
                                  "model.performance.gradient_checkpointing=true")) if config == "tiny.yaml" else lambda: None
    _, fsdp2, _ = side_by_side(
        lambda: train(tiny_runs, tmp_path / "ddp", "trainer.max_steps=5", "trainer.strategy=ddp", config=config),
        sharded, checkpointed)
    assert "MEMBER: 2/2" in (fsdp2 / "output.txt").read_text()
    ddp, sharded = losses(tmp_path / "ddp"), losses(fsdp2)
    assert len(ddp) == len(sharded) == 5
    torch.testing.assert_close(torch.tensor(sharded), torch.tensor(ddp), rtol=1e-4, atol=1e-5)
    last = fsdp2 / "checkpoints" / "last.ckpt"
    assert last.is_dir() and (last / "meta.pt").is_file() and len(list(last.glob("*.distcp"))) == 2  # a shard per rank
    stored = FileSystemReader(str(last)).read_metadata().state_dict_metadata
    weights = {k.removeprefix("state_dict.") for k in stored if k.startswith("state_dict.")}
    assert {k.split(".")[0] for k in weights} == {"adapter", "unet"}  # no VAE, CLIP or LLM weight
    assert {k.split(".")[0] for k in stored} == {"state_dict", "optimizer_0", "ema"}
    ddp_weights = trained(tmp_path / "ddp" / "checkpoints" / "last.ckpt")
    assert weights == set(ddp_weights)  # what DDP's checkpoint holds, no more
    assert_within_adamw_noise(trained(last), ddp_weights)
    assert (fsdp2 / "export" / "unet" / "config.json").is_file()  # exported from the consolidated weights
    if config == "tiny.yaml":  # diffusers' gradient checkpointing recomputes under FSDP2: the same losses
        torch.testing.assert_close(torch.tensor(losses(tmp_path / "checkpointed")), torch.tensor(sharded),
                                   rtol=1e-5, atol=1e-6)
    if config == "tiny.yaml":  # the entry points read the folder as they read a file
        from llm4gen.cli import export, generate

        assert generate.main(["--checkpoint", str(last), "--prompt", "a red circle", "--steps", "2",
                              "--output-dir", str(tmp_path / "images"), "--device", "cpu"]) == 0
        assert len(list((tmp_path / "images").glob("*.png"))) == 1
        assert export.main(["--checkpoint", str(last), "--output", str(tmp_path / "pipeline"), "--no-ema"]) == 0
        assert (tmp_path / "pipeline" / "model_index.json").is_file()


def test_a_sharded_run_resumes_bitwise_and_across_world_sizes(tiny_runs, tmp_path):
    straight = sharded_five_steps(tiny_runs) / "checkpoints" / "step=0000004.ckpt"  # its steps 1-4: a 4-step run's

    def resumed_at_the_same_world_size() -> None:
        resumed = tmp_path / "resumed"
        train(tiny_runs, resumed, "trainer.max_steps=2")
        shutil.copytree(resumed, tmp_path / "2-to-1")  # saved on 2 processes at step 2: resumed on 1 below
        output = train(tiny_runs, resumed, "trainer.max_steps=4")
        assert "resuming from" in output and str(resumed / "checkpoints") in output
        assert same(trained(resumed / "checkpoints" / "last.ckpt"), trained(straight))
        resumed_on_another_world_size(tmp_path / "2-to-1", 1)

    def resumed_on_another_world_size(run: Path, resumed_on: int) -> None:
        if not run.exists():
            train(tiny_runs, run, "trainer.max_steps=2", devices=3 - resumed_on)
        saved = trained(run / "checkpoints" / "step=0000002.ckpt")
        train(tiny_runs, run, "trainer.max_steps=2", devices=resumed_on, *("resume=auto",))  # loads, trains nothing
        assert same(trained(run / "checkpoints" / "last.ckpt"), saved)  # resharded, written again: the same weights
        train(tiny_runs, run, "trainer.max_steps=4", devices=resumed_on)  # and trains on from them
        after = trained(run / "checkpoints" / "last.ckpt")
        assert not same(after, saved) and all(torch.isfinite(v).all() for v in after.values())
        assert len(losses(run)) == 4 and all(loss == loss for loss in losses(run))

    side_by_side(resumed_at_the_same_world_size, lambda: resumed_on_another_world_size(tmp_path / "1-to-2", 2))


def test_unet_lora_trains_sharded_as_under_ddp(tiny_runs, tmp_path):
    """``model.unet_training=lora``: the UNet's blocks are sharded with their LoRA inside, only the LoRA and the
    connector train and are saved, and the losses follow DDP's."""
    lora = ("trainer.max_steps=3", "model.unet_training=lora", "model.ema.enabled=false")
    side_by_side(lambda: train(tiny_runs, tmp_path / "ddp", *lora, "trainer.strategy=ddp"),
                 lambda: train(tiny_runs, tmp_path / "fsdp2", *lora))
    torch.testing.assert_close(torch.tensor(losses(tmp_path / "fsdp2")), torch.tensor(losses(tmp_path / "ddp")),
                               rtol=1e-4, atol=1e-5)
    sharded, ddp = trained(tmp_path / "fsdp2" / "checkpoints" / "last.ckpt"), trained(tmp_path / "ddp" / "checkpoints" / "last.ckpt")
    assert set(sharded) == set(ddp) and {k.split(".")[0] for k in sharded} == {"adapter", "unet"}
    assert all("lora_" in k for k in sharded if k.startswith("unet."))  # the frozen UNet weights are not saved
    assert_within_adamw_noise(sharded, ddp)

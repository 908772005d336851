"""train.py and generate.py as a user runs them: config refusal before any model loads, a short run
over shards with corrupt samples, what a checkpoint holds, generation from it."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from llm4gen.cli import generate, train
from llm4gen.datamodules.synthetic import write_synthetic_shards
from tests.helpers.shards import png_bytes, write_tar
from tests.helpers.training import FAST


@pytest.fixture
def no_model_loading(monkeypatch):
    """Any attempt to load weights fails the test: errors must come first."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the config was refused")

    import llm4gen.encoders.llm as llm
    import llm4gen.encoders.stable_diffusion as sd
    monkeypatch.setitem(sd.LOADERS, "sd15", refuse)
    monkeypatch.setattr(llm.LLMEncoder, "__init__", refuse)


@pytest.mark.parametrize("override, message", [
    ("model.adapter.num_head=4", "unknown config key 'model.adapter.num_head'.*model.adapter.num_heads"),
    ("model.adapter.num_heads=four", "model.adapter.num_heads.*could not be converted"),
    ("trainer.max_step=3", "trainer.max_step.*max_steps"),
    ("model.base.pretrained=/no/such/folder", "model.base.pretrained.*'/no/such/folder' is not an existing folder"),
    ("model.llm.pretrained=embedded:gpt9", "unknown embedded model 'embedded:gpt9'"),
    ("model.unet_training=partial", "expected one of 'frozen', 'full', 'lora'"),
    ("resume=/no/such.ckpt", "resume='/no/such.ckpt' is not a checkpoint file"),
])
def test_bad_config_is_refused_before_any_model_loads(override, message, no_model_loading, tmp_path, capsys):
    assert train.main([f"output_dir={tmp_path}", override]) == 2
    err = capsys.readouterr().err
    assert err.startswith("train.py: error: ") and len(err.strip().splitlines()) == 1
    import re
    assert re.search(message, err), err


def test_missing_config_file_is_refused(no_model_loading, capsys):
    assert train.main(["--config", "configs/nope.yaml"]) == 2
    assert "configs/nope.yaml" in capsys.readouterr().err


def test_a_run_that_fails_after_the_preflight_keeps_its_folder_and_says_where(tmp_path, monkeypatch, capsys):
    def crash(cfg):
        raise RuntimeError("the shards' file system went away")

    monkeypatch.setattr(train, "build_datamodule", crash)
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="went away"):  # a crash keeps its traceback
        train.main([f"output_dir={out}", f"data.shards={tmp_path / 'data'}"])
    err = capsys.readouterr().err
    assert f"the run stopped with RuntimeError; what it wrote is kept in {out}" in err
    assert (out / "config.yaml").is_file()


def test_print_config_shows_the_resolved_values(capsys):
    assert train.main(["--config", "configs/sd15_t5xl.yaml", "--print-config", "model.optim.lr=3e-5"]) == 0
    out = capsys.readouterr().out
    assert "lr: 3.0e-05" in out and "kalpeshk2011/rankgen-t5-xl-all" in out


def write_corrupt_shard(path: Path) -> None:
    good = png_bytes(32, "red")
    write_tar(path, [
        ("truncated", {"png": good[: len(good) // 2], "txt": b"a red square"}),
        ("garbage", {"jpg": b"<html>not an image</html>", "txt": b"a blue square"}),
        ("nocaption", {"png": good}),
        ("emptycaption", {"png": good, "txt": b"   "}),
        *[(f"good{i}", {"png": good, "txt": b"a red square"}) for i in range(4)],
    ])


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """One epoch (9 steps of 4) over 32 synthetic samples plus a shard with 4 corrupt and 4 good ones."""
    root = tmp_path_factory.mktemp("run")
    shards = root / "shards"
    write_synthetic_shards(shards, num_samples=32, samples_per_shard=16, resolution=32)
    write_corrupt_shard(shards / "shard-corrupt.tar")
    out = root / "out"
    assert train.main([f"output_dir={out}", f"data.shards={shards}", "data.synthetic_if_missing=false",
                       "trainer.max_steps=9", "checkpoint.every_n_steps=3", "model.ema.enabled=true", *FAST,
                       "validation.every_n_steps=9", "validation.num_inference_steps=2"]) == 0
    return out


@pytest.mark.slow
def test_corrupt_samples_are_skipped_and_counted(trained_run):
    metrics = json.loads((trained_run / "final_metrics.json").read_text())
    assert metrics["global_step"] == 9
    assert metrics["data/skipped_bad_image"] == 2  # truncated PNG, HTML named .jpg
    assert metrics["data/skipped_missing_caption"] == 1
    assert metrics["data/skipped_empty_caption"] == 1


@pytest.mark.slow
def test_run_folder_layout(trained_run):
    assert (trained_run / "config.yaml").read_text().startswith("output_dir:")
    names = {p.name for p in (trained_run / "checkpoints").iterdir()}
    assert {"last.ckpt", "step=0000003.ckpt", "step=0000006.ckpt", "step=0000009.ckpt"} <= names
    assert not any(n.startswith(".") for n in names)  # no temporary checkpoint files left behind
    assert (trained_run / "samples" / "step_0000009.png").exists()  # validation grid at the end
    assert (trained_run / "export" / "adapter" / "config.json").exists()
    assert (trained_run / "logs" / "metrics.csv").read_text().count("\n") >= 6


@pytest.mark.slow
def test_checkpoint_holds_only_the_trainable_state(trained_run):
    path = trained_run / "checkpoints" / "last.ckpt"
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    keys = set(ckpt["state_dict"])
    assert keys and all(k.startswith("adapter.") for k in keys)
    trainable_bytes = sum(v.numel() * v.element_size() for v in ckpt["state_dict"].values())
    # weights + EMA + Adam's two moments = 4x the trainable bytes, plus pickling overhead
    size = path.stat().st_size
    print(f"checkpoint {size} bytes, trainable {trainable_bytes} bytes, ratio {size / trainable_bytes:.2f}")
    assert 4 * trainable_bytes < size < 4 * trainable_bytes + 256 * 1024
    assert ckpt["global_step"] == 9
    assert len(ckpt["optimizer_states"]) == 1 and len(ckpt["lr_schedulers"]) == 1
    assert ckpt["ema"]["optimization_step"] == 9
    assert "WebDatasetDataModule" in ckpt  # the data position


@pytest.mark.slow
def test_resume_continues_at_the_saved_step_with_the_saved_optimizer(trained_run, tmp_path):
    from llm4gen.lightning_modules.llm4gen import LLM4GenModule

    step3 = torch.load(trained_run / "checkpoints" / "step=0000003.ckpt", map_location="cpu", weights_only=False)
    seen = {}

    import lightning as L

    class Inspect(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if "step" not in seen:
                seen["step"] = trainer.global_step
                state = trainer.optimizers[0].state_dict()["state"]
                seen["exp_avg"] = state[0]["exp_avg"].clone()

    cfg = train.load_config(None, [f"output_dir={tmp_path}", f"data.shards={trained_run.parent / 'shards'}",
                                   "data.synthetic_if_missing=false", "trainer.max_steps=4", *FAST,
                                   "model.ema.enabled=true", f"resume={trained_run / 'checkpoints' / 'step=0000003.ckpt'}"])
    module = LLM4GenModule(dict(cfg.model), seed=cfg.seed)
    trainer = train.build_trainer(cfg)
    trainer.callbacks.append(Inspect())
    trainer.fit(module, datamodule=train.build_datamodule(cfg), ckpt_path=cfg.resume)
    assert seen["step"] == 3 and trainer.global_step == 4
    torch.testing.assert_close(seen["exp_avg"], step3["optimizer_states"][0]["state"][0]["exp_avg"])


@pytest.mark.slow
def test_last_checkpoint_holds_the_final_step_when_that_is_not_a_checkpoint_step(trained_run, tmp_path):
    """max_steps=4 with checkpoints every 3: last.ckpt ends at step 4. Lightning's ModelCheckpoint leaves it
    at step 3 once this process has written a last.ckpt, so only a resumed run used to end at step 4."""
    assert train.main([f"output_dir={tmp_path}", f"data.shards={trained_run.parent / 'shards'}",
                       "data.synthetic_if_missing=false", "trainer.max_steps=4", "checkpoint.every_n_steps=3", *FAST,
                       "validation.at_start=false"]) == 0
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] == 4
    assert {p.name for p in (tmp_path / "checkpoints").iterdir()} == {"last.ckpt", "step=0000003.ckpt"}


@pytest.mark.slow
def test_generate_writes_the_same_images_for_the_same_seed(trained_run, tmp_path, capsys):
    ckpt = str(trained_run / "checkpoints" / "last.ckpt")
    args = ["--checkpoint", ckpt, "--prompt", "a red circle", "--prompt", "a blue square", "--steps", "3"]
    assert generate.main([*args, "--output-dir", str(tmp_path / "a"), "--seed", "7"]) == 0
    assert generate.main([*args, "--output-dir", str(tmp_path / "b"), "--seed", "7"]) == 0
    a, b = sorted((tmp_path / "a").glob("*.png")), sorted((tmp_path / "b").glob("*.png"))
    assert [p.name for p in a] == ["000-seed7-a-red-circle.png", "001-seed8-a-blue-square.png", "grid.png"]
    grid = Image.open(a[2])
    assert grid.width == 2 * (128 + 12) and grid.height > 128 + 30  # two captioned 128 px cells in a row
    a, b = a[:2], b[:2]
    for x, y in zip(a, b):
        assert np.array_equal(np.asarray(Image.open(x)), np.asarray(Image.open(y)))
    assert not np.array_equal(np.asarray(Image.open(a[0])), np.asarray(Image.open(a[1])))


def test_generate_refuses_a_missing_checkpoint(tmp_path, capsys):
    assert generate.main(["--checkpoint", str(tmp_path / "x.ckpt"), "--prompt", "p", "--output-dir", str(tmp_path)]) == 2
    assert "x.ckpt' does not exist" in capsys.readouterr().err


def test_the_resume_check_accepts_its_own_checkpoint_and_names_what_another_configuration_changed(trained_run, capsys):
    from llm4gen.launch.preflight import resume_checkpoint
    from llm4gen.lightning_modules.checkpoint_files import CheckpointError

    checkpoint = trained_run / "checkpoints" / "step=0000003.ckpt"
    common = [f"output_dir={trained_run}", f"data.shards={trained_run.parent / 'shards'}", "model.ema.enabled=true",
              f"resume={checkpoint}"]
    assert resume_checkpoint(train.load_config(None, common)) == str(checkpoint)
    with pytest.raises(CheckpointError, match="model.adapter.num_blocks: checkpoint 1, this config 2"):
        resume_checkpoint(train.load_config(None, [*common, "model.adapter.num_blocks=2"]))
    with pytest.raises(CheckpointError, match="model.ema.enabled: checkpoint True, this config False"):
        resume_checkpoint(train.load_config(None, [*common, "model.ema.enabled=false"]))
    # A truncated copy of the newest checkpoint: resume=auto falls back to the previous good one.
    newest = max((trained_run / "checkpoints").glob("step=*.ckpt"))
    data = newest.read_bytes()
    try:
        newest.write_bytes(data[: len(data) // 2])
        import os
        os.utime(newest)  # newest by time too
        found = resume_checkpoint(train.load_config(None, common[:-1]))
        assert found is not None and Path(found) != newest
        assert "skipping unreadable checkpoint" in capsys.readouterr().err
    finally:
        newest.write_bytes(data)

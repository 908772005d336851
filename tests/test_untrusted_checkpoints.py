"""A checkpoint crafted to create a file when unpickled, given to every entry point that reads checkpoints (and
dropped into a run folder before ``resume: auto``): the file is never created, the refusal is one paragraph that
names ``--trust-checkpoint``, exit code 2, and nothing is written or loaded. With ``--trust-checkpoint`` the same
file is read (its payload runs: the crafted files are live), and submit.py and sweep.py pass the flag on to the
training command they queue.

Each case runs in-process through the entry point's own ``main`` (the ``configs.errors.entry_point`` wrapper a
shell invocation goes through), with anything that would load a model, train, submit or pretrain replaced by a
tripwire; one case also runs as a real process."""

from __future__ import annotations

import dataclasses
import importlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers.untrusted import CreatesFile, crafted_checkpoint, listing, sharded_checkpoint

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def tripwires(monkeypatch):
    """Loading a model, training, submitting, running a sweep or pretraining fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("work started before the crafted checkpoint was refused")

    import llm4gen.encoders.llm as llm
    import llm4gen.encoders.stable_diffusion as sd
    import llm4gen.tools.pretrain as pretrain
    from llm4gen.cli import submit, sweep, train
    from llm4gen.lightning_modules.llm4gen import LLM4GenModule

    monkeypatch.setitem(sd.LOADERS, "sd15", refuse)
    monkeypatch.setattr(llm.LLMEncoder, "__init__", refuse)
    monkeypatch.setattr(LLM4GenModule, "__init__", refuse)
    monkeypatch.setattr(train, "run", refuse)
    monkeypatch.setattr(submit, "submit", refuse)
    monkeypatch.setattr(sweep, "run_locally", refuse)
    monkeypatch.setattr(sweep, "submit", refuse)
    monkeypatch.setattr(pretrain, "make_dataset", refuse)


@pytest.fixture
def files(tmp_path) -> dict[str, Path]:
    """The crafted files, each in a folder of its own; ``marker``: what their payload would create."""
    marker = tmp_path / "payload-ran"
    run = tmp_path / "run"  # a run folder someone dropped a crafted last.ckpt into
    crafted_checkpoint(run / "checkpoints" / "last.ckpt", marker)
    mixed = tmp_path / "mixed"  # a good checkpoint, and a crafted signal checkpoint beside it
    (mixed / "checkpoints").mkdir(parents=True)
    torch.save({"global_step": 4, "state_dict": {}}, mixed / "checkpoints" / "last.ckpt")
    crafted_checkpoint(mixed / "hpc_ckpt_9.ckpt", marker, step=9)
    sharded = tmp_path / "sharded"
    sharded_checkpoint(sharded / "checkpoints" / "last.ckpt", meta_extra={"loops": CreatesFile(marker)})
    stages = tmp_path / "pretrain" / "stages"
    stages.mkdir(parents=True)
    torch.save({"step": 3, "curve": [], "generator": CreatesFile(marker)}, stages / "unet.partial.pt")
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(f"config: {REPO_ROOT / 'configs' / 'tiny.yaml'}\noutput_root: {tmp_path / 'sweep'}\n"
                          f"base_overrides: [resume={run / 'checkpoints' / 'last.ckpt'}]\n"
                          "runs:\n  - {data.batch_size: 4}\n")
    return {"tmp": tmp_path, "marker": marker, "ckpt": run / "checkpoints" / "last.ckpt", "run": run,
            "mixed": mixed, "sharded_run": sharded, "sharded": sharded / "checkpoints" / "last.ckpt",
            "pretrain": tmp_path / "pretrain", "sweep_file": sweep_file}


DATA = "data.shards={tmp}/data"  # train.py would write synthetic shards there: nothing may appear
CASES = [
    ("generate", ["--checkpoint", "{ckpt}", "--prompt", "a red circle", "--output-dir", "{tmp}/out"]),
    ("generate", ["--checkpoint", "{sharded}", "--prompt", "a red circle", "--output-dir", "{tmp}/out"]),
    ("export", ["--checkpoint", "{ckpt}", "--output", "{tmp}/out"]),
    ("export", ["--checkpoint", "{sharded}", "--output", "{tmp}/out"]),
    ("evaluate", ["--checkpoint", "{ckpt}", "--shapes", "seen_1", "--output-dir", "{tmp}/out"]),
    ("attention_maps", ["--checkpoint", "{ckpt}", "--prompt", "a red cube", "--output", "{tmp}/out/maps.png"]),
    ("train", ["output_dir={tmp}/out", "resume={ckpt}", DATA]),
    ("train", ["output_dir={run}", DATA]),  # resume: auto finds the crafted last.ckpt
    ("train", ["output_dir={mixed}", DATA]),  # ... a crafted signal checkpoint beside a good one
    ("train", ["output_dir={sharded_run}", DATA]),  # ... a sharded folder whose meta.pt is crafted
    ("submit", ["--config", "configs/tiny.yaml", "--dry-run", "output_dir={run}", DATA]),
    ("sweep", ["{sweep_file}"]),
    ("pretrain", ["--output", "{pretrain}"]),
]
MODULES = {"pretrain": "llm4gen.cli.pretrain"}


def run_main(entry: str, argv: list[str], files) -> int:
    return importlib.import_module(MODULES.get(entry, f"llm4gen.cli.{entry}")).main(
        [a.format(**files) for a in argv])


@pytest.mark.parametrize("entry, argv", CASES, ids=[f"{e}:{' '.join(a)[:40]}" for e, a in CASES])
def test_a_crafted_checkpoint_is_refused_before_its_payload_runs(entry, argv, files, tripwires, capsys, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    before = listing(files["tmp"])
    code = run_main(entry, argv, files)
    err = capsys.readouterr().err
    assert code == 2, err
    message = [line for line in err.splitlines() if line.strip()]
    prog = entry if entry == "pretrain" else f"{entry}.py"
    assert len(message) == 1 and message[0].startswith(f"{prog}: error: "), err
    assert "holds more than tensors and plain Python values" in message[0] and "--trust-checkpoint" in message[0]
    assert not files["marker"].exists(), "the crafted checkpoint's payload ran"
    assert listing(files["tmp"]) == before, "a refused command wrote files"


def test_trusted_the_same_file_is_read_and_resumed_from(files, tripwires, monkeypatch):
    from llm4gen.cli import train

    started = []
    monkeypatch.setattr(train, "run", lambda cfg, ckpt_path, console_level: started.append(ckpt_path) or {})
    assert train.main(["--trust-checkpoint", f"output_dir={files['tmp'] / 'out'}", f"resume={files['ckpt']}",
                       DATA.format(**files)]) == 0
    assert files["marker"].exists() and started == [str(files["ckpt"])]


def test_submit_and_sweep_pass_the_flag_on_to_the_queued_training(files, tripwires, capsys, monkeypatch):
    from llm4gen.cli import submit
    from llm4gen.launch.sweep import expand_runs, load_sweep, train_command

    monkeypatch.chdir(REPO_ROOT)
    assert submit.main(["--config", "configs/tiny.yaml", "--dry-run", "--trust-checkpoint",
                        f"output_dir={files['run']}", DATA.format(**files)]) == 0
    script = capsys.readouterr().out
    assert "llm4gen.cli.train --trust-checkpoint --config" in script and files["marker"].exists()
    spec = load_sweep(files["sweep_file"])
    run = expand_runs(spec)[0]
    assert "--trust-checkpoint" not in train_command(spec, run)
    trusted = train_command(dataclasses.replace(spec, trust_checkpoint=True), run)
    assert trusted[3] == "--trust-checkpoint" and trusted[4] == "--config"


@pytest.mark.slow
def test_as_a_real_process_the_refusal_exits_2_without_running_the_payload(files):
    result = subprocess.run([sys.executable, str(REPO_ROOT / "generate.py"), "--checkpoint", str(files["ckpt"]),
                             "--prompt", "a", "--output-dir", str(files["tmp"] / "out")],
                            capture_output=True, text=True, cwd=files["tmp"], timeout=180)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "--trust-checkpoint" in result.stderr and not files["marker"].exists()
    assert not (files["tmp"] / "out").exists()


def test_a_crafted_released_projector_is_refused_whatever_the_flag(files, tripwires, capsys, monkeypatch):
    from llm4gen.cli import train

    monkeypatch.chdir(REPO_ROOT)
    release = files["tmp"] / "release"
    release.mkdir()
    torch.save({"proj.weight": torch.zeros(2), "x": CreatesFile(files["marker"])}, release / "projector.pth")
    for flags in ([], ["--trust-checkpoint"]):  # the flag is for checkpoints: the CAM's loader never unpickles
        assert train.main([*flags, f"output_dir={files['tmp'] / 'out'}", f"model.adapter.init_from={release}",
                           DATA.format(**files)]) == 2
        err = capsys.readouterr().err
        assert "holds more than tensors (it names io.open)" in err and "was not read" in err, err
        assert not files["marker"].exists()

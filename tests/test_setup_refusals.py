"""Every refusal the config alone decides is made before any model loads (issue 51).

REFUSALS (tests/helpers/refusals.py) holds the refusals that used to live in constructors and setup code only
(the LightningModule, the encoders, the datamodule, the objective, the sharded strategy), each with the
overrides that make it. Given to ``train.py``, ``submit.py --dry-run`` and ``sweep.py`` (in-process ``main()``,
with tripwires on every model load, training run and submission), each is one paragraph, exit code 2, the same
message, and nothing written; and ``load_config`` with the preflight alone refuses it. A refusal that depends on
the machine that trains (a C++ compiler, bitsandbytes) is train.py's and a local sweep's; ``submit.py`` leaves it
to train.py's own preflight in the job, which still runs before any model loads. tests/test_refusal_parity.py
keeps it so; tests/test_bad_inputs.py holds the refusals that never lived in a constructor.
"""

from __future__ import annotations

import pytest
import yaml

from llm4gen.configs.errors import UserError
from llm4gen.configs.schema import load_config
from llm4gen.launch.preflight import preflight
from tests.helpers.refusals import REFUSALS, fill, write_refusal_files


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    return write_refusal_files(tmp_path_factory.mktemp("setup-refusals"))


@pytest.fixture
def tripwires(monkeypatch):
    """Loading a model, training, submitting or starting a sweep's run fails the test: the refusal must come first."""
    def refuse(*args, **kwargs):
        raise AssertionError("work started before the bad config was refused")

    import llm4gen.encoders.llm as llm
    import llm4gen.encoders.stable_diffusion as sd
    import llm4gen.launch.sweep as launch_sweep
    from llm4gen.cli import submit as submit_cli
    from llm4gen.cli import sweep as sweep_cli
    from llm4gen.cli import train as train_cli

    for family in sd.LOADERS:
        monkeypatch.setitem(sd.LOADERS, family, refuse)
    monkeypatch.setattr(llm.LLMEncoder, "__init__", refuse)
    monkeypatch.setattr(train_cli, "run", refuse)
    monkeypatch.setattr(sweep_cli, "run_locally", refuse)
    monkeypatch.setattr(sweep_cli, "submit", refuse)
    monkeypatch.setattr(launch_sweep.subprocess, "run", refuse)
    monkeypatch.setattr(submit_cli, "submit", refuse)


@pytest.mark.parametrize("name", REFUSALS)
def test_the_config_checks_alone_refuse_it(name, files, monkeypatch, tmp_path):
    refusal = REFUSALS[name]
    monkeypatch.chdir(tmp_path)
    if refusal.setup:
        refusal.setup(monkeypatch)
    with pytest.raises(UserError, match=None) as refused:
        preflight(load_config(None, [f"output_dir={tmp_path / 'run'}", *fill(refusal.overrides, files)]))
    assert fill([refusal.message], files)[0] in str(refused.value)


@pytest.mark.parametrize("name", REFUSALS)
def test_train_submit_and_sweep_refuse_it_in_one_paragraph_before_anything_loads(name, files, tripwires, monkeypatch,
                                                                                tmp_path, capsys):
    from llm4gen.cli import submit as submit_cli
    from llm4gen.cli import sweep as sweep_cli
    from llm4gen.cli import train as train_cli

    refusal = REFUSALS[name]
    monkeypatch.chdir(tmp_path)  # the default synthetic shards' folder (data/) would be made here
    if refusal.setup:
        refusal.setup(monkeypatch)
    overrides = fill(refusal.overrides, files)
    config = tmp_path / "run.yaml"
    config.write_text(f"output_dir: {tmp_path / 'runs' / 'one'}\n")

    def paragraph(code: int) -> tuple[int, str]:
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) <= 1 and "Traceback" not in err, err
        return code, lines[0].split(": error: ", 1)[1] if lines else ""

    code, message = paragraph(train_cli.main(["--config", str(config), *overrides]))
    assert code == 2 and fill([refusal.message], files)[0] in message
    code, submitted = paragraph(submit_cli.main(["--config", str(config), "--dry-run", *overrides]))
    if refusal.machine:
        assert (code, submitted) == (0, "")  # the job's own train.py refuses it on the node, before any model loads
    else:
        assert (code, submitted) == (2, message)
    capsys.readouterr()
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({"config": str(config), "output_root": str(tmp_path / "sweep"),
                                     "base_overrides": overrides, "grid": {"seed": [0]}}))
    code, swept = paragraph(sweep_cli.main([str(sweep)]))
    assert code == 2 and "no run was started" in swept and swept.endswith(message)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.yaml", "sweep.yaml"], "a refused run wrote files"


def test_a_sharded_folder_is_refused_under_ddp_and_a_file_under_fsdp2(tmp_path):
    from llm4gen.lightning_modules.checkpoint_files import META_FILE, CheckpointError, check_resume_layout

    (tmp_path / "step=4.ckpt").mkdir()
    (tmp_path / "step=4.ckpt" / META_FILE).write_bytes(b"")
    (tmp_path / "last.ckpt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="resumes under trainer.strategy=fsdp2 only"):
        check_resume_layout(tmp_path / "step=4.ckpt", "ddp")
    with pytest.raises(CheckpointError, match="is not a sharded checkpoint folder"):
        check_resume_layout(tmp_path / "last.ckpt", "fsdp2")
    check_resume_layout(tmp_path / "step=4.ckpt", "fsdp2")
    check_resume_layout(tmp_path / "last.ckpt", None)


def test_the_precomputed_keys_are_the_cache_members():
    from llm4gen.configs.choices import PRECOMPUTED_KEYS
    from llm4gen.datamodules.cache_codec import PRECOMPUTED_MEMBERS

    assert set(PRECOMPUTED_KEYS) == set(PRECOMPUTED_MEMBERS)

"""submit.py and sweep.py refuse exactly what train.py refuses, before anything is written or queued:
each of the preflight's checks (model sources, shards, output folder, CAM init file, validation
scheduler, resume file), given one bad value, stops all three entry points with the same message."""

import pytest

from llm4gen.cli import submit as submit_cli
from llm4gen.cli import sweep as sweep_cli
from llm4gen.cli import train as train_cli
from llm4gen.datamodules.synthetic import write_synthetic_shards


def bad_values(tmp_path):
    (tmp_path / "notes.txt").write_text("not an adapter\n")
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    (tmp_path / "a-file").write_text("")
    return {
        "model source": (f"model.base.pretrained={tmp_path / 'no-such-model'}", "model.base.pretrained"),
        "shards": (f"data.shards={tmp_path / 'no-shards'}", "data.shards"),
        "output folder": (f"output_dir={tmp_path / 'a-file' / 'run'}", "output_dir"),
        "CAM init file": (f"model.adapter.init_from={tmp_path / 'notes.txt'}", "init_from"),
        "validation scheduler": ("validation.scheduler=NoSuchScheduler", "NoSuchScheduler"),
        "resume file": (f"resume={tmp_path / 'junk.ckpt'}", "junk.ckpt"),
    }


CHECKS = ["model source", "shards", "output folder", "CAM init file", "validation scheduler", "resume file"]


@pytest.mark.parametrize("check", CHECKS)
def test_submit_and_sweep_refuse_what_train_refuses(tmp_path, capsys, monkeypatch, check):
    monkeypatch.chdir(tmp_path)
    bad, named = bad_values(tmp_path)[check]
    config = tmp_path / "run.yaml"
    config.write_text(f"output_dir: {tmp_path / 'runs' / 'one'}\ndata:\n  synthetic_if_missing: false\n"
                      f"  shards: {tmp_path / 'shards'}\n")
    write_synthetic_shards(str(tmp_path / "shards"), num_samples=4, samples_per_shard=2)
    submitted = []
    monkeypatch.setattr(submit_cli, "submit", lambda path: submitted.append(path) or "1")

    assert train_cli.main(["--config", str(config), "--print-config"]) == 0  # the good config passes the schema
    capsys.readouterr()

    def refusal(main, argv):
        """An entry point's exit code and the message after its 'prog: error: ' prefix."""
        code = main(argv)
        err = capsys.readouterr().err.strip()
        return code, err.split("error: ", 1)[-1]

    code, message = refusal(train_cli.main, ["--config", str(config), bad])
    assert code == 2 and named in message
    assert refusal(submit_cli.main, ["--config", str(config), bad]) == (2, message)

    sweep_file = tmp_path / "sweep.yaml"
    # a sweep names each run's output_dir itself, under output_root: the bad folder goes there
    output_root = tmp_path / "a-file" / "sweep" if check == "output folder" else tmp_path / "sweep"
    base = [] if check == "output folder" else [bad]
    sweep_file.write_text(f"config: {config}\noutput_root: {output_root}\nbase_overrides: {base}\n"
                          f"grid:\n  seed: [0, 1]\n")
    code, sweep_message = refusal(sweep_cli.main, [str(sweep_file)])
    assert code == 2 and named in sweep_message and "no run was started" in sweep_message
    if check != "output folder":
        assert message in sweep_message
    assert submitted == [] and not (tmp_path / "runs").exists() and not (tmp_path / "sweep").exists()

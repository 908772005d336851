"""sbatch script rendering, submission through sbatch (a stand-in on PATH), and the `slurm:` section.

These need no cluster: a small shell script named `sbatch` records its arguments and answers the way
the real one does. Real jobs run in test_slurm_cluster.py.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from llm4gen.cli import submit as submit_cli
from llm4gen.launch.slurm import (
    SlurmConfig,
    SlurmError,
    load_slurm_section,
    log_path_pattern,
    render_sbatch_script,
    slurm_config_from_dict,
    submit,
)


def sbatch_lines(script: str) -> list[str]:
    return [line.removeprefix("#SBATCH ") for line in script.splitlines() if line.startswith("#SBATCH ")]


@pytest.fixture
def fake_sbatch(tmp_path, monkeypatch):
    """Put an `sbatch` on PATH that logs its arguments, prints `4242;local` and exits with $FAKE_SBATCH_RC."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "sbatch-calls.txt"
    sbatch = bin_dir / "sbatch"
    sbatch.write_text(
        "#!/bin/sh\n"
        f'echo "$@" >> {calls}\n'
        'if [ "${FAKE_SBATCH_RC:-0}" != 0 ]; then echo "sbatch: error: invalid partition specified: gpu" >&2; '
        "exit $FAKE_SBATCH_RC; fi\n"
        "echo '4242;local'\n"
    )
    sbatch.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return calls


# ---------------------------------------------------------------- SlurmConfig and the script


def test_tasks_per_node_defaults_to_one_per_gpu_or_one_for_cpu_jobs():
    assert SlurmConfig().ntasks_per_node == 1
    assert SlurmConfig(gpus_per_node=4).ntasks_per_node == 4
    assert SlurmConfig(gpus_per_node=4, tasks_per_node=1).ntasks_per_node == 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"nodes": 0}, "slurm.nodes must be >= 1"),
        ({"gpus_per_node": -1}, "slurm.gpus_per_node must be >= 0"),
        ({"tasks_per_node": 0}, "slurm.tasks_per_node must be >= 1"),
        ({"signal_seconds": -5}, "slurm.signal_seconds must be >= 0"),
    ],
)
def test_impossible_resources_are_rejected(kwargs, message):
    with pytest.raises(SlurmError, match=message):
        SlurmConfig(**kwargs)


def test_cpu_job_script_has_one_task_requeue_signal_and_append_log(tmp_path):
    command = ["python", "train.py", "--config", "c.yaml"]
    script = render_sbatch_script(SlurmConfig(), command, tmp_path / "run", workdir=tmp_path)

    assert sbatch_lines(script) == [
        "--job-name=run",
        "--nodes=1",
        "--ntasks-per-node=1",
        "--time=04:00:00",
        "--signal=SIGUSR1@120",
        "--requeue",
        "--open-mode=append",
        f"--output={tmp_path / 'run'}/slurm-%j.out",
        f"--chdir={tmp_path}",
    ]
    assert script.startswith("#!/bin/bash\n")
    assert script.rstrip().endswith("srun --kill-on-bad-exit=1 python train.py --config c.yaml")


def test_gpu_job_script_asks_for_gpus_and_one_task_per_gpu_with_every_set_option(tmp_path):
    cfg = SlurmConfig(
        nodes=2,
        gpus_per_node=4,
        cpus_per_task=8,
        mem="200G",
        time="1-00:00:00",
        partition="gpu",
        account="proj42",
        qos="high",
        signal_seconds=300,
        job_name="llm4gen",
        extra_sbatch_lines=["--exclusive", "#SBATCH --constraint=h100"],
        array="0-3",
    )
    lines = sbatch_lines(render_sbatch_script(cfg, ["python", "train.py"], tmp_path))

    for expected in [
        "--job-name=llm4gen", "--nodes=2", "--ntasks-per-node=4", "--gres=gpu:4", "--cpus-per-task=8",
        "--mem=200G", "--time=1-00:00:00", "--partition=gpu", "--account=proj42", "--qos=high",
        "--array=0-3", "--signal=SIGUSR1@300", "--exclusive", "--constraint=h100",
        f"--output={tmp_path}/slurm-%A_%a.out",
    ]:  # fmt: skip
        assert expected in lines


def test_the_preemption_signal_is_configurable(tmp_path):
    lines = sbatch_lines(render_sbatch_script(SlurmConfig(signal="SIGTERM", signal_seconds=90), ["true"], tmp_path))
    assert "--signal=SIGTERM@90" in lines


def test_disabled_signal_and_requeue_are_left_out(tmp_path):
    lines = sbatch_lines(render_sbatch_script(SlurmConfig(signal_seconds=0, requeue=False), ["true"], tmp_path))
    assert "--no-requeue" in lines
    assert not any(line.startswith("--signal") for line in lines)


def test_setup_lines_run_before_srun_and_arguments_are_shell_quoted(tmp_path):
    cfg = SlurmConfig(setup_lines=["module load cuda/12.4", "source /opt/venv/bin/activate"])
    command = ["python", "train.py", "prompt=a cat's hat", "x=$HOME"]
    script = render_sbatch_script(cfg, command, tmp_path)

    body = script.splitlines()
    srun = next(line for line in body if line.startswith("srun"))
    assert body.index("module load cuda/12.4") < body.index("source /opt/venv/bin/activate") < body.index(srun)
    assert shlex.split(srun)[2:] == command  # the job sees exactly these arguments
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0


def test_empty_command_is_rejected(tmp_path):
    with pytest.raises(SlurmError, match="needs a command"):
        render_sbatch_script(SlurmConfig(), [], tmp_path)


def test_log_pattern_uses_job_id_or_array_ids(tmp_path):
    assert log_path_pattern(SlurmConfig(), tmp_path) == tmp_path / "slurm-%j.out"
    assert log_path_pattern(SlurmConfig(array="0-1"), tmp_path) == tmp_path / "slurm-%A_%a.out"


# ---------------------------------------------------------------- submission


def test_submit_runs_sbatch_parsable_and_returns_the_job_id(tmp_path, fake_sbatch):
    script = tmp_path / "job.sbatch"
    script.write_text("#!/bin/bash\n")
    assert submit(script) == "4242"
    assert fake_sbatch.read_text().split() == ["--parsable", str(script)]


def test_submit_failure_shows_sbatch_stderr(tmp_path, fake_sbatch, monkeypatch):
    monkeypatch.setenv("FAKE_SBATCH_RC", "1")
    with pytest.raises(SlurmError, match="invalid partition specified: gpu"):
        submit(tmp_path / "job.sbatch")


def test_submit_without_sbatch_says_where_to_run(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(SlurmError, match="sbatch is not on PATH: submit from a SLURM login node"):
        submit(tmp_path / "job.sbatch")


# ---------------------------------------------------------------- the slurm: section


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "experiment.yaml"
    path.write_text(text)
    return path


def test_slurm_section_is_read_with_overrides_on_top(tmp_path):
    config = write_config(
        tmp_path, "output_dir: runs/x\nslurm:\n  gpus_per_node: 8\n  time: '02:00:00'\n  partition: gpu\n"
    )
    cfg = load_slurm_section(config, ["slurm.time=00:30:00", "slurm.setup_lines=[module load cuda]"])
    assert cfg == SlurmConfig(gpus_per_node=8, time="00:30:00", partition="gpu", setup_lines=["module load cuda"])


def test_missing_slurm_section_gives_defaults(tmp_path):
    assert load_slurm_section(write_config(tmp_path, "output_dir: runs/x\n"), []) == SlurmConfig()


@pytest.mark.parametrize(
    ("section", "message"),
    [
        # checked by the run schema (configs/schema.py), which names the closest valid keys
        ("gpu_per_node: 2", r"unknown config key 'slurm\.gpu_per_node' \(from .*experiment\.yaml\)\. "
                            r"Closest valid keys: slurm\.gpus_per_node"),
        ("signal_second: 60", r"unknown config key 'slurm\.signal_second' .*Closest valid keys: slurm\.signal_seconds"),
        ("signal: SIGKILL", r"slurm\.signal='SIGKILL': expected one of SIGUSR1, SIGUSR2, SIGTERM"),
        ("nodes: many", r"config key 'slurm\.nodes' .*Value 'many' of type 'str' could not be converted to Integer\. "
                        r"The default is 1\."),
        # checked by SlurmConfig itself
        ("nodes: 0", r"slurm\.nodes must be >= 1, got 0"),
        # checked before the schema, which would turn the number 1800 into the string "1800"
        ("time: 30:00", re.escape('slurm.time is the number 1800; write it as a quoted string such as "30:00"')),
    ],
)
def test_bad_slurm_section_is_rejected_with_the_fix(tmp_path, section, message):
    with pytest.raises(SlurmError, match=message):
        load_slurm_section(write_config(tmp_path, f"slurm:\n  {section}\n"), [])


def test_time_override_read_as_a_number_is_rejected(tmp_path):
    config = write_config(tmp_path, "output_dir: runs/x\n")
    with pytest.raises(SlurmError, match=re.escape("slurm.time is the number 1800; write it as a quoted string")):
        load_slurm_section(config, ["slurm.time=30:00"])
    assert load_slurm_section(config, ["slurm.time='30:00'"]).time == "30:00"


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(SlurmError, match=r"config file '.*nope\.yaml' does not exist here .* and is not a shipped config; shipped: configs/"):
        load_slurm_section(tmp_path / "nope.yaml", [])


def test_slurm_config_from_dict_rejects_a_non_mapping():
    with pytest.raises(SlurmError, match="must be a mapping"):
        slurm_config_from_dict(["nodes", 2])


# ---------------------------------------------------------------- submit.py


def test_submit_cli_writes_the_script_into_the_run_folder_and_prints_job_and_log(tmp_path, fake_sbatch, capsys):
    run_dir = tmp_path / "runs" / "x"
    config = write_config(tmp_path, f"output_dir: {tmp_path / 'runs' / 'default'}\nslurm: {{gpus_per_node: 2}}\n")

    overrides = ["trainer.max_steps=20", "slurm.time=00:10:00", f"output_dir={run_dir}"]
    assert submit_cli.main(["--config", str(config), *overrides]) == 0

    script = (run_dir / "slurm.sbatch").read_text()
    assert "#SBATCH --ntasks-per-node=2" in script and "#SBATCH --gres=gpu:2" in script
    assert "#SBATCH --time=00:10:00" in script
    srun = shlex.split(next(line for line in script.splitlines() if line.startswith("srun")))
    assert srun[-4:] == ["--config", str(config), "trainer.max_steps=20", f"output_dir={run_dir}"]
    assert srun[-7:-4] == [sys.executable, "-m", "llm4gen.cli.train"]  # runs from an installed wheel too
    assert capsys.readouterr().out.splitlines() == [
        "submitted job 4242",
        f"log: {run_dir}/slurm-4242.out",
        f"script: {run_dir / 'slurm.sbatch'}",
    ]


def test_submit_cli_dry_run_prints_the_script_and_writes_nothing(tmp_path, fake_sbatch, capsys):
    config = write_config(tmp_path, f"output_dir: {tmp_path / 'run'}\n")
    assert submit_cli.main(["--config", str(config), "--dry-run"]) == 0
    assert "#SBATCH --open-mode=append" in capsys.readouterr().out
    assert not (tmp_path / "run").exists() and not fake_sbatch.exists()


def test_submit_cli_without_output_dir_uses_the_schema_default_under_the_current_directory(
    tmp_path, fake_sbatch, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path, "trainer: {max_steps: 1}\n")
    assert submit_cli.main(["--config", str(config)]) == 0
    script = (tmp_path / "runs" / "tiny" / "slurm.sbatch").read_text()  # output_dir's default: runs/tiny
    srun = shlex.split(next(line for line in script.splitlines() if line.startswith("srun")))
    assert srun[-1] == f"output_dir={tmp_path / 'runs' / 'tiny'}"


def test_submit_cli_refuses_an_empty_output_dir(tmp_path, fake_sbatch, capsys):
    config = write_config(tmp_path, "trainer: {max_steps: 1}\n")
    assert submit_cli.main(["--config", str(config), "output_dir="]) == 2
    assert "config key 'output_dir' (from command line): Incompatible value 'None'" in capsys.readouterr().err
    assert submit_cli.main(["--config", str(config), "output_dir=''"]) == 2
    assert "sets no output_dir; pass one, e.g. output_dir=runs/my-run" in capsys.readouterr().err
    assert not fake_sbatch.exists()

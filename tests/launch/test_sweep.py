"""Sweep expansion, run naming, local runs (a fake trainer for the fast cases, the real train.py for a
2x2 grid of tiny runs), skipping finished runs, summaries, the SLURM array script.

The SLURM-array form of a sweep runs on a real local cluster in test_slurm_cluster.py.
"""

from __future__ import annotations

import csv
import json
import math
import re
import textwrap
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from llm4gen.cli import sweep as sweep_cli
from llm4gen.datamodules.synthetic import write_synthetic_shards
from llm4gen.launch.sweep import (
    MAX_NAME_LENGTH,
    SweepError,
    SweepSpec,
    expand_runs,
    format_value,
    load_sweep,
    resolve_array_task,
    run_name,
    train_command,
    write_array_runs_file,
)

REPO_ROOT = Path(__file__).resolve().parents[2]

# Stands in for train.py where a real run would only slow a test down, honouring the same contract: `--config CFG key=value ...`
# read with OmegaConf, the run folder `output_dir` with checkpoints/last.ckpt (here: the step count),
# resume from that checkpoint, final_metrics.json written last. It also records what the tests check:
# each start (restart count, step resumed from, rank) in starts.log, and each invocation in
# fake.counter_file. fake.fail=true makes it exit with code 3 before training.
FAKE_TRAINER = textwrap.dedent(
    '''
    import argparse, json, os, sys, time
    from pathlib import Path
    from omegaconf import OmegaConf

    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cfg = OmegaConf.merge(OmegaConf.load(args.config), OmegaConf.from_dotlist(args.overrides))
    out = Path(cfg.output_dir)
    fake = cfg.get("fake") or {}
    rank = int(os.environ.get("SLURM_PROCID", 0))
    if fake.get("counter_file"):
        with open(fake.counter_file, "a") as handle:
            handle.write(out.name + "\\n")
    if fake.get("fail"):
        sys.exit(3)
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, out / "config.yaml")
    checkpoint = out / "checkpoints" / "last.ckpt"
    step = int(checkpoint.read_text()) if checkpoint.exists() else 0
    start = {
        "restart": int(os.environ.get("SLURM_RESTART_COUNT", 0)),
        "start_step": step,
        "rank": rank,
        "ntasks": int(os.environ.get("SLURM_NTASKS", 1)),
        "omp_threads": os.environ.get("OMP_NUM_THREADS"),
        "time": time.time(),
    }
    with open(out / "starts.log", "a") as handle:
        handle.write(json.dumps(start) + "\\n")
    print(f"fake trainer rank {rank} starts at step {step}", flush=True)
    while step < cfg.trainer.max_steps:
        time.sleep(fake.get("step_seconds", 0))
        step += 1
        if rank == 0:
            partial = checkpoint.with_suffix(".partial")
            partial.write_text(str(step))
            os.replace(partial, checkpoint)
    if rank == 0:
        loss = cfg.optim.lr * 1000 + cfg.model.adapter.num_blocks
        (out / "final_metrics.json").write_text(json.dumps({"train/loss": loss, "global_step": step, "end": time.time()}))
    '''
)


def write_fake_trainer(directory: Path) -> Path:
    path = Path(directory) / "fake_train.py"
    path.write_text(FAKE_TRAINER)
    return path


def write_base_config(directory: Path, **fake: object) -> Path:
    """A run config for the fake trainer (fake: keys go to its `fake:` section)."""
    config = {
        "output_dir": str(Path(directory) / "runs" / "default"),
        "trainer": {"max_steps": 3},
        "optim": {"lr": 0.001},
        "model": {"adapter": {"num_blocks": 1}},
        "fake": {"step_seconds": 0, **fake},
    }
    path = Path(directory) / "experiment.yaml"
    OmegaConf.save(OmegaConf.create(config), path)
    return path


def write_sweep(directory: Path, config: Path, body: str) -> Path:
    path = Path(directory) / "sweep.yaml"
    path.write_text(f"config: {config}\noutput_root: {Path(directory) / 'out'}\n" + textwrap.dedent(body))
    return path


GRID_2X2 = """
    base_overrides: [trainer.max_steps=2]
    grid:
      optim.lr: [1.0e-4, 3.0e-4]
      model.adapter.num_blocks: [1, 2]
"""


@pytest.fixture
def fake_trainer(tmp_path: Path) -> Path:
    return write_fake_trainer(tmp_path)


def counter_lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


# ---------------------------------------------------------------- expansion and naming


def test_grid_2x2_expands_to_4_runs_with_exact_overrides_names_and_commands(tmp_path):
    spec = load_sweep(write_sweep(tmp_path, Path("exp.yaml"), GRID_2X2))
    runs = expand_runs(spec)

    assert [run.override_args for run in runs] == [
        ["optim.lr=0.0001", "model.adapter.num_blocks=1"],
        ["optim.lr=0.0001", "model.adapter.num_blocks=2"],
        ["optim.lr=0.0003", "model.adapter.num_blocks=1"],
        ["optim.lr=0.0003", "model.adapter.num_blocks=2"],
    ]
    assert [run.name for run in runs] == [
        "optim.lr=0.0001_model.adapter.num_blocks=1",
        "optim.lr=0.0001_model.adapter.num_blocks=2",
        "optim.lr=0.0003_model.adapter.num_blocks=1",
        "optim.lr=0.0003_model.adapter.num_blocks=2",
    ]
    assert all(run.output_dir == tmp_path / "out" / run.name for run in runs)
    assert train_command(spec, runs[1], python="python") == [
        "python", "-m", "llm4gen.cli.train", "--config", "exp.yaml", "trainer.max_steps=2",
        "optim.lr=0.0001", "model.adapter.num_blocks=2",
        f"output_dir={tmp_path / 'out' / runs[1].name}",
    ]  # fmt: skip
    # a custom training script runs by its absolute path: a job's working directory may differ
    assert train_command(spec, runs[1], "train.py", python="python")[:2] == ["python", str(Path("train.py").absolute())]


def test_runs_list_crossed_with_grid_puts_runs_entries_outermost(tmp_path):
    spec = load_sweep(
        write_sweep(
            tmp_path,
            Path("exp.yaml"),
            """
            runs:
              - {data.name: coco}
              - {data.name: laion, trainer.max_steps: 9}
            grid:
              optim.lr: [0.1, 0.2]
            """,
        )
    )
    assert [run.override_args for run in expand_runs(spec)] == [
        ["data.name=coco", "optim.lr=0.1"],
        ["data.name=coco", "optim.lr=0.2"],
        ["data.name=laion", "trainer.max_steps=9", "optim.lr=0.1"],
        ["data.name=laion", "trainer.max_steps=9", "optim.lr=0.2"],
    ]


def test_runs_list_alone_gives_one_run_per_entry(tmp_path):
    spec = load_sweep(write_sweep(tmp_path, Path("exp.yaml"), "runs: [{seed: 1}, {seed: 2}, {seed: 3}]\n"))
    assert [run.name for run in expand_runs(spec)] == ["seed=1", "seed=2", "seed=3"]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("grd: {a: [1]}\n", "did you mean 'grid'"),
        ("grid: {a: [1]}\nruns: [{a: 2}]\n", "appear in both grid: and runs:"),
        ("grid: {a: []}\n", "grid.a must be a non-empty list"),
        ("base_overrides: [a.b]\ngrid: {a: [1]}\n", "base_overrides must be a list of 'dotted.key=value'"),
        ("max_parallel: 0\ngrid: {a: [1]}\n", "max_parallel must be a positive integer"),
        ("runs: [{a: 1}, {a: 1}]\n", "remove the duplicate"),
        ("base_overrides: [a=1]\n", "defines no runs"),
        ("grid: {a: [1]\n", "cannot read sweep file"),
        ("slurm: {gpu_per_node: 2}\ngrid: {a: [1]}\n", "did you mean"),
    ],
)
def test_malformed_sweep_files_are_rejected_with_the_fix(tmp_path, body, message):
    with pytest.raises(SweepError, match=re.escape(message)):
        expand_runs(load_sweep(write_sweep(tmp_path, Path("exp.yaml"), body)))


def test_sweep_file_without_output_root_is_rejected(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text("config: exp.yaml\ngrid: {a: [1]}\n")
    with pytest.raises(SweepError, match="missing output_root"):
        load_sweep(path)


@pytest.mark.parametrize("value", [1e-4, 3, 0.5, True, None, "coco", "true", "1e-4", "null", [1, 2], "a b", {"x": 1}])
def test_override_values_read_back_as_the_same_value(value):
    assert OmegaConf.to_container(OmegaConf.from_dotlist([f"k={format_value(value)}"]))["k"] == value


def test_run_names_are_deterministic_and_filesystem_safe():
    plain = {"optim.lr": 1e-4, "model.adapter.num_blocks": 2}
    assert run_name(plain) == run_name(dict(plain)) == "optim.lr=0.0001_model.adapter.num_blocks=2"

    unsafe = {"data.path": "/data/my set", "prompt": "a cat*"}
    name = run_name(unsafe)
    assert re.fullmatch(r"[A-Za-z0-9._=+-]+", name)
    assert name == run_name(dict(unsafe))
    # lossy sanitizing gets a hash, so values differing only in unsafe characters stay apart
    assert run_name({"data.path": "a/b"}) != run_name({"data.path": "a b"})
    assert run_name({"data.path": "a/b"}).startswith("data.path=a-b-")


def test_long_run_names_are_shortened_with_a_hash_that_keeps_them_apart():
    long_a = {f"model.block_{i}.width": 1024 for i in range(6)}
    long_b = {**long_a, "model.block_5.width": 2048}
    name_a, name_b = run_name(long_a), run_name(long_b)
    assert len(name_a) == len(name_b) == MAX_NAME_LENGTH
    assert name_a != name_b
    assert re.fullmatch(r"model\.block_0\.width=1024_.*-[0-9a-f]{8}", name_a)


# ---------------------------------------------------------------- local runs


def test_local_sweep_runs_every_run_writes_summary_then_skips_finished_runs(tmp_path, fake_trainer, capsys):
    counter = tmp_path / "invocations.txt"
    sweep_file = write_sweep(tmp_path, write_base_config(tmp_path, counter_file=str(counter)), GRID_2X2)
    out = tmp_path / "out"

    assert sweep_cli.main([str(sweep_file), "--train-script", str(fake_trainer), "--no-preflight"]) == 0

    names = [run.name for run in expand_runs(load_sweep(sweep_file))]
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == sorted(names)
    assert counter_lines(counter) == names
    for name in names:
        assert json.loads((out / name / "final_metrics.json").read_text())["global_step"] == 2
        assert OmegaConf.load(out / name / "config.yaml").output_dir == str(out / name)
    with (out / "summary.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [row["run"] for row in rows] == names
    assert [row["status"] for row in rows] == ["finished"] * 4
    assert [(row["optim.lr"], row["model.adapter.num_blocks"]) for row in rows] == [
        ("0.0001", "1"), ("0.0001", "2"), ("0.0003", "1"), ("0.0003", "2"),
    ]  # fmt: skip
    assert [float(row["train/loss"]) for row in rows] == pytest.approx([1.1, 2.1, 1.3, 2.3])
    printed = capsys.readouterr().out
    assert "train/loss" in printed and names[3] in printed

    # Again: nothing runs.
    assert sweep_cli.main([str(sweep_file), "--train-script", str(fake_trainer), "--no-preflight"]) == 0
    assert counter_lines(counter) == names
    assert capsys.readouterr().out.count("finished already, skipped") == 4

    # An interrupted run (checkpoint at step 1, no final metrics) is started again and resumes.
    interrupted = out / names[2]
    (interrupted / "final_metrics.json").unlink()
    (interrupted / "checkpoints" / "last.ckpt").write_text("1")
    assert sweep_cli.main([str(sweep_file), "--train-script", str(fake_trainer), "--no-preflight"]) == 0
    assert counter_lines(counter) == names + [names[2]]
    assert json.loads((interrupted / "starts.log").read_text().splitlines()[-1])["start_step"] == 1
    assert (interrupted / "final_metrics.json").exists()


def test_jobs_run_side_by_side_with_the_cores_shared_and_output_in_each_run_folder(tmp_path, fake_trainer, capsys):
    import os

    sweep_file = write_sweep(tmp_path, write_base_config(tmp_path, step_seconds=0.3), GRID_2X2)
    assert sweep_cli.main([str(sweep_file), "--train-script", str(fake_trainer), "--no-preflight", "--jobs", "2"]) == 0
    runs = expand_runs(load_sweep(sweep_file))
    spans = []
    for run in runs:
        start = json.loads((run.output_dir / "starts.log").read_text().splitlines()[0])
        assert start["omp_threads"] == str(max(1, (os.cpu_count() or 2) // 2))
        assert "fake trainer rank 0 starts at step 0" in (run.output_dir / "train.log").read_text()
        spans.append((start["time"], json.loads((run.output_dir / "final_metrics.json").read_text())["end"]))
    assert any(a[0] < b[1] and b[0] < a[1] for i, a in enumerate(spans) for b in spans[i + 1:])  # overlapping runs
    printed = capsys.readouterr().out
    assert printed.count(": finished") == 4 and "train.log" in printed
    (runs[0].output_dir / "final_metrics.json").unlink()
    assert sweep_cli.main([str(sweep_file), "--jobs", "0", "--train-script", str(fake_trainer), "--no-preflight"]) == 2
    assert "--jobs 0" in capsys.readouterr().err


def test_failed_run_is_reported_as_missing_and_does_not_stop_the_others(tmp_path, fake_trainer, capsys):
    sweep_file = write_sweep(tmp_path, write_base_config(tmp_path), "runs: [{fake.fail: true}, {fake.fail: false}]\n")

    assert sweep_cli.main([str(sweep_file), "--train-script", str(fake_trainer), "--no-preflight"]) == 1

    with (tmp_path / "out" / "summary.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [(row["run"], row["status"]) for row in rows] == [
        ("fake.fail=true", "missing"),
        ("fake.fail=false", "finished"),
    ]
    assert "1 run(s) failed: fake.fail=true" in capsys.readouterr().err


def test_summary_only_lists_unstarted_runs_as_missing_without_running_them(tmp_path, fake_trainer):
    counter = tmp_path / "invocations.txt"
    sweep_file = write_sweep(tmp_path, write_base_config(tmp_path, counter_file=str(counter)), GRID_2X2)

    assert sweep_cli.main([str(sweep_file), "--summary", "--train-script", str(fake_trainer), "--no-preflight"]) == 0

    with (tmp_path / "out" / "summary.csv").open() as handle:
        assert [row["status"] for row in csv.DictReader(handle)] == ["missing"] * 4
    assert not counter.exists()


def test_dry_run_prints_commands_and_writes_nothing(tmp_path, fake_trainer, capsys):
    counter = tmp_path / "invocations.txt"
    sweep_file = write_sweep(tmp_path, write_base_config(tmp_path, counter_file=str(counter)), GRID_2X2)

    assert sweep_cli.main([str(sweep_file), "--dry-run", "--train-script", str(fake_trainer), "--no-preflight"]) == 0

    printed = capsys.readouterr().out
    assert "4 runs, 0 finished, 4 to run" in printed
    assert printed.count(f"{fake_trainer} --config") == 4
    assert not (tmp_path / "out").exists() and not counter.exists()


# ---------------------------------------------------------------- SLURM array (rendering only)


def write_schema_config(directory: Path, text: str = "") -> Path:
    """A run config train.py accepts (--slurm validates the config with the run schema at submission)."""
    path = Path(directory) / "real-experiment.yaml"
    path.write_text(f"output_dir: {Path(directory) / 'runs' / 'default'}\n{text}")
    return path


def test_slurm_dry_run_renders_one_array_over_unfinished_runs(tmp_path, fake_trainer, capsys):
    body = GRID_2X2 + "    max_parallel: 2\n    slurm: {time: '00:10:00'}\n"
    sweep_file = write_sweep(tmp_path, write_schema_config(tmp_path, "slurm: {cpus_per_task: 2}\n"), body)
    finished = tmp_path / "out" / expand_runs(load_sweep(sweep_file))[0].name
    finished.mkdir(parents=True)
    (finished / "final_metrics.json").write_text('{"global_step": 2}')

    assert sweep_cli.main([str(sweep_file), "--slurm", "--dry-run", "--train-script", str(fake_trainer), "--no-preflight"]) == 0

    printed = capsys.readouterr().out
    assert "#SBATCH --array=0-2%2" in printed
    assert "#SBATCH --time=00:10:00" in printed  # the sweep's slurm: over the config's
    assert "#SBATCH --cpus-per-task=2" in printed  # the config's own slurm: section
    assert f"#SBATCH --output={tmp_path / 'out' / 'slurm-logs'}/slurm-%A_%a.out" in printed
    assert "--run-task" in printed
    assert not list((tmp_path / "out").glob("sweep-runs-*"))


def test_array_task_i_gets_run_i_and_the_runs_file_name_follows_its_content(tmp_path):
    spec = SweepSpec(config="exp.yaml", output_root=tmp_path / "out", grid={"seed": [1, 2, 3]})
    runs = expand_runs(spec)

    runs_file = write_array_runs_file(spec, runs, "train.py")

    assert write_array_runs_file(spec, runs, "train.py") == runs_file
    assert write_array_runs_file(spec, runs[1:], "train.py") != runs_file
    entry = resolve_array_task(runs_file, "2")
    assert entry["name"] == "seed=3"
    assert entry["command"][-2:] == ["seed=3", f"output_dir={tmp_path / 'out' / 'seed=3'}"]
    with pytest.raises(SweepError, match="array task 3 has no run"):
        resolve_array_task(runs_file, 3)
    with pytest.raises(SweepError, match="needs SLURM_ARRAY_TASK_ID"):
        resolve_array_task(runs_file, None)


@pytest.mark.parametrize("mode", [["--slurm"], []], ids=["slurm", "local"])
def test_a_config_the_run_schema_rejects_is_refused_whatever_script_the_sweep_launches(tmp_path, fake_trainer, capsys,
                                                                                        mode):
    sweep_file = write_sweep(tmp_path, write_schema_config(tmp_path, "optim: {lr: 0.1}\n"), GRID_2X2)

    assert sweep_cli.main([str(sweep_file), *mode, "--train-script", str(fake_trainer)]) == 2

    err = capsys.readouterr().err
    assert "unknown config key 'optim'" in err and "Closest valid keys" in err, err
    assert not (tmp_path / "out").exists()  # nothing submitted, nothing run


# ---------------------------------------------------------------- real runs

REAL_GRID_2X2 = """
    base_overrides: [trainer.max_steps=3, data.shards={shards}, data.synthetic_if_missing=false, data.batch_size=4,
                     model.optim.warmup_steps=0, validation.every_n_steps=0, validation.num_inference_steps=1,
                     trainer.log_every_n_steps=1, trainer.enable_progress_bar=false]
    grid:
      model.optim.lr: [1.0e-4, 1.0e-3]
      model.adapter.num_blocks: [1, 2]
"""


@pytest.mark.slow
def test_local_sweep_of_real_tiny_runs_summarizes_their_final_loss_then_skips_them(tmp_path, capsys):
    shards = tmp_path / "shards"
    write_synthetic_shards(str(shards), num_samples=32, samples_per_shard=16, resolution=32, seed=0)
    sweep_file = write_sweep(tmp_path, REPO_ROOT / "configs" / "tiny.yaml", REAL_GRID_2X2.format(shards=shards))
    runs = expand_runs(load_sweep(sweep_file))

    assert sweep_cli.main([str(sweep_file)]) == 0  # the default train script: the real train.py

    with (tmp_path / "out" / "summary.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [row["run"] for row in rows] == [run.name for run in runs] == [
        "model.optim.lr=0.0001_model.adapter.num_blocks=1", "model.optim.lr=0.0001_model.adapter.num_blocks=2",
        "model.optim.lr=0.001_model.adapter.num_blocks=1", "model.optim.lr=0.001_model.adapter.num_blocks=2",
    ]  # fmt: skip
    assert [row["status"] for row in rows] == ["finished"] * 4
    for run, row in zip(runs, rows):
        metrics = json.loads((run.output_dir / "final_metrics.json").read_text())
        assert metrics["global_step"] == 3
        assert math.isfinite(metrics["train/loss"]) and float(row["train/loss"]) == pytest.approx(metrics["train/loss"])
        config = OmegaConf.load(run.output_dir / "config.yaml")  # the overrides reached the run
        assert config.model.optim.lr == run.overrides["model.optim.lr"]
        assert config.model.adapter.num_blocks == run.overrides["model.adapter.num_blocks"]
        assert config.trainer.max_steps == 3
    assert len({row["train/loss"] for row in rows}) == 4  # four different trainings
    finished_at = [(run.output_dir / "final_metrics.json").stat().st_mtime_ns for run in runs]
    capsys.readouterr()

    assert sweep_cli.main([str(sweep_file)]) == 0

    assert capsys.readouterr().out.count("finished already, skipped") == 4
    assert [(run.output_dir / "final_metrics.json").stat().st_mtime_ns for run in runs] == finished_at

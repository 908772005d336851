"""Real SLURM jobs on a local one-node cluster: requeue and resume, two tasks per node, a sweep array.

Runs only where `sbatch` is on PATH. That skip is acceptable only because CI starts the cluster
first (`.ci/slurm-up.sh` as root: installs slurm-wlm + munge if missing, starts munged, slurmctld and
slurmd, waits for the node to be idle; `.ci/slurm-down.sh` stops them), so in CI these tests always
run. Where sbatch exists but the cluster does not answer, the tests fail instead of skipping, and
every wait has a deadline so a broken cluster fails in seconds instead of hanging.

The training command comes from the `train_command` fixture: a fake trainer (from test_sweep.py) that
keeps train.py's contract until train.py lands; swapping in the real one is the one commented line.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest

import sweep as sweep_cli
from launch.slurm import SlurmConfig, render_sbatch_script, submit
from launch.sweep import expand_runs, load_sweep

pytestmark = pytest.mark.skipif(
    shutil.which("sbatch") is None, reason="no sbatch on PATH; CI runs .ci/slurm-up.sh before these tests"
)

REPO_ROOT = Path(__file__).resolve().parents[2]
SCONTROL_TIMEOUT_S = 10
TERMINAL_STATES = {
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED",
}  # fmt: skip


def _load_test_sweep():
    """test_sweep.py holds the fake trainer; load it by path so this works under any pytest import mode."""
    spec = importlib.util.spec_from_file_location("_launch_test_sweep", Path(__file__).with_name("test_sweep.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


test_sweep = _load_test_sweep()


# ---------------------------------------------------------------- cluster helpers


def scontrol(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["scontrol", *args], capture_output=True, text=True, timeout=SCONTROL_TIMEOUT_S)


def job_records(job_id: str) -> list[dict[str, str]]:
    """`scontrol show job` as one dict per job (an array gives one per task)."""
    result = scontrol("show", "job", "-o", job_id)
    if result.returncode != 0:
        raise AssertionError(f"scontrol show job {job_id} failed: {result.stderr.strip()}")
    return [dict(re.findall(r"(\w+)=(\S*)", line)) for line in result.stdout.splitlines() if line.strip()]


def fail_with_job_state(job_id: str, why: str, log_glob: Path) -> None:
    subprocess.run(["scancel", job_id], capture_output=True, timeout=SCONTROL_TIMEOUT_S)
    logs = "\n".join(f"--- {p}\n{p.read_text()[-2000:]}" for p in sorted(log_glob.parent.glob(log_glob.name)))
    pytest.fail(f"job {job_id}: {why}\n{scontrol('show', 'job', job_id).stdout}\n{logs}")


def wait_until(predicate, timeout_s: float, job_id: str, what: str, log_glob: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            fail_with_job_state(job_id, f"{what} not reached within {timeout_s}s", log_glob)
        time.sleep(0.2)


def wait_for_job(job_id: str, timeout_s: float, log_glob: Path) -> list[dict[str, str]]:
    """Wait until the job (every task of an array) has ended; return its records."""

    def ended() -> bool:
        return all(record["JobState"] in TERMINAL_STATES for record in job_records(job_id))

    wait_until(ended, timeout_s, job_id, "the end of the job", log_glob)
    return job_records(job_id)


def requeue_now(job_id: str, log_glob: Path) -> None:
    """`scontrol requeue`, then cancel the ~120 s hold a requeued job gets before it may start again.

    StartTime=now only sticks once the job is PENDING (while COMPLETING, the requeue resets it
    afterwards), and it must be sent only while the job is held: an update that races with the job
    starting makes slurmctld kill it ("Job credential revoked"). So it is sent only while the job
    waits for its begin time, with that time still in the future.
    """
    result = scontrol("requeue", job_id)
    assert result.returncode == 0, f"scontrol requeue {job_id}: {result.stderr}"

    def restarted() -> bool:
        record = job_records(job_id)[0]
        held = (
            record["JobState"] == "PENDING"
            and record.get("Reason") == "BeginTime"
            and datetime.fromisoformat(record["EligibleTime"]) > datetime.now()
        )
        if held:
            scontrol("update", f"jobid={job_id}", "StartTime=now")
        return record["JobState"] in {"RUNNING"} | TERMINAL_STATES

    wait_until(restarted, 30, job_id, "the requeued job starting again", log_glob)


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", autouse=True)
def cluster() -> None:
    """Fail fast, with the fix, when sbatch exists but the local cluster is not up."""
    try:
        result = subprocess.run(["sinfo", "-h", "-N", "-o", "%t"], capture_output=True, text=True, timeout=10)
    except subprocess.TimeoutExpired:
        pytest.fail("sinfo did not answer within 10 s; start the cluster with .ci/slurm-up.sh")
    states = result.stdout.split()
    if result.returncode != 0 or not {"idle", "mix", "alloc"} & set(states):
        answer = f"{result.stdout.strip()} {result.stderr.strip()}".strip()
        pytest.fail(f"no usable SLURM node (sinfo: {answer!r}); start the cluster with .ci/slurm-up.sh")


@pytest.fixture
def train_command(tmp_path: Path) -> list[str]:
    """argv that starts training; `--config CFG overrides...` is appended."""
    return [sys.executable, str(test_sweep.write_fake_trainer(tmp_path))]
    # return [sys.executable, str(REPO_ROOT / "train.py")]  # once train.py lands


@pytest.fixture
def run_config(tmp_path: Path) -> Path:
    return test_sweep.write_base_config(tmp_path)


def submit_run(tmp_path: Path, cfg: SlurmConfig, command: list[str], run_dir: Path) -> str:
    run_dir.mkdir(parents=True, exist_ok=True)
    script = run_dir / "slurm.sbatch"
    script.write_text(render_sbatch_script(cfg, command, run_dir, workdir=REPO_ROOT))
    return submit(script)


# ---------------------------------------------------------------- tests


def test_requeued_job_restarts_and_resumes_from_its_checkpoint(tmp_path, train_command, run_config):
    run_dir = tmp_path / "runs" / "requeue"
    overrides = ["trainer.max_steps=20", "fake.step_seconds=0.2", f"output_dir={run_dir}"]
    command = [*train_command, "--config", str(run_config), *overrides]
    job_id = submit_run(tmp_path, SlurmConfig(time="00:05:00", job_name="requeue-test"), command, run_dir)
    log = run_dir / f"slurm-{job_id}.out"

    wait_until((run_dir / "checkpoints" / "last.ckpt").exists, 30, job_id, "a first checkpoint", log)
    requeue_now(job_id, log)
    (record,) = wait_for_job(job_id, 60, log)

    assert record["JobState"] == "COMPLETED", record
    assert record["Restarts"] == "1"
    text = log.read_text()
    # Both starts are in the one log (--open-mode=append), the second one with SLURM_RESTART_COUNT=1.
    assert re.search(rf"job {job_id} restart 0 on", text) and re.search(rf"job {job_id} restart 1 on", text), text
    assert json.loads((run_dir / "final_metrics.json").read_text())["global_step"] == 20
    # fake-trainer record of where each start began (train.py: look for Lightning's "Restoring states")
    starts = [json.loads(line) for line in (run_dir / "starts.log").read_text().splitlines()]
    assert [(s["restart"], s["start_step"] > 0) for s in starts] == [(0, False), (1, True)], starts


def test_two_tasks_per_node_run_both_ranks_under_srun(tmp_path, train_command, run_config):
    run_dir = tmp_path / "runs" / "two-tasks"
    command = [*train_command, "--config", str(run_config), "trainer.max_steps=2", f"output_dir={run_dir}"]
    cfg = SlurmConfig(tasks_per_node=2, time="00:05:00", job_name="two-tasks")
    job_id = submit_run(tmp_path, cfg, command, run_dir)

    (record,) = wait_for_job(job_id, 60, run_dir / f"slurm-{job_id}.out")

    assert record["JobState"] == "COMPLETED", record
    starts = [json.loads(line) for line in (run_dir / "starts.log").read_text().splitlines()]
    assert sorted((s["rank"], s["ntasks"]) for s in starts) == [(0, 2), (1, 2)]
    assert (run_dir / "final_metrics.json").exists()


def test_sweep_as_a_job_array_runs_every_task_and_summarizes(tmp_path, train_command, capsys):
    counter = tmp_path / "invocations.txt"
    config = test_sweep.write_base_config(tmp_path, counter_file=str(counter))
    sweep_file = test_sweep.write_sweep(
        tmp_path, config, test_sweep.GRID_2X2 + "    slurm: {time: '00:05:00'}\n"
    )

    assert sweep_cli.main([str(sweep_file), "--slurm", "--train-script", train_command[-1]]) == 0
    job_id = re.search(r"submitted job array (\d+) with 4 tasks", capsys.readouterr().out).group(1)
    records = wait_for_job(job_id, 90, tmp_path / "out" / "slurm-logs" / f"slurm-{job_id}_*.out")

    assert sorted(r["ArrayTaskId"] for r in records) == ["0", "1", "2", "3"]
    assert all(r["JobState"] == "COMPLETED" for r in records), records
    assert sorted(counter.read_text().splitlines()) == sorted(run.name for run in expand_runs(load_sweep(sweep_file)))
    assert sweep_cli.main([str(sweep_file), "--summary"]) == 0
    summary = (tmp_path / "out" / "summary.csv").read_text().splitlines()
    assert len(summary) == 5 and all(",finished," in row for row in summary[1:])
    # Everything finished, so a second --slurm submits nothing.
    assert sweep_cli.main([str(sweep_file), "--slurm", "--train-script", train_command[-1]]) == 0
    assert "all 4 runs finished; nothing to submit" in capsys.readouterr().out

"""Real SLURM jobs on a local one-node cluster running the real train.py (the tiny default, CPU):
a job requeued mid-run resumes from its checkpoint and ends with the weights of an uninterrupted run,
a 2-task DDP job runs under srun, and a sweep runs as a job array and is skipped once finished.

Runs only where `sbatch` is on PATH. That skip is acceptable only because CI starts the cluster
first (`.ci/slurm-up.sh` as root: installs slurm-wlm + munge if missing, starts munged, slurmctld and
slurmd, waits for the node to be idle; `.ci/slurm-down.sh` stops them), so in CI these tests always
run. Where sbatch exists but the cluster does not answer, the tests fail instead of skipping, and
every wait has a deadline so a broken cluster fails instead of hanging.

Jobs inherit the submitting environment (sbatch's default --export=ALL): HF_HUB_OFFLINE from
tests/conftest.py and, where a test sets it, LLM4GEN_RECORD_KEYS (the sample keys of every batch).
"""

from __future__ import annotations

import contextlib
import csv
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest
import torch

from llm4gen.cli import submit as submit_cli
from llm4gen.cli import sweep as sweep_cli
from llm4gen.datamodules.synthetic import write_synthetic_shards
from llm4gen.launch.sweep import expand_runs, load_sweep

pytestmark = [
    pytest.mark.skipif(shutil.which("sbatch") is None, reason="no sbatch on PATH; CI runs .ci/slurm-up.sh before these tests"),
    pytest.mark.cluster,
    pytest.mark.slow,
]

REPO_ROOT = Path(__file__).resolve().parents[2]
TINY_CONFIG = REPO_ROOT / "configs" / "tiny.yaml"
RECORDING_TRAIN_SCRIPT = REPO_ROOT / "tests" / "train_recording_keys.py"  # train.py + LLM4GEN_RECORD_KEYS
SCONTROL_TIMEOUT_S = 10
JOB_TIMEOUT_S = 300  # a tiny run takes 10-40 s on 2 busy cores; the deadline only catches a stuck job
TERMINAL_STATES = {
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED",
}  # fmt: skip


def _load_test_sweep():
    """test_sweep.py holds write_sweep; load it by path so this works under any pytest import mode."""
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


def release_begin_time_hold(job_id: str) -> dict:
    """The job's record; a requeued job waiting out SLURM's ~120 s begin-time hold is made eligible now."""
    record = job_records(job_id)[0]
    held = (
        record["JobState"] == "PENDING"
        and record.get("Reason") == "BeginTime"
        and datetime.fromisoformat(record["EligibleTime"]) > datetime.now()
    )
    if held:
        # now+2, not now: slurmd refuses a credential made in the same second as the old run's revocation
        # ("Killing non-startable batch job: Job credential revoked"; its times are whole seconds)
        scontrol("update", f"jobid={job_id}", "StartTime=now+2")
    return record


def requeue_now(job_id: str, log_glob: Path) -> None:
    """`scontrol requeue`, then cancel the ~120 s hold a requeued job gets before it may start again.

    StartTime=now(+2) only sticks once the job is PENDING (while COMPLETING, the requeue resets it
    afterwards), and it must be sent only while the job is held: an update that races with the job
    starting makes slurmctld kill it ("Job credential revoked"). So it is sent only while the job
    waits for its begin time, with that time still in the future.
    """
    result = scontrol("requeue", job_id)
    assert result.returncode == 0, f"scontrol requeue {job_id}: {result.stderr}"

    def restarted() -> bool:
        record = release_begin_time_hold(job_id)
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


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """4 shards x 16 synthetic samples (32x32 px), shared by the module's jobs."""
    directory = tmp_path_factory.mktemp("shards")
    write_synthetic_shards(str(directory), num_samples=64, samples_per_shard=16, resolution=32, seed=0)
    return directory


def fast(shards: Path) -> list[str]:
    """Tiny-run overrides: batch 4, no sampling beyond one denoising step, lr high enough that a wrong
    step shows far above the 1e-6 the weight comparison allows."""
    return [f"data.shards={shards}", "data.synthetic_if_missing=false", "data.batch_size=4",
            "validation.every_n_steps=0", "validation.num_inference_steps=1", "trainer.log_every_n_steps=1",
            "trainer.enable_progress_bar=false", "model.optim.lr=1e-3", "model.optim.warmup_steps=6"]


def submit_tiny(capsys, *overrides: str) -> str:
    """submit.py with the tiny default; returns the job id."""
    capsys.readouterr()
    assert submit_cli.main(["--config", str(TINY_CONFIG), "--train-script", str(RECORDING_TRAIN_SCRIPT), *overrides]) == 0
    return re.search(r"submitted job (\d+)", capsys.readouterr().out).group(1)


def read_records(path: Path) -> list[dict]:
    assert path.is_file(), f"no key record at {path}"
    return [json.loads(line) for line in path.read_text().splitlines()]


def trainable_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """last.ckpt's trained weights (a sharded run's folder consolidated: lightning_modules/sharding.py)."""
    from llm4gen.lightning_modules.sharding import consolidated_checkpoint

    last = run_dir / "checkpoints" / "last.ckpt"
    if last.is_dir():
        return consolidated_checkpoint(last)["state_dict"]
    return torch.load(last, map_location="cpu", weights_only=False)["state_dict"]


@contextlib.contextmanager
def uninterrupted_reference(training: list[str], run_dir: Path, keys: Path):
    """The same run as the job's, trained alongside it outside SLURM (its environment has no SLURM_*),
    through the job's waits for the scheduler. On leaving the block it is awaited and must have exited 0;
    when the block raises it is killed, so a failing test leaves no training process behind."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env["LLM4GEN_RECORD_KEYS"] = str(keys)
    reference = subprocess.Popen(
        [sys.executable, str(RECORDING_TRAIN_SCRIPT), "--config", str(TINY_CONFIG), *training, f"output_dir={run_dir}"],
        env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        yield reference
        output, _ = reference.communicate(timeout=JOB_TIMEOUT_S)
    finally:
        if reference.poll() is None:
            reference.kill()
            reference.wait()
    assert reference.returncode == 0, output[-3000:]


# ---------------------------------------------------------------- tests


def test_requeued_job_resumes_from_its_checkpoint_and_ends_with_the_uninterrupted_weights(
    tmp_path, shards, capsys, monkeypatch
):
    steps = 10  # requeued once step 4 is saved: 6 steps of slack for the requeue to land mid-run
    training = [*fast(shards), f"trainer.max_steps={steps}", "checkpoint.every_n_steps=2"]
    run_dir = tmp_path / "runs" / "requeue"
    monkeypatch.setenv("LLM4GEN_RECORD_KEYS", str(tmp_path / "job-keys.jsonl"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the job and its reference side by side: one thread each, not four
    job_id = submit_tiny(capsys, *training, "slurm.time=00:10:00", "slurm.job_name=requeue-test", f"output_dir={run_dir}")
    log = run_dir / f"slurm-{job_id}.out"
    baseline_dir = tmp_path / "runs" / "baseline"
    with uninterrupted_reference(training, baseline_dir, tmp_path / "baseline-keys.jsonl"):
        wait_until((run_dir / "checkpoints" / "step=0000004.ckpt").exists, JOB_TIMEOUT_S, job_id, "step 4", log)
        requeue_now(job_id, log)
        (record,) = wait_for_job(job_id, JOB_TIMEOUT_S, log)

    assert record["JobState"] == "COMPLETED", record
    assert record["Restarts"] == "1"
    text = log.read_text()
    # Both starts are in the one log (--open-mode=append), the second one with SLURM_RESTART_COUNT=1.
    second_start = re.search(rf"job {job_id} restart 1 on", text)
    assert re.search(rf"job {job_id} restart 0 on", text) and second_start, text[-3000:]
    # From a periodic checkpoint, or from the one the SIGTERM of the requeue made train.py write at a step boundary.
    assert re.search(rf"resuming from {re.escape(str(run_dir))}/(checkpoints/|hpc_ckpt_)", text[second_start.end():]), text[-3000:]
    assert json.loads((run_dir / "final_metrics.json").read_text())["global_step"] == steps

    # The requeued start went on from a checkpoint taken mid-run (step 4 or later), not from the end:
    # a periodic one, or the one train.py saved at a step boundary on the SIGTERM the requeue sent.
    resumed, start_step = re.search(r"resuming from (\S+) \(step (\d+)\)", text[second_start.end():]).groups()
    resumed, start_step = Path(resumed), int(start_step)
    job_steps = [r["global_step"] for r in read_records(tmp_path / "job-keys.jsonl") if "keys" in r]
    assert 4 <= start_step < steps, (resumed, job_steps)
    assert job_steps[-(steps - start_step):] == list(range(start_step, steps))  # the second start
    assert job_steps[: len(job_steps) - (steps - start_step)] == list(range(len(job_steps) - (steps - start_step)))
    # Same samples per step as the uninterrupted run (a step trained twice counts from its last run).
    job_keys, baseline_keys = {}, {}
    for r in read_records(tmp_path / "job-keys.jsonl"):
        job_keys.update({r["global_step"]: r["keys"]} if "keys" in r else {})
    for r in read_records(tmp_path / "baseline-keys.jsonl"):
        baseline_keys.update({r["global_step"]: r["keys"]} if "keys" in r else {})
    assert sorted(baseline_keys) == list(range(steps)) and job_keys == baseline_keys
    final, reference = trainable_weights(run_dir), trainable_weights(baseline_dir)
    assert set(final) == set(reference)
    difference = max(float((final[k] - reference[k]).abs().max()) for k in final)
    print(f"requeued job resumed at step {start_step} from {resumed.name}; max |requeued - uninterrupted| = {difference:.3g}")
    assert difference <= 1e-6


def test_two_task_ddp_job_runs_both_ranks_under_srun(tmp_path, shards, capsys, monkeypatch):
    run_dir = tmp_path / "runs" / "ddp"
    record = tmp_path / "keys.jsonl"
    monkeypatch.setenv("LLM4GEN_RECORD_KEYS", str(record))
    job_id = submit_tiny(
        capsys, *fast(shards), "trainer.max_steps=4", "data.epoch_batches=4", "trainer.devices=2",
        "trainer.strategy=ddp", "slurm.tasks_per_node=2", "slurm.time=00:10:00", "slurm.job_name=ddp-test",
        f"output_dir={run_dir}",
    )  # fmt: skip
    log = run_dir / f"slurm-{job_id}.out"

    (job,) = wait_for_job(job_id, JOB_TIMEOUT_S, log)

    assert job["JobState"] == "COMPLETED", (job, log.read_text()[-3000:])
    text = log.read_text()
    assert "MEMBER: 1/2" in text and "MEMBER: 2/2" in text, text[-3000:]  # two ranks, one per srun task
    assert json.loads((run_dir / "final_metrics.json").read_text())["global_step"] == 4
    ranks = {rank: read_records(record.with_name(f"{record.name}.rank{rank}")) for rank in (0, 1)}
    keys = {rank: [k for r in lines if "keys" in r for k in r["keys"]] for rank, lines in ranks.items()}
    assert len(keys[0]) == len(keys[1]) == 16 and not set(keys[0]) & set(keys[1])
    ends = [next(r for r in lines if r.get("event") == "train_end") for lines in ranks.values()]
    assert ends[0]["trainable_sha256"] == ends[1]["trainable_sha256"]  # DDP kept the ranks' weights equal


REAL_GRID_2X2 = """
    base_overrides: [trainer.max_steps=3, {fast}]
    grid:
      model.optim.lr: [1.0e-4, 1.0e-3]
      model.adapter.num_blocks: [1, 2]
    slurm: {{time: '00:10:00'}}
"""


def test_sweep_as_a_job_array_runs_every_task_and_skips_them_once_finished(tmp_path, shards, capsys, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # two tasks at a time on the 2-CPU node: one thread each, not four
    body = REAL_GRID_2X2.format(fast=", ".join(fast(shards)))
    sweep_file = test_sweep.write_sweep(tmp_path, TINY_CONFIG, body)
    runs = expand_runs(load_sweep(sweep_file))

    assert sweep_cli.main([str(sweep_file), "--slurm"]) == 0  # the default train script: the real train.py
    job_id = re.search(r"submitted job array (\d+) with 4 tasks", capsys.readouterr().out).group(1)
    records = wait_for_job(job_id, 2 * JOB_TIMEOUT_S, tmp_path / "out" / "slurm-logs" / f"slurm-{job_id}_*.out")

    assert sorted(r["ArrayTaskId"] for r in records) == ["0", "1", "2", "3"]
    assert all(r["JobState"] == "COMPLETED" for r in records), records
    for run in runs:
        assert json.loads((run.output_dir / "final_metrics.json").read_text())["global_step"] == 3
    assert sweep_cli.main([str(sweep_file), "--summary"]) == 0
    summary = (tmp_path / "out" / "summary.csv").read_text().splitlines()
    assert len(summary) == 5 and all(",finished," in row for row in summary[1:])
    # Everything finished, so a second --slurm submits nothing.
    capsys.readouterr()
    assert sweep_cli.main([str(sweep_file), "--slurm"]) == 0
    assert "all 4 runs finished; nothing to submit" in capsys.readouterr().out


def wait_for_restart(job_id: str, restarts: int, log_glob: Path) -> None:
    """After a requeue the job itself asked for: lift the ~120 s begin-time hold (see requeue_now)
    and wait until its start number ``restarts`` is running."""

    def restarted() -> bool:
        record = release_begin_time_hold(job_id)
        running_again = record["JobState"] == "RUNNING" and int(record.get("Restarts", 0)) >= restarts
        return running_again or record["JobState"] in TERMINAL_STATES

    wait_until(restarted, JOB_TIMEOUT_S, job_id, f"start {restarts} of the requeued job", log_glob)


def batch_lines(path: Path) -> int:
    return sum(1 for line in path.read_text().splitlines() if '"keys"' in line) if path.exists() else 0


# DDP is signalled twice with loader workers (their stream state travels through both restarts), FSDP2 once
# without; a single signal to DDP without workers adds nothing the two do not hold (and the requeue test above
# resumes a worker-less stream), so it is not run a third time.
@pytest.mark.parametrize("signals, num_workers, strategy", [(2, 2, "ddp"), (1, 0, "fsdp2")])
def test_ddp_job_preempted_with_usr1_requeues_itself_and_ends_with_the_uninterrupted_weights(
    tmp_path, shards, capsys, monkeypatch, signals, num_workers, strategy
):
    """`scancel --signal=USR1` is SLURM's preemption warning: each rank records it, the ranks agree at
    the next step boundary, save hpc_ckpt_<step>.ckpt there, rank 0 requeues; the requeued job resumes
    from it. Against an uninterrupted 2-rank run: same samples per step, weights within 1e-6, every
    step logged once, and no signal checkpoint left once a later periodic checkpoint is written. Under
    ``trainer.strategy=fsdp2`` (the UNet trained, sharded) every checkpoint is a folder of DCP shards."""
    steps = 10
    training = [*fast(shards), f"trainer.max_steps={steps}", "checkpoint.every_n_steps=4", "data.epoch_batches=8",
                "trainer.devices=2", f"trainer.strategy={strategy}", f"data.num_workers={num_workers}",
                *(["model.unet_training=full"] if strategy == "fsdp2" else [])]
    run_dir = tmp_path / "runs" / "preempted"
    keys = tmp_path / "job-keys.jsonl"
    monkeypatch.setenv("LLM4GEN_RECORD_KEYS", str(keys))
    job_id = submit_tiny(capsys, *training, "slurm.tasks_per_node=2", "slurm.time=00:15:00",
                         "slurm.job_name=usr1-test", f"output_dir={run_dir}")
    log = run_dir / f"slurm-{job_id}.out"
    baseline_dir = tmp_path / "runs" / "baseline"
    rank0 = keys.with_name(f"{keys.name}.rank0")
    with uninterrupted_reference(training, baseline_dir, tmp_path / "baseline-keys.jsonl"):
        seen = 0
        for restart in range(signals):
            wait_until(lambda: batch_lines(rank0) >= seen + 3, JOB_TIMEOUT_S, job_id, f"3 steps of start {restart}", log)
            result = subprocess.run(["scancel", "--signal=USR1", job_id], capture_output=True, text=True, timeout=10)
            assert result.returncode == 0, result.stderr
            wait_for_restart(job_id, restart + 1, log)
            seen = batch_lines(rank0)
        (record,) = wait_for_job(job_id, JOB_TIMEOUT_S, log)

    text = log.read_text()
    assert record["JobState"] == "COMPLETED", (record, text[-3000:])
    assert record["Restarts"] == str(signals), (record, text[-3000:])
    saves = re.findall(r"stopped on SIGUSR1 after step (\d+): saved (\S+hpc_ckpt_\d+\.ckpt); the SLURM job was requeued", text)
    assert len({step for step, _ in saves}) == signals, text[-4000:]
    for step, path in {(s, p) for s, p in saves}:
        # the restart resumes at the signal's step: from the signal checkpoint, or from the periodic one
        # written at that same step (it ranks higher and prunes the signal checkpoint; same state)
        resumed = re.search(rf"resuming from (\S+) \(step {step}\)", text)
        assert resumed and resumed.group(1) in (path, str(run_dir / "checkpoints" / f"step={int(step):07d}.ckpt"),
                                                str(run_dir / "checkpoints" / "last.ckpt")), text[-4000:]
    assert list(run_dir.glob("hpc_ckpt_*.ckpt")) == []  # pruned by the periodic or final save after it
    for rank in (0, 1):
        job_keys, baseline_keys = {}, {}
        for r in read_records(keys.with_name(f"{keys.name}.rank{rank}")):
            job_keys.update({r["global_step"]: r["keys"]} if "keys" in r else {})
        for r in read_records(tmp_path / f"baseline-keys.jsonl.rank{rank}"):
            baseline_keys.update({r["global_step"]: r["keys"]} if "keys" in r else {})
        assert sorted(baseline_keys) == list(range(steps)) and job_keys == baseline_keys
    final, reference = trainable_weights(run_dir), trainable_weights(baseline_dir)
    difference = max(float((final[k] - reference[k]).abs().max()) for k in final)
    print(f"{signals} USR1 signal(s), saved at steps {sorted({int(s) for s, _ in saves})}; "
          f"max |requeued - uninterrupted| = {difference:.3g}")
    assert difference <= 1e-6
    with open(run_dir / "logs" / "metrics.csv", newline="") as handle:
        logged = [int(row["step"]) for row in csv.DictReader(handle)]
    assert logged == list(range(steps))  # every step exactly once, across all starts

"""Run training as a SLURM batch job: the job's resources, its sbatch script, and submission.

The script is built for preemptible, requeueable training: SLURM sends `signal` (SIGUSR1) `signal_seconds`
before the time limit; train.py saves a checkpoint at the next optimizer-step boundary and requeues the
job (lightning_modules/preemption.py), and the requeued job resumes from its own run folder because the
command carries a fixed `output_dir` and train.py defaults to `resume: auto`. The log is opened in
append mode so a requeue adds to it instead of truncating it.

One `srun` task per device: Lightning's SLURM integration expects `--ntasks-per-node` to equal the
devices per node (`trainer.devices`), each task being one rank.
"""

from __future__ import annotations

import dataclasses
import difflib
import shlex
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from configs.errors import UserError

SUBMIT_TIMEOUT_S = 60


class SlurmError(UserError, RuntimeError):
    """sbatch is missing, refused the job, or the `slurm:` config section is invalid."""


@dataclass
class SlurmConfig:
    """Resources and behaviour of one SLURM job; mirrors the `slurm:` section of a run config."""

    nodes: int = 1
    gpus_per_node: int = 0  # 0 -> CPU-only job, no --gres line
    tasks_per_node: int | None = None  # None -> gpus_per_node, or 1 for a CPU job
    cpus_per_task: int | None = None  # None -> the cluster's default
    mem: str | None = None  # per node, sbatch syntax: "64G"; None -> the cluster's default
    time: str = "04:00:00"
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    signal_seconds: int = 120  # `signal` this long before the time limit; 0 -> no signal
    signal: str = "SIGUSR1"  # the preemption warning: SIGUSR1 | SIGUSR2 | SIGTERM (train.py saves at a step boundary, requeues)
    requeue: bool = True
    job_name: str | None = None  # None -> the run folder's name
    extra_sbatch_lines: list[str] = field(default_factory=list)  # "--exclusive" or "#SBATCH --exclusive"
    setup_lines: list[str] = field(default_factory=list)  # shell lines before srun: module load, venv
    array: str | None = None  # sbatch --array spec, e.g. "0-3" or "0-15%4"

    def __post_init__(self) -> None:
        if self.nodes < 1:
            raise SlurmError(f"slurm.nodes must be >= 1, got {self.nodes}")
        if self.gpus_per_node < 0:
            raise SlurmError(f"slurm.gpus_per_node must be >= 0 (0 = CPU-only), got {self.gpus_per_node}")
        if self.tasks_per_node is not None and self.tasks_per_node < 1:
            raise SlurmError(f"slurm.tasks_per_node must be >= 1 or null, got {self.tasks_per_node}")
        if self.signal not in ("SIGUSR1", "SIGUSR2", "SIGTERM"):
            raise SlurmError(f"slurm.signal={self.signal!r}: expected SIGUSR1, SIGUSR2 or SIGTERM")
        if self.signal_seconds < 0:
            raise SlurmError(f"slurm.signal_seconds must be >= 0 (0 = no signal), got {self.signal_seconds}")

    @property
    def ntasks_per_node(self) -> int:
        """Tasks (= training ranks) per node: one per device unless set explicitly."""
        if self.tasks_per_node is not None:
            return self.tasks_per_node
        return max(self.gpus_per_node, 1)


def log_path_pattern(cfg: SlurmConfig, run_dir: str | Path) -> Path:
    """Where SLURM writes the job's stdout+stderr; `%j` is the job id (`%A_%a` for array tasks)."""
    name = "slurm-%A_%a.out" if cfg.array else "slurm-%j.out"
    return Path(run_dir) / name


def _sbatch_directive(line: str) -> str:
    line = line.strip()
    return line if line.startswith("#") else f"#SBATCH {line}"


def render_sbatch_script(
    cfg: SlurmConfig,
    command: list[str],
    run_dir: str | Path,
    *,
    workdir: str | Path | None = None,
) -> str:
    """The sbatch script that runs `command` once per task under srun.

    run_dir receives the log; workdir (default: the current directory) is where the job starts, so
    relative paths in the command mean the same in the job as at submission.
    """
    if not command:
        raise SlurmError("render_sbatch_script needs a command to run, got an empty list")
    run_dir = Path(run_dir).absolute()
    workdir = Path(workdir if workdir is not None else Path.cwd()).absolute()
    job_name = cfg.job_name or run_dir.name

    options = [
        f"--job-name={job_name}",
        f"--nodes={cfg.nodes}",
        f"--ntasks-per-node={cfg.ntasks_per_node}",
    ]
    if cfg.gpus_per_node > 0:
        options.append(f"--gres=gpu:{cfg.gpus_per_node}")
    if cfg.cpus_per_task is not None:
        options.append(f"--cpus-per-task={cfg.cpus_per_task}")
    if cfg.mem is not None:
        options.append(f"--mem={cfg.mem}")
    options.append(f"--time={cfg.time}")
    for name in ("partition", "account", "qos", "array"):
        value = getattr(cfg, name)
        if value is not None:
            options.append(f"--{name}={value}")
    if cfg.signal_seconds > 0:
        options.append(f"--signal={cfg.signal}@{cfg.signal_seconds}")
    options.append("--requeue" if cfg.requeue else "--no-requeue")
    options += [
        "--open-mode=append",
        f"--output={log_path_pattern(cfg, run_dir)}",
        f"--chdir={workdir}",
    ]

    lines = ["#!/bin/bash"]
    lines += [f"#SBATCH {option}" for option in options]
    lines += [_sbatch_directive(line) for line in cfg.extra_sbatch_lines]
    lines += [
        "",
        "# Generated by launch/slurm.py. A requeued job runs this script again; the command resumes",
        "# from the newest checkpoint in its run folder by itself.",
        "set -e",
        *cfg.setup_lines,
        "export PYTHONUNBUFFERED=1  # stream the log instead of losing the tail of a killed job",
        'echo "[$(date -Is)] job ${SLURM_JOB_ID} restart ${SLURM_RESTART_COUNT:-0} on ${SLURM_JOB_NODELIST}"',
        # --kill-on-bad-exit: one crashed rank ends the step instead of leaving the others hanging.
        f"srun --kill-on-bad-exit=1 {shlex.join(str(part) for part in command)}",
        "",
    ]
    return "\n".join(lines)


def submit(script_path: str | Path) -> str:
    """Submit an sbatch script and return its job id."""
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise SlurmError(
            "sbatch is not on PATH: submit from a SLURM login node (or run .ci/slurm-up.sh as root for "
            f"a local test cluster); the script is ready at {script_path}"
        )
    try:
        result = subprocess.run(
            [sbatch, "--parsable", str(script_path)],
            capture_output=True,
            text=True,
            timeout=SUBMIT_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired as error:
        raise SlurmError(f"sbatch did not answer within {SUBMIT_TIMEOUT_S}s; is slurmctld reachable?") from error
    if result.returncode != 0:
        raise SlurmError(
            f"sbatch rejected {script_path} (exit code {result.returncode}):\n{result.stderr.strip()}"
        )
    # --parsable prints "<job id>" or "<job id>;<cluster>"
    job_id = result.stdout.strip().split(";")[0]
    if not job_id.isdigit():
        raise SlurmError(f"sbatch answered {result.stdout.strip()!r}, expected a job id")
    return job_id


def load_experiment_config(config_path: str | Path, overrides: list[str]) -> DictConfig:
    """The run config exactly as train.py will see it (schema defaults, the YAML, the overrides),
    validated by the same schema, so a bad key fails at submission rather than on a compute node."""
    from configs.schema import ConfigError, load_config

    _check_time_is_text(config_path, overrides)
    try:
        return load_config(config_path, list(overrides))
    except ConfigError as error:
        raise SlurmError(str(error)) from error


def _check_time_is_text(config_path: str | Path, overrides: list[str]) -> None:
    """Refuse a `slurm.time` that YAML read as a number, before the schema turns 1800 into "1800"."""
    layers = [OmegaConf.load(config_path)] if Path(config_path).is_file() else []
    layers += [OmegaConf.from_dotlist([o]) for o in overrides if o.startswith("slurm.time=")]
    for layer in layers:
        _check_time_value(OmegaConf.select(layer, "slurm.time", default=None), "slurm")


def _check_time_value(time, source: str) -> None:
    if isinstance(time, (int, float)) and not isinstance(time, bool):
        # YAML 1.1 reads an unquoted `30:00` as the base-60 number 1800, which sbatch would take as
        # 1800 minutes; demand a string so the limit is what the user wrote.
        raise SlurmError(
            f"{source}.time is the number {time}; write it as a quoted string such as \"30:00\" or "
            f"\"04:00:00\" (unquoted mm:ss is read by YAML as base-60 seconds)"
        )


def slurm_config_from_dict(section: dict | DictConfig | None, *, source: str = "slurm") -> SlurmConfig:
    """Build a SlurmConfig from a mapping, rejecting unknown keys and values of the wrong type."""
    if section is None:
        return SlurmConfig()
    if isinstance(section, DictConfig):
        section = OmegaConf.to_container(section, resolve=True)
    if not isinstance(section, dict):
        raise SlurmError(f"{source} must be a mapping of SlurmConfig fields, got {section!r}")
    valid = [f.name for f in dataclasses.fields(SlurmConfig)]
    for key in section:
        if key not in valid:
            closest = difflib.get_close_matches(str(key), valid, n=1, cutoff=0.0)
            raise SlurmError(
                f"unknown key {source}.{key}; did you mean {source}.{closest[0]}? "
                f"Valid keys: {', '.join(valid)}"
            )
    _check_time_value(section.get("time"), source)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(SlurmConfig), section)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as error:
        raise SlurmError(f"invalid value in {source}: {error}") from error


def load_slurm_section(config_path: str | Path, overrides: list[str]) -> SlurmConfig:
    """The `slurm:` section of a run config (with overrides such as `slurm.time=01:00:00`)."""
    config = load_experiment_config(config_path, overrides)
    return slurm_config_from_dict(config.get("slurm"), source="slurm")

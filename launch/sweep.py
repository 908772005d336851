"""Config sweeps: expand a sweep file into runs, run them locally or as one SLURM job array, summarize.

A sweep file (YAML; relative paths are relative to the current directory, like train.py's):

    config: configs/sd15_t5xl.yaml        # the experiment every run starts from
    output_root: runs/lr-sweep            # run folders, the summary and SLURM logs go here
    base_overrides: [trainer.max_steps=200]   # optional, given to every run
    grid:                                 # optional: the cartesian product of these values
      model.optim.lr: [1.0e-4, 3.0e-4]
      model.adapter.num_blocks: [1, 2]
    runs:                                 # optional: an explicit list of override sets
      - {data.shards: /data/coco}
      - {data.shards: /data/laion, trainer.max_steps: 400}
    slurm: {time: "02:00:00"}             # optional, for --slurm: over the config's own slurm: section
    max_parallel: 4                       # optional, for --slurm: at most this many tasks at once

With only `grid`, there is one run per grid point; with only `runs`, one per entry; with both, every
`runs` entry is combined with every grid point (len(runs) x grid size runs, runs entries outermost),
and a key may not appear in both. A run's overrides are: base_overrides, then its runs-entry values,
then its grid values, then `output_dir=<output_root>/<name>`, where the name is derived from the run's
own (non-base) overrides: deterministic, filesystem-safe, with a hash suffix when shortened.

A run is finished when `<output_dir>/final_metrics.json` holds a JSON object (train.py writes it
last). Running a sweep again skips finished runs and simply starts the others again: train.py resumes
an interrupted run from its own newest checkpoint.
"""

from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import difflib
import functools
import hashlib
import itertools
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from llm4gen.configs.errors import ConfigError, UserError
from llm4gen.configs.schema import config_file, load_config
from llm4gen.launch.preflight import preflight
from llm4gen.lightning_modules.safe_loading import TRUST_FLAG, trusted_checkpoints
from llm4gen.launch.slurm import (
    SlurmConfig,
    SlurmError,
    load_experiment_config,
    render_sbatch_script,
    slurm_config_from_dict,
    training_command,
)

MAX_NAME_LENGTH = 80
FINAL_METRICS = "final_metrics.json"
SUMMARY_FILE = "summary.csv"
SLURM_LOG_DIR = "slurm-logs"
_UNSAFE_NAME_CHARS = re.compile(r"[^A-Za-z0-9._=+-]")


class SweepError(UserError, ValueError):
    """The sweep file is malformed, or a run file / array task cannot be resolved."""


@dataclass
class SweepSpec:
    """A parsed sweep file."""

    config: str
    output_root: Path
    base_overrides: list[str] = field(default_factory=list)
    grid: dict[str, list[Any]] = field(default_factory=dict)
    runs: list[dict[str, Any]] = field(default_factory=list)
    slurm: dict[str, Any] = field(default_factory=dict)
    max_parallel: int | None = None
    trust_checkpoint: bool = False  # sweep.py --trust-checkpoint, passed on to every run's train.py


@dataclass(frozen=True)
class SweepRun:
    """One run of a sweep: its name, its own overrides (key -> value) and its run folder."""

    name: str
    overrides: dict[str, Any]
    output_dir: Path

    @property
    def override_args(self) -> list[str]:
        return [f"{key}={format_value(value)}" for key, value in self.overrides.items()]


# ---------------------------------------------------------------- sweep file -> runs


def load_sweep(path: str | Path) -> SweepSpec:
    """Read and check a sweep file."""
    try:
        path = config_file(path)  # a path, or a sweep shipped with the package (configs/sweeps/...)
    except ConfigError:
        raise SweepError(f"sweep file not found: {path}") from None
    try:
        raw = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except (OmegaConfBaseException, yaml.YAMLError) as error:
        raise SweepError(f"cannot read sweep file {path}: {error}") from error
    if not isinstance(raw, dict):
        raise SweepError(f"{path} must be a mapping with config:, output_root: and grid: and/or runs:")

    valid = [f.name for f in dataclasses.fields(SweepSpec)]
    for key in raw:
        if key not in valid:
            closest = difflib.get_close_matches(str(key), valid, n=1, cutoff=0.0)[0]
            raise SweepError(f"{path}: unknown key {key!r}; did you mean {closest!r}? Valid keys: {', '.join(valid)}")
    for key in ("config", "output_root"):
        if not raw.get(key):
            raise SweepError(f"{path}: missing {key}:")

    grid = raw.get("grid") or {}
    if not isinstance(grid, dict):
        raise SweepError(f"{path}: grid must map dotted keys to lists of values, got {grid!r}")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise SweepError(f"{path}: grid.{key} must be a non-empty list of values, got {values!r}")
    runs = raw.get("runs") or []
    if not isinstance(runs, list) or not all(isinstance(entry, dict) and entry for entry in runs):
        raise SweepError(f"{path}: runs must be a list of non-empty mappings of dotted keys to values, got {runs!r}")
    if not grid and not runs:
        raise SweepError(f"{path}: defines no runs; add grid: and/or runs:")
    shared = sorted(set(grid) & {key for entry in runs for key in entry})
    if shared:
        raise SweepError(f"{path}: key(s) {shared} appear in both grid: and runs:; keep each key in one of them")
    base_overrides = raw.get("base_overrides") or []
    if not isinstance(base_overrides, list) or not all(isinstance(o, str) and "=" in o for o in base_overrides):
        raise SweepError(f"{path}: base_overrides must be a list of 'dotted.key=value' strings, got {base_overrides!r}")
    slurm = raw.get("slurm") or {}
    if not isinstance(slurm, dict):
        raise SweepError(f"{path}: slurm must be a mapping of SlurmConfig fields, got {slurm!r}")
    try:  # unknown keys and bad values fail now rather than at submission
        slurm_config_from_dict(slurm, source="slurm")
    except SlurmError as error:
        raise SweepError(f"{path}: {error}") from error
    max_parallel = raw.get("max_parallel")
    if max_parallel is not None and (not isinstance(max_parallel, int) or max_parallel < 1):
        raise SweepError(f"{path}: max_parallel must be a positive integer, got {max_parallel!r}")

    return SweepSpec(
        config=str(raw["config"]),
        output_root=Path(str(raw["output_root"])),
        base_overrides=list(base_overrides),
        grid=dict(grid),
        runs=[dict(entry) for entry in runs],
        slurm=dict(slurm),
        max_parallel=max_parallel,
    )


def format_value(value: Any) -> str:
    """An override value as OmegaConf's dotlist parser reads it back (strings stay strings)."""
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ",".join(format_value(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{key}: {format_value(item)}" for key, item in value.items()) + "}"
    text = str(value)
    # A string the dotlist parser would read as something else ("true", "1e-4", "null") is quoted.
    try:
        if OmegaConf.to_container(OmegaConf.from_dotlist([f"value={text}"]))["value"] == text:
            return text
    except (OmegaConfBaseException, ValueError):
        pass
    return "'" + text.replace("'", "''") + "'"


def run_name(overrides: dict[str, Any]) -> str:
    """Folder name from a run's own overrides: `key=value` joined by `_`, filesystem-safe.

    Characters outside [A-Za-z0-9._=+-] become '-'. When that loses information or the name is longer
    than MAX_NAME_LENGTH, a hash of the exact overrides is appended, so two different runs never share
    a folder.
    """
    exact = "_".join(f"{key}={format_value(value)}" for key, value in overrides.items())
    safe = _UNSAFE_NAME_CHARS.sub("-", exact)
    if safe == exact and len(safe) <= MAX_NAME_LENGTH and safe not in ("", ".", ".."):
        return safe
    digest = hashlib.sha1(exact.encode()).hexdigest()[:8]
    return f"{safe[: MAX_NAME_LENGTH - len(digest) - 1]}-{digest}"


def expand_runs(spec: SweepSpec) -> list[SweepRun]:
    """All runs of a sweep in a fixed order: runs entries outermost, grid (first key slowest) inside."""
    grid_keys = list(spec.grid)
    grid_points = [dict(zip(grid_keys, values)) for values in itertools.product(*spec.grid.values())]
    entries = spec.runs or [{}]
    expanded, seen = [], {}
    for entry in entries:
        for point in grid_points:
            overrides = {**entry, **point}
            name = run_name(overrides)
            if name in seen:
                raise SweepError(
                    f"runs {seen[name]} and {overrides} get the same folder {name!r}; remove the duplicate"
                )
            seen[name] = overrides
            expanded.append(SweepRun(name=name, overrides=overrides, output_dir=spec.output_root / name))
    return expanded


def train_command(spec: SweepSpec, run: SweepRun, train_script: str | Path | None = None,
                  python: str = sys.executable) -> list[str]:
    """`python train.py --config CFG base_overrides run_overrides output_dir=...`; later keys win."""
    return [
        *training_command(train_script, python),
        *([TRUST_FLAG] if spec.trust_checkpoint else []),
        "--config",
        spec.config,
        *spec.base_overrides,
        *run.override_args,
        f"output_dir={run.output_dir}",
    ]


def check_run_configs(spec: SweepSpec, runs: list[SweepRun], sweep_file: str | Path,
                      on_this_machine: bool = True) -> None:
    """Runs train.py's preflight on every run's config (schema, values, sources, paths, scheduler, cache,
    resume file) before any run starts or is submitted, whatever script trains them, so one misspelt grid key
    costs seconds, not a sweep of failed jobs. ``on_this_machine``: the runs train here (not a job array)."""
    for run in runs:
        overrides = [*spec.base_overrides, *run.override_args, f"output_dir={run.output_dir}"]
        try:
            with trusted_checkpoints(spec.trust_checkpoint):
                preflight(load_config(spec.config, overrides), on_this_machine)
        except UserError as error:  # a config, source, path or checkpoint error of this run
            raise SweepError(f"{sweep_file}: run {run.name!r} ({' '.join(run.override_args) or 'no overrides'}) has "
                             f"a bad config, so no run was started: {error}") from None


# ---------------------------------------------------------------- run status and summary


def read_final_metrics(run: SweepRun) -> dict[str, Any] | None:
    """The run's final metrics, or None while it is unfinished (no file, or not a JSON object)."""
    path = run.output_dir / FINAL_METRICS
    try:
        metrics = json.loads(path.read_text())
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
        return None  # NotADirectoryError: the run folder's path runs through a file; the preflight says so
    return metrics if isinstance(metrics, dict) else None


def is_finished(run: SweepRun) -> bool:
    return read_final_metrics(run) is not None


def summary_rows(runs: list[SweepRun]) -> list[dict[str, Any]]:
    """One row per run: name, status (finished/missing), its override values, its final metrics."""
    rows = []
    for run in runs:
        metrics = read_final_metrics(run)
        row = {"run": run.name, "status": "finished" if metrics is not None else "missing"}
        row.update({key: format_value(value) for key, value in run.overrides.items()})
        row.update(metrics or {})
        row["output_dir"] = str(run.output_dir)
        rows.append(row)
    return rows


def _summary_columns(runs: list[SweepRun], rows: list[dict[str, Any]]) -> list[str]:
    override_keys = list(dict.fromkeys(key for run in runs for key in run.overrides))
    fixed = {"run", "status", "output_dir", *override_keys}
    metric_keys = sorted({key for row in rows for key in row if key not in fixed})
    return ["run", "status", *override_keys, *metric_keys, "output_dir"]


def write_summary(runs: list[SweepRun], path: str | Path) -> list[dict[str, Any]]:
    """Write the summary CSV and return its rows."""
    rows = summary_rows(runs)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=_summary_columns(runs, rows), restval="")
        writer.writeheader()
        writer.writerows(rows)
    return rows


def format_summary_table(runs: list[SweepRun], rows: list[dict[str, Any]]) -> str:
    """The summary as an aligned text table (numbers to 6 significant digits; no output_dir column)."""
    columns = [c for c in _summary_columns(runs, rows) if c != "output_dir"]

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.6g}"
        return "" if value is None else str(value)

    table = [columns] + [[cell(row.get(column)) for column in columns] for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    return "\n".join("  ".join(text.ljust(width) for text, width in zip(line, widths)).rstrip() for line in table)


# ---------------------------------------------------------------- local runs


def run_locally(
    spec: SweepSpec,
    runs: list[SweepRun],
    train_script: str | Path | None = None,
    *,
    jobs: int = 1,
    log: Callable[[str], None] = functools.partial(print, flush=True),  # before the child's output
) -> dict[str, str]:
    """Run unfinished runs, ``jobs`` at a time; returns name -> skipped / finished / failed (...).

    With ``jobs > 1`` the machine's cores are shared out (``OMP_NUM_THREADS`` = cores // jobs for each
    run: two 2-thread runs on 2 cores stall each other's thread barriers) and each run's output goes to
    ``<run>/train.log`` instead of the terminal. A failed run does not stop the sweep: the others still
    run, and the next invocation retries it.
    """
    if jobs < 1:
        raise SweepError(f"--jobs {jobs}: run at least one run at a time")
    outcome: dict[str, str] = {}
    todo = []
    for index, run in enumerate(runs, start=1):
        if is_finished(run):
            log(f"[{index}/{len(runs)}] {run.name}: finished already, skipped")
            outcome[run.name] = "skipped"
        else:
            todo.append((index, run))
    env = None
    if jobs > 1:
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or jobs) // jobs))}

    def one(index: int, run: SweepRun) -> None:
        log(f"[{index}/{len(runs)}] {run.name}: running" + (f" (output: {run.output_dir / 'train.log'})" if env else ""))
        if env is None:
            returncode = subprocess.run(train_command(spec, run, train_script)).returncode
        else:
            run.output_dir.mkdir(parents=True, exist_ok=True)
            with open(run.output_dir / "train.log", "a") as output:
                returncode = subprocess.run(train_command(spec, run, train_script), env=env, stdout=output,
                                            stderr=subprocess.STDOUT).returncode
        if returncode == 0 and is_finished(run):
            outcome[run.name] = "finished"
        elif returncode == 0:
            outcome[run.name] = f"failed (exit code 0 but no {FINAL_METRICS})"
        else:
            outcome[run.name] = f"failed (exit code {returncode})"
        log(f"[{index}/{len(runs)}] {run.name}: {outcome[run.name]}")

    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        for future in [pool.submit(one, index, run) for index, run in todo]:
            future.result()
    return {run.name: outcome[run.name] for run in runs}


# ---------------------------------------------------------------- SLURM job array


def write_array_runs_file(
    spec: SweepSpec, runs: list[SweepRun], train_script: str | Path | None = None, *, dry_run: bool = False
) -> Path:
    """The list the array tasks pick their run from (task i -> entry i), in output_root.

    The file name carries a hash of its content: resubmitting a different set of runs writes a new
    file, so tasks of an earlier array (e.g. requeued ones) still find the run they were given.
    """
    entries = [
        {
            "name": run.name,
            "output_dir": str(run.output_dir.absolute()),
            "command": train_command(
                dataclasses.replace(spec, config=str(Path(spec.config).absolute())),
                dataclasses.replace(run, output_dir=run.output_dir.absolute()),
                train_script,
            ),
        }
        for run in runs
    ]
    content = json.dumps({"runs": entries}, indent=2) + "\n"
    digest = hashlib.sha1(content.encode()).hexdigest()[:10]
    path = spec.output_root.absolute() / f"sweep-runs-{digest}.json"
    if not dry_run:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
    return path


def array_slurm_config(spec: SweepSpec, n_tasks: int) -> SlurmConfig:
    """The config's own slurm: section, with the sweep's slurm: on top, as an array of n_tasks."""
    base = load_experiment_config(spec.config, spec.base_overrides).get("slurm") or {}
    merged = OmegaConf.to_container(OmegaConf.merge(base, spec.slurm), resolve=True)
    cfg = slurm_config_from_dict(merged, source="slurm")
    array = f"0-{n_tasks - 1}" + (f"%{spec.max_parallel}" if spec.max_parallel else "")
    return dataclasses.replace(cfg, array=array, job_name=cfg.job_name or spec.output_root.name)


def render_array_script(spec: SweepSpec, runs_file: Path, n_tasks: int, sweep_script: str | Path) -> str:
    """sbatch script of a job array whose task i runs entry i of runs_file (via `sweep.py --run-task`)."""
    cfg = array_slurm_config(spec, n_tasks)
    command = [sys.executable, str(Path(sweep_script).absolute()), "--run-task", str(runs_file)]
    return render_sbatch_script(cfg, command, array_log_dir(spec))


def array_log_dir(spec: SweepSpec) -> Path:
    """Where array tasks write their logs (`slurm-<array job id>_<task id>.out`); must exist before sbatch."""
    return spec.output_root.absolute() / SLURM_LOG_DIR


def resolve_array_task(runs_file: str | Path, task_id: str | int | None) -> dict[str, Any]:
    """The runs-file entry for an array task id (SLURM_ARRAY_TASK_ID)."""
    if task_id is None:
        raise SweepError("--run-task needs SLURM_ARRAY_TASK_ID (it runs inside a SLURM array task)")
    entries = json.loads(Path(runs_file).read_text())["runs"]
    index = int(task_id)
    if not 0 <= index < len(entries):
        raise SweepError(f"array task {index} has no run: {runs_file} lists {len(entries)} runs (0-{len(entries) - 1})")
    return entries[index]


def exec_array_task(runs_file: str | Path, task_id: str | int | None = None) -> int:
    """Inside an array task: replace this process by the training command of its run."""
    task_id = task_id if task_id is not None else os.environ.get("SLURM_ARRAY_TASK_ID")
    entry = resolve_array_task(runs_file, task_id)
    if (Path(entry["output_dir"]) / FINAL_METRICS).is_file():
        print(f"array task {task_id}: run {entry['name']} finished already")
        return 0
    print(f"array task {task_id}: run {entry['name']}", flush=True)
    command = entry["command"]
    os.execv(command[0], command)
    return 1  # not reached

"""What every study on the shapes benchmark shares: its command line (``run`` or ``report`` a sweep file), and a
``run`` that writes the data, trains the sweep's runs through ``python -m llm4gen.cli.train`` (each run's config
checked first), writes the report and records the whole command's wall time beside it."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Optional

from llm4gen.configs.errors import UserError
from omegaconf import OmegaConf

from llm4gen.launch.sweep import SweepRun, SweepSpec, check_run_configs, expand_runs, is_finished, load_sweep, run_locally


class ExperimentError(UserError, ValueError):
    """A study cannot go on: what is wrong and what to do, in one line."""


def train_runs(spec: SweepSpec, sweep_file: str, jobs: int = 2, log=print) -> None:
    """Every run of the sweep checked, then trained here ``jobs`` at a time (finished ones skipped); a failed run
    stops the study, naming it."""
    runs = expand_runs(spec)
    check_run_configs(spec, runs, sweep_file)
    outcome = run_locally(spec, runs, jobs=jobs, log=log)  # python -m llm4gen.cli.train: works from a wheel
    failed = [name for name, state in outcome.items() if state.startswith("failed")]
    if failed:
        raise ExperimentError(f"{len(failed)} runs failed ({', '.join(failed)}); see their train.log, then run "
                              f"this command again to resume them")


def finished_runs(spec: SweepSpec) -> tuple[list[tuple[SweepRun, dict]], list[str]]:
    """The sweep's finished runs, each with its resolved ``config.yaml`` (plain containers), and the names of the
    unfinished ones."""
    finished, unfinished = [], []
    for run in expand_runs(spec):
        if not is_finished(run):
            unfinished.append(run.name)
            continue
        finished.append((run, OmegaConf.to_container(OmegaConf.load(run.output_dir / "config.yaml"), resolve=True)))
    return finished, unfinished


def run_study(command: str, sweep_file: str, data: Callable[[SweepSpec], object], report: Callable[[], Path],
              jobs: int = 2, log=print, training_jobs: Optional[int] = None) -> Path:
    """``data(spec)``, the sweep's training runs (``training_jobs`` at a time, by default ``jobs``), then ``report()``
    (the report's folder); ``command`` (how the study was started) and its wall time go into ``wall_time.txt`` there."""
    started = time.time()
    spec = load_sweep(sweep_file)
    data(spec)
    train_runs(spec, sweep_file, training_jobs or jobs, log)
    out = report()
    minutes = (time.time() - started) / 60
    (out / "wall_time.txt").write_text(f"{minutes:.1f} min for `{command}`\n")
    log(f"{command}: {minutes:.1f} min")
    return out


def study_command(module: str, command: str, sweep_file: str, *flags: str) -> str:
    """How the study was started, as wall_time.txt records it."""
    return " ".join(["python -m", module, command, sweep_file, *flags])

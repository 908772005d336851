"""Run a config sweep locally or as one SLURM job array, and summarize it.

    python sweep.py SWEEP.yaml                 # run unfinished runs one after another here
    python sweep.py SWEEP.yaml --jobs 2        # two at a time, the cores shared out, output to <run>/train.log
    python sweep.py SWEEP.yaml --slurm         # submit unfinished runs as one job array
    python sweep.py SWEEP.yaml --dry-run       # list runs, their status and commands (with --slurm:
                                               #   print the array script); writes and runs nothing
    python sweep.py SWEEP.yaml --summary       # only write and print <output_root>/summary.csv

Finished runs (final_metrics.json present) are skipped; unfinished ones are started again and resume
from their own checkpoints. The sweep file format is described in launch/sweep.py.
`python sweep.py --run-task RUNS_FILE` is what each array task runs; it is not meant to be typed.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from llm4gen.configs.errors import ConfigError, entry_point
from llm4gen.configs.schema import config_file
from llm4gen.launch.slurm import submit
from llm4gen.launch.sweep import (
    SUMMARY_FILE,
    SweepError,
    array_log_dir,
    check_run_configs,
    exec_array_task,
    expand_runs,
    format_summary_table,
    is_finished,
    load_sweep,
    render_array_script,
    run_locally,
    train_command,
    write_array_runs_file,
    write_summary,
)
from llm4gen.lightning_modules.safe_loading import TRUST_FLAG, TRUST_HELP


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep", nargs="?", help="sweep YAML file")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--slurm", action="store_true", help="submit unfinished runs as one SLURM job array")
    mode.add_argument("--summary", action="store_true", help="only write and print the summary")
    mode.add_argument("--run-task", metavar="RUNS_FILE", help=argparse.SUPPRESS)
    parser.add_argument("--dry-run", action="store_true", help="show what would run; write and run nothing")
    parser.add_argument("--jobs", type=int, default=1, help="local runs at a time (default 1); each gets "
                                                            "cores // jobs threads and writes <run>/train.log")
    parser.add_argument(
        "--train-script", default=None, help="a training script to run instead of llm4gen.cli.train (train.py)"
    )
    parser.add_argument(TRUST_FLAG, action="store_true", help=f"every run's resume checkpoints (train.py "
                                                              f"{TRUST_FLAG}): {TRUST_HELP}")
    parser.add_argument("--no-preflight", action="store_true",
                        help="skip train.py's checks of every run's config (for a --train-script that reads keys of "
                             "its own, not llm4gen's)")
    return parser


@entry_point("sweep.py")
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.run_task:
        return exec_array_task(args.run_task)
    if not args.sweep:
        parser.error("give a sweep file: python sweep.py SWEEP.yaml")
    spec = dataclasses.replace(load_sweep(args.sweep), trust_checkpoint=args.trust_checkpoint)
    runs = expand_runs(spec)
    pending = [run for run in runs if not is_finished(run)]

    if args.dry_run:
        print(f"{len(runs)} runs, {len(runs) - len(pending)} finished, {len(pending)} to run")
        for run in runs:
            status = "finished" if run not in pending else "to run"
            print(f"  {run.name} [{status}]: {' '.join(train_command(spec, run, args.train_script))}")
        if args.slurm and pending:
            runs_file = write_array_runs_file(spec, pending, args.train_script, dry_run=True)
            print(render_array_script(spec, runs_file, len(pending), Path(__file__)))
        return 0

    if not args.summary and pending:
        try:
            config_file(spec.config)
        except ConfigError as error:
            raise SweepError(f"{args.sweep}: {error}") from None
    if not args.summary and not args.no_preflight:
        # every run's config, before any starts or is submitted
        check_run_configs(spec, pending, args.sweep, on_this_machine=not args.slurm)

    if args.slurm:
        if not pending:
            print(f"all {len(runs)} runs finished; nothing to submit")
        else:
            runs_file = write_array_runs_file(spec, pending, args.train_script)
            script = render_array_script(spec, runs_file, len(pending), Path(__file__))
            array_log_dir(spec).mkdir(parents=True, exist_ok=True)  # sbatch does not create it
            script_path = runs_file.with_suffix(".sbatch")
            script_path.write_text(script)
            job_id = submit(script_path)
            print(
                f"submitted job array {job_id} with {len(pending)} tasks "
                f"({len(runs) - len(pending)} runs finished already)"
            )
            print(f"logs: {array_log_dir(spec)}/slurm-{job_id}_<task>.out")
            print(f"summary once done: python sweep.py {args.sweep} --summary")
        return 0

    failed = {}
    if not args.summary:
        outcome = run_locally(spec, runs, args.train_script, jobs=args.jobs)
        failed = {name: status for name, status in outcome.items() if status.startswith("failed")}
    rows = write_summary(runs, spec.output_root / SUMMARY_FILE)
    print(format_summary_table(runs, rows))
    print(f"summary: {spec.output_root / SUMMARY_FILE}")
    if failed:
        print(f"{len(failed)} run(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Submit one training run as a SLURM batch job.

    python submit.py --config configs/sd15_t5xl.yaml [--dry-run] [dotted.key=value ...]

Resources come from the config's `slurm:` section (fields of launch.slurm.SlurmConfig), which the
same overrides can change (`slurm.time=01:00:00`). The script is written to
`<output_dir>/slurm.sbatch`; the job runs `train.py` with the same config and overrides plus a fixed
`output_dir`, so a requeued or resubmitted job resumes the same run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from llm4gen.configs.errors import entry_point
from llm4gen.launch.preflight import preflight
from llm4gen.lightning_modules.safe_loading import TRUST_FLAG, TRUST_HELP, trusted_checkpoints
from llm4gen.launch.slurm import (
    SlurmError,
    load_experiment_config,
    load_slurm_section,
    log_path_pattern,
    render_sbatch_script,
    submit,
    training_command,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="experiment YAML, e.g. configs/sd15_t5xl.yaml")
    parser.add_argument("--dry-run", action="store_true", help="print the sbatch script, write and submit nothing")
    parser.add_argument(
        "--train-script", default=None, help="a training script to run instead of llm4gen.cli.train (train.py)"
    )
    parser.add_argument(TRUST_FLAG, action="store_true", help=f"the run's resume checkpoints, here and in the job "
                                                              f"(train.py {TRUST_FLAG}): {TRUST_HELP}")
    parser.add_argument("overrides", nargs="*", help="OmegaConf dotlist overrides, e.g. trainer.max_steps=20")
    return parser


def train_command(train_script: str | Path | None, config: str | Path, overrides: list[str], output_dir: Path,
                  trust_checkpoint: bool = False) -> list[str]:
    """The job's command, with the run folder fixed at submission so a requeued job finds it again.

    `slurm.*` overrides shaped the sbatch script and are not passed on to training.
    """
    kept = [o for o in overrides if not o.startswith(("output_dir=", "slurm."))]
    return [
        *training_command(train_script),
        *([TRUST_FLAG] if trust_checkpoint else []),
        "--config",
        str(Path(config).absolute()),
        *kept,
        f"output_dir={output_dir}",
    ]


@entry_point("submit.py")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    slurm = load_slurm_section(args.config, args.overrides)
    output_dir = load_experiment_config(args.config, args.overrides).get("output_dir")
    if not output_dir:
        raise SlurmError(f"{args.config} sets no output_dir; pass one, e.g. output_dir=runs/my-run")

    # train.py's own checks: fail here, not after a queue wait (what the node itself lacks, train.py checks there)
    with trusted_checkpoints(args.trust_checkpoint):
        preflight(load_experiment_config(args.config, args.overrides), on_this_machine=False)
    output_dir = Path(str(output_dir)).absolute()
    command = train_command(args.train_script, args.config, args.overrides, output_dir, args.trust_checkpoint)
    script = render_sbatch_script(slurm, command, output_dir)
    if args.dry_run:
        print(script)
        return 0
    output_dir.mkdir(parents=True, exist_ok=True)
    script_path = output_dir / "slurm.sbatch"
    script_path.write_text(script)
    job_id = submit(script_path)
    log = str(log_path_pattern(slurm, output_dir)).replace("%j", job_id).replace("%A", job_id)
    print(f"submitted job {job_id}")
    print(f"log: {log}")
    print(f"script: {script_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

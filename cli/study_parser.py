"""The arguments every study takes: ``python -m llm4gen.cli.<study> {run,report} SWEEP [--jobs N]``."""

from __future__ import annotations

import argparse
from typing import Optional


def study_parser(module: str, description: Optional[str], sweep_example: str,
                 commands: tuple[str, ...] = ("run", "report")) -> argparse.ArgumentParser:
    """A parser named ``python -m MODULE`` with the study's commands, its sweep and ``--jobs``."""
    parser = argparse.ArgumentParser(prog=f"python -m {module}", description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=commands)
    parser.add_argument("sweep", help=f"the sweep file, e.g. {sweep_example}")
    parser.add_argument("--jobs", type=int, default=2, help="training runs and evaluations at a time (2 single-thread "
                                                            "processes use 2 cores best)")
    return parser

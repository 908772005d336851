"""The pilot that fixes each connector's training length (llm4gen/experiments/pilot.py).

    python -m llm4gen.cli.pilot --help
"""

from __future__ import annotations

import sys
from typing import Optional

from llm4gen.cli.study_parser import study_parser
from llm4gen.configs.errors import entry_point
from llm4gen.experiments import pilot
from llm4gen.experiments.pilot import MODULE, report, run


@entry_point(f"python -m {MODULE}")
def main(argv: Optional[list[str]] = None) -> int:
    args = study_parser(MODULE, pilot.__doc__, "configs/sweeps/pilot.yaml").parse_args(argv)
    (run if args.command == "run" else report)(args.sweep, args.jobs)
    return 0


if __name__ == "__main__":
    sys.exit(main())

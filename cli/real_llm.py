"""The evidence experiment's real-LLM arm (llm4gen/experiments/real_llm.py): data, runs and report.

    python -m llm4gen.cli.real_llm --help
"""

from __future__ import annotations

import sys
from typing import Optional

from llm4gen.cli.study_parser import study_parser
from llm4gen.configs.errors import entry_point
from llm4gen.experiments import real_llm
from llm4gen.experiments.real_llm import MODULE, report, run


@entry_point(f"python -m {MODULE}")
def main(argv: Optional[list[str]] = None) -> int:
    args = study_parser(MODULE, real_llm.__doc__, "configs/sweeps/evidence_smollm2.yaml").parse_args(argv)
    (run if args.command == "run" else report)(args.sweep, args.jobs)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The connector comparison (llm4gen/experiments/connectors.py): data, runs and report.

    python -m llm4gen.cli.connectors --help
"""

from __future__ import annotations

import sys
from typing import Optional

from llm4gen.cli.study_parser import study_parser
from llm4gen.configs.errors import entry_point
from llm4gen.experiments import connectors
from llm4gen.experiments.connectors import MODULE, report, run


@entry_point(f"python -m {MODULE}")
def main(argv: Optional[list[str]] = None) -> int:
    parser = study_parser(MODULE, connectors.__doc__, "configs/sweeps/connectors.yaml")
    parser.add_argument("--protocol", choices=("v2", "v3"), default="v2",
                        help="v2: the sweep's own protocol (protocol.md, protocol_lora.md); v3: protocol_v3.md's rules")
    args = parser.parse_args(argv)
    (run if args.command == "run" else report)(args.sweep, args.jobs, v3=args.protocol == "v3")
    return 0


if __name__ == "__main__":
    sys.exit(main())

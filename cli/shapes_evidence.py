"""The shapes evidence experiment (llm4gen/experiments/shapes_evidence.py): data, runs and report.

    python -m llm4gen.cli.shapes_evidence --help
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

from llm4gen.cli.study_parser import study_parser
from llm4gen.configs.errors import entry_point
from llm4gen.experiments import shapes_evidence
from llm4gen.experiments.evidence_data import run_probe, write_data
from llm4gen.experiments.evidence_protocol import PROTOCOLS
from llm4gen.experiments.evidence_power import planned_scenes, size_table
from llm4gen.experiments.evidence_report import load_object_records, replot, report
from llm4gen.experiments.shapes_evidence import MODULE, run
from llm4gen.launch.sweep import load_sweep


@entry_point(f"python -m {MODULE}")
def main(argv: Optional[list[str]] = None) -> int:
    parser = study_parser(MODULE, shapes_evidence.__doc__, "configs/sweeps/shapes_evidence.yaml (replot: a report's results.json[.gz]; "
                          "differences.png is written beside it; size: a report's results.json[.gz])",
                          ("run", "data", "report", "replot", "size"))
    parser.add_argument("--base", help="report: evaluate this base for arm (a) (default: the config's)")
    parser.add_argument("--protocol", choices=list(PROTOCOLS), default="v2",
                        help="whose rules and evaluation scenes: v2 (docs/evidence/protocol.md), v3 "
                             "(protocol_v3.md), v3-replication (v3 on freshly drawn scenes), v4 (protocol_v4.md: "
                             "the confirmatory study of the CAM over the frozen base)")
    parser.add_argument("--replication", help="report/run: a replication study's report folder, added as a section; "
                                              "size: a second study's results.json[.gz], sized beside the first")
    args = parser.parse_args(argv)
    protocol = PROTOCOLS[args.protocol]

    if args.command == "data":
        spec = load_sweep(args.sweep)
        write_data(spec, protocol)
        run_probe(spec, spec.output_root / "probe.json")
    elif args.command == "report":
        report(args.sweep, args.jobs, args.base, protocol=protocol, replication=args.replication)
    elif args.command == "size":
        print(set_sizes(args.sweep, args.replication, protocol))
    elif args.command == "replot":
        print(replot(Path(args.sweep), Path(args.sweep).parent / "differences.png", protocol))
    else:
        run(args.sweep, args.jobs, protocol=protocol, name=args.protocol, replication=args.replication)
    return 0


def set_sizes(results: str, second: Optional[str], protocol) -> str:
    """The size command: protocol v4's differences, their variance over scenes in the given studies' records,
    and the scenes a 0.04 half-width needs (experiments/evidence_power.py)."""
    studies = {results: load_object_records(Path(results))}
    if second:
        studies[second] = load_object_records(Path(second))
    comparisons = [("c", "a", "outside"), ("d_shuffled", "a", "outside"), ("c", "a", "seen_1"), ("c", "a", "short"),
                   ("c", "a", "post_nominal")]
    return size_table(studies, comparisons, planned_scenes(protocol))


if __name__ == "__main__":
    sys.exit(main())

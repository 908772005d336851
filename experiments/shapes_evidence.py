"""The miniature LLM4GEN experiment on the shapes benchmark, run as pre-registered in docs/evidence/protocol.md.

    python -m llm4gen.cli.shapes_evidence run configs/sweeps/shapes_evidence.yaml      # data, training, report
    python -m llm4gen.cli.shapes_evidence data configs/sweeps/shapes_evidence.yaml     # shards + feature cache only
    python -m llm4gen.cli.shapes_evidence report configs/sweeps/shapes_evidence.yaml   # evaluate finished runs

Protocol v4 (docs/evidence/protocol_v4.md, ``--protocol v4``) is a confirmatory study of one claim with its own
arms: (a), (a chunked) the base on CLIP over three windows untrained, (c) the CAM over the frozen base, and (c
shuffled); its rules are evidence_rules.decisions_v4.

LLM4GEN claims two things: an LLM's features help with long, dense descriptions that CLIP's 77-token
window cuts off, and they bind attributes to objects better. The arms, on the shipped shapes base, the
same cached shards (75% verbose captions) and the same noise draws:

    (a)  base                 the pretrained base alone
    (b)  UNet ft              the UNet fine-tuned on CLIP alone (the paper's "SD1.5 (ft)" control)
    (b2) UNet ft, chunked     (b) on CLIP over three 77-token windows: more tokens, no LLM
    (c)  CAM                  the CAM alone, UNet frozen (arm (d)'s checkpoint before its UNet joins)
    (d)  CAM, then CAM + UNet the CAM alone, then both jointly (the release tuned its UNet)
    (e)  (d) + entity loss
    (d) shuffled              (d) with each verbose prompt's LLM features taken from another prompt

Each arm's runs are the sweep's (told apart by their resolved ``config.yaml``); the report samples every
arm on the protocol's sets with the same seeds, scores each prompt object with the analyzer's error
categories, splits verbose prompts' objects by whether CLIP's window holds them, and compares arms
pairwise on the same (prompt, noise) draws with scene-clustered bootstrap CIs (``evaluation.paired``).
The gates and decision rules of the protocol are applied in code (evidence_rules.py) and written
to ``<output_root>/report/``: ``report.md``, ``results.json``, ``differences.png`` and ``samples.png``.
Images already generated are kept, so a report run again only scores.

One job per file: evidence_protocol.py (arms, sets, each protocol's settings), evidence_data.py (shards, feature
cache, probe), evidence_tasks.py (what is sampled, and each object's outcome), evidence_rules.py (statistics,
gates, decisions), evidence_report.py (tables, plots, the report); this file runs them in order as one study,
and cli/shapes_evidence.py is its command line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from llm4gen.experiments.evidence_data import run_probe, write_data
from llm4gen.experiments.evidence_protocol import PROTOCOL_SETTINGS, Protocol
from llm4gen.experiments.evidence_report import report
from llm4gen.experiments.runner import run_study, study_command

MODULE = "llm4gen.cli.shapes_evidence"  # the command line


def run(sweep_file: str, jobs: int = 2, log=print, protocol: Protocol = PROTOCOL_SETTINGS, name: str = "v2",
        replication: Optional[str] = None) -> Path:
    """Data (shards, feature cache, the probe), the sweep's runs, the report: the whole experiment."""
    def data(spec):
        write_data(spec, protocol, log=log)
        run_probe(spec, spec.output_root / "probe.json", log)

    flags = [] if name == "v2" else ["--protocol", name]
    return run_study(study_command(MODULE, "run", sweep_file, *flags), sweep_file, data,
                     lambda: report(sweep_file, jobs, log=log, protocol=protocol, replication=replication), jobs, log,
                     training_jobs=protocol.training_jobs)

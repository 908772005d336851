"""The pilot that fixes how long each connector trains in protocol v3 (issue 35; its rule was committed before
it ran: docs/evidence/pilot_v3.md).

    python -m llm4gen.cli.pilot run configs/sweeps/pilot.yaml      # data, the five runs, the report
    python -m llm4gen.cli.pilot report configs/sweeps/pilot.yaml   # evaluate and report finished runs

Each connector (cam, cam with the gated fusion, mlp, lavi_bridge, ella) trains 2,000 steps at seed 0 on the
evidence experiment's data and recipe with the UNet frozen; each is sampled at its initial weights and at
steps 300, 1000, 1500, 2000 on the evidence protocol's sets with the same noise, scored per object by the
shapes analyzer, and compared with its own earlier steps. :func:`training_length` is the rule.
"""

from __future__ import annotations

import csv
import gzip
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from llm4gen.evaluation.paired import Difference
from llm4gen.evaluation.prompt_sets import prompt_set
from llm4gen.experiments import evidence_data, evidence_rules, evidence_tasks
from llm4gen.experiments.runner import ExperimentError, finished_runs, run_study, study_command
from llm4gen.launch.sweep import load_experiment_config, load_sweep
from llm4gen.lightning_modules.attention_split import attention_split
from llm4gen.lightning_modules.sampler import load_checkpoint_module

MODULE = "llm4gen.cli.pilot"  # the command line
RULE = "docs/evidence/pilot_v3.md"
STEPS = (0, 300, 1000, 1500, 2000)          # evaluated
CANDIDATES = (300, 1000, 1500, 2000)        # training lengths the rule may pick
RULE_SUBSETS = ("seen_1", "outside")        # an arm has stopped learning when neither improves any more
REPORTED = ("seen_1", "short", "outside", "inside")
SETS = ("seen_1", "phrased_2", "phrased_3", "verbose_2", "verbose_3")
KINDS = ("cam", "cam_gated", "mlp", "lavi_bridge", "ella")
LOSS_WINDOW = 100                           # steps of logged train/diffusion averaged before a checkpoint


def kind_of(model: dict) -> str:
    """The pilot arm of a run's resolved ``model`` section: the connector kind, ``_gated`` for the gated fusion."""
    kind = model["adapter"].get("kind", "cam")
    return kind + ("_gated" if model["adapter"].get("fusion") == "gated" else "")


def at(kind: str, step: int) -> str:
    """The arm name of a kind at a step, as the records carry it: ``cam@300``."""
    return f"{kind}@{step}"


# ---------------------------------------------------------------- the rule (pure)


def improves(diff: Optional[Difference]) -> bool:
    """A later step improves on an earlier one when their paired difference's CI lies entirely above 0."""
    return diff is not None and diff.low > 0


@dataclass(frozen=True)
class Length:
    kind: str
    steps: int
    stopped: bool      # False: it was still improving when the budget ended
    reason: str


def training_length(records, kind: str, candidates=CANDIDATES, steps=STEPS, subsets=RULE_SUBSETS) -> Length:
    """The smallest candidate ``s`` that no later evaluated step improves on, on any rule subset; when every
    candidate before the last is improved on, the last, and the arm had not stopped learning."""
    for s in candidates[:-1]:
        beaten = [f"step {t} on {subset}" for t in steps if t > s for subset in subsets
                  if improves(evidence_rules.compare(records, at(kind, t), at(kind, s), subset))]
        if not beaten:
            return Length(kind, s, True, f"no later step improves on step {s} ({' or '.join(subsets)})")
    return Length(kind, candidates[-1], False, f"every candidate before {candidates[-1]} is improved on by a later step")


# ---------------------------------------------------------------- runs, tasks, losses


def runs_by_kind(spec) -> tuple[dict[str, object], list[str]]:
    finished, unfinished = finished_runs(spec)
    return {kind_of(cfg["model"]): run for run, cfg in finished}, unfinished


def evaluation_tasks(spec, base: str, runs: dict) -> list[evidence_tasks.Task]:
    """Each kind at every evaluated step (step 0: its initial weights), and the base, at seed 0."""
    tasks = [evidence_tasks.Task("a", 0, str(spec.output_root / "base" / "eval"), SETS, base=base)]
    for kind, run in runs.items():
        for step in STEPS:
            out = str(run.output_dir / "eval" / f"step_{step:07d}")
            if step == 0:
                tasks.append(evidence_tasks.Task(at(kind, 0), 0, out, SETS, initial=str(run.output_dir / "config.yaml")))
            else:
                tasks.append(evidence_tasks.Task(at(kind, step), 0, out, SETS,
                                           checkpoint=str(evidence_tasks.checkpoint_at(run.output_dir, step))))
    return tasks


def loss_before(run_dir: Path, step: int, window: int = LOSS_WINDOW) -> Optional[float]:
    """Mean logged ``train/diffusion`` over the ``window`` steps up to ``step`` (None at step 0 or unlogged)."""
    path = run_dir / "logs" / "metrics.csv"
    if step == 0 or not path.is_file():
        return None
    values = []
    with open(path) as handle:
        for row in csv.DictReader(handle):
            value = row.get("train/diffusion") or ""
            if value and step - window < int(row["step"]) + 1 <= step:
                values.append(float(value))
    return sum(values) / len(values) if values else None


# ---------------------------------------------------------------- the report


def curves_plot(records, kinds: list[str], path: Path) -> Path:
    """Bound share against training step, one panel per reported subset, one line per kind; the base dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(REPORTED), figsize=(4 * len(REPORTED), 3.4), sharex=True)
    for ax, subset in zip(axes, REPORTED):
        base = evidence_rules.rate(evidence_rules.select(records, "a", subset))
        if base is not None:
            ax.axhline(base, color="black", ls="--", lw=0.8, label="base (a)")
        for i, kind in enumerate(kinds):
            points = [(s, evidence_rules.rate(evidence_rules.select(records, at(kind, s), subset))) for s in STEPS]
            points = [(s, r) for s, r in points if r is not None]
            ax.plot([s for s, _ in points], [r for _, r in points], "o-", color=f"C{i}", label=kind, ms=4)
        ax.set_title(evidence_rules.SUBSETS[subset][0], fontsize=8)
        ax.set_xlabel("training step")
        ax.set_ylim(0, 1)
    axes[0].set_ylabel("share of objects drawn bound")
    axes[-1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def fmt(diff: Optional[Difference]) -> str:
    return "-" if diff is None else f"{diff.mean:+.3f} [{diff.low:+.3f}, {diff.high:+.3f}]"


def kind_table(records, kind: str, run_dir: Path, splits: dict) -> str:
    lines = ["| step | loss | " + " | ".join(REPORTED) + " | vs the previous step: " + " / ".join(RULE_SUBSETS)
             + " | attention CLIP / LLM / padding |", "|---|---|" + "---|" * len(REPORTED) + "---|---|"]
    for i, step in enumerate(STEPS):
        rates = [evidence_rules.rate(evidence_rules.select(records, at(kind, step), s)) for s in REPORTED]
        loss = loss_before(run_dir, step)
        previous = [evidence_rules.compare(records, at(kind, step), at(kind, STEPS[i - 1]), s) for s in RULE_SUBSETS] if i else []
        split = splits.get(at(kind, step))
        lines.append(f"| {step} | {'-' if loss is None else f'{loss:.4f}'} | "
                     + " | ".join("-" if r is None else f"{r:.3f}" for r in rates) + " | "
                     + (" / ".join(fmt(d) for d in previous) or "-") + " | "
                     + ("-" if split is None else f"{split.clip:.2f} / {split.llm:.2f} / {split.padding:.2f}") + " |")
    return "\n".join(lines)


def report(sweep_file: str, jobs: int = 2, log=print) -> Path:
    spec = load_sweep(sweep_file)
    cfg = load_experiment_config(spec.config, spec.base_overrides)
    runs, unfinished = runs_by_kind(spec)
    if not runs:
        raise ExperimentError(f"no finished pilot run under {spec.output_root}; train them first: "
                                       f"python -m llm4gen.cli.pilot run {sweep_file}")
    if unfinished:
        log(f"not finished, left out of the report: {', '.join(unfinished)}")
    tasks = evaluation_tasks(spec, cfg.model.base.pretrained, runs)
    todo = sum(not (Path(t.out) / "scores.json").is_file() for t in tasks)
    started = time.time()
    evidence_tasks.run_tasks(tasks, jobs, log)
    evaluation_seconds = time.time() - started
    records = [r for task in tasks for r in evidence_tasks.object_records(task)]
    kinds = [k for k in KINDS if k in runs]
    verbose = [r.text for r in prompt_set("verbose_2")]
    splits = {}
    for kind in kinds:
        for step in STEPS[1:]:
            module = load_checkpoint_module(evidence_tasks.checkpoint_at(runs[kind].output_dir, step))
            with module.ema_weights():
                splits[at(kind, step)] = attention_split(module, verbose)
    lengths = {kind: training_length(records, kind) for kind in kinds}
    out = spec.output_root / "report"
    out.mkdir(parents=True, exist_ok=True)
    curves_plot(records, kinds, out / "curves.png")
    base_rates = " | ".join(f"{evidence_rules.rate(evidence_rules.select(records, 'a', s)):.3f}" for s in REPORTED)
    text = [f"# Pilot for protocol v3: {len(kinds)} connectors, seed 0, up to {STEPS[-1]} steps", "",
            f"Rule: `{RULE}` (committed before this pilot ran). Sweep `{sweep_file}`. Share of prompt objects drawn "
            f"bound (every attribute right); each step's paired difference against the arm's previous evaluated step "
            f"with its 95% scene-clustered bootstrap CI; training loss: mean logged `train/diffusion` over the "
            f"{LOSS_WINDOW} steps before the checkpoint; attention split on verbose_2 (EMA weights).", "",
            "| base (a) | " + " | ".join(REPORTED) + " |", "|---|" + "---|" * len(REPORTED), f"| bound | {base_rates} |", "",
            "## Training lengths by the rule", "", "| kind | length | stopped learning | why |", "|---|---|---|---|"]
    text += [f"| {k} | {v.steps} | {'yes' if v.stopped else 'no'} | {v.reason} |" for k, v in lengths.items()]
    text += ["", "![bound share against training step](curves.png)", ""]
    for kind in kinds:
        text += [f"## {kind}", "", kind_table(records, kind, runs[kind].output_dir, splits), ""]
    text += [f"Evaluation: {evaluation_seconds / 60:.1f} min for {todo} of the {len(tasks)} evaluations (2 one-thread "
             f"processes; the others' images were there from an earlier run of this command)."
             if todo < len(tasks) else
             f"Evaluation: {evaluation_seconds / 60:.1f} min for the {len(tasks)} evaluations (2 one-thread processes)."]
    (out / "report.md").write_text("\n".join(text) + "\n")
    (out / "lengths.json").write_text(json.dumps({k: asdict(v) for k, v in lengths.items()}, indent=2) + "\n")
    with gzip.open(out / "results.json.gz", "wt") as handle:
        json.dump({"rule": RULE, "steps": STEPS, "lengths": {k: asdict(v) for k, v in lengths.items()},
                   "attention": {k: asdict(v) for k, v in splits.items()},
                   "records": [asdict(r) for r in records]}, handle)
    log(f"pilot report: {out / 'report.md'}")
    return out


def run(sweep_file: str, jobs: int = 2, log=print) -> Path:
    return run_study(study_command(MODULE, "run", sweep_file), sweep_file, lambda spec: evidence_data.write_data(spec, log=log),
                     lambda: report(sweep_file, jobs, log=log), jobs, log)

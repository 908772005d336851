"""The evidence experiment's report: tables, the differences plot, the sample grid, the replication section,
and ``report()``, which samples and scores finished runs and writes ``report.md`` and ``results.json``."""

from __future__ import annotations

import gzip
import json
import subprocess
import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional

from PIL import Image

from llm4gen.datamodules.synthetic import clip_tokenizer
from llm4gen.datamodules.synthetic import mentions_in_clip_window
from llm4gen.evaluation.grids import labelled_grid
from llm4gen.evaluation.paired import Difference
from llm4gen.evaluation.prompt_sets import prompt_set
from llm4gen.evaluation.runner import image_path
from llm4gen.experiments.evidence_data import attention_shares, caption_lengths, run_probe
from llm4gen.experiments.evidence_protocol import ARMS, PROTOCOL_SETTINGS, ROOT, Protocol
from llm4gen.experiments.evidence_rules import (
    SUBSETS,
    Check,
    compare,
    decisions,
    decisions_v4,
    fmt,
    gates,
    per_seed_rates,
    rate,
    select,
)
from llm4gen.experiments.evidence_tasks import ObjectRecord, Task, evaluation_tasks, object_records, run_tasks, swap_counts
from llm4gen.experiments.runner import ExperimentError
from llm4gen.launch.sweep import (
    load_experiment_config,
    load_sweep,
)


# ---------------------------------------------------------------- pictures


COMPARISONS = (  # (a, b, subset): what the plot and the table show, in order
    ("d", "b", "outside"), ("d", "b2", "outside"), ("b2", "b", "outside"), ("c", "b", "outside"),
    ("e", "b", "outside"), ("d_shuffled", "b", "outside"), ("d", "b", "inside"), ("d", "b", "seen_1"),
    ("d", "b", "post_nominal"), ("d", "b", "pre_nominal"), ("e", "d", "post_nominal"), ("d", "b", "heldout_2"),
    ("b", "a", "seen_1"), ("b", "a", "short"), ("b2", "a", "seen_1"), ("c", "a", "short"),
    # protocol v3's gated fusion (absent from v2's records: those rows are left out there)
    ("d_gated", "b", "outside"), ("d_gated", "d", "outside"), ("c_gated", "c", "outside"), ("d_gated", "b", "post_nominal"),
    ("c", "a", "seen_1"), ("c_gated", "a", "seen_1"), ("d_gated", "a", "seen_1"),
)
V4_COMPARISONS = (  # protocol v4: the rules' differences first, then what explains them
    ("c", "a", "outside"), ("c_shuffled", "a", "outside"), ("c", "a_chunked", "outside"), ("c", "a", "seen_1"),
    ("c", "a", "short"), ("c", "a", "post_nominal"), ("a_chunked", "a", "outside"), ("c", "a", "inside"),
    ("a_chunked", "a", "inside"), ("c", "a", "pre_nominal"),
)


def arm_tag(arm: str) -> str:
    """An arm's short name in the plot and the table: "(d)", "(b2)", and a variant of an arm after its letter:
    "(d shuffled)" for the ablation of (d), "(d gated)", "(a chunked)"."""
    letter, _, variant = arm.partition("_")
    return f"({letter} {variant})" if variant else ARMS[arm].split(" ")[0]


def protocol_commit(document: str) -> str:
    """The commit that last changed the protocol document (and whether it has changed since), as a report names it."""
    try:
        commit = subprocess.run(["git", "log", "-1", "--format=%h %cd", "--date=iso", "--", document], cwd=ROOT,
                                capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", document], cwd=ROOT, capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "no git history here"
    if not commit:
        return "not committed"
    return f"committed in {commit}" + ("; **changed since**" if dirty else "")


def difference_label(a: str, b: str, subset: str) -> str:
    return f"{arm_tag(a)} - {arm_tag(b)}, {subset}"


# Labels of results written before arm_tag: the shuffled-features ablation was shown as "(d)," (issue 20)
LEGACY_LABELS = {"(d), - (b), outside": difference_label("d_shuffled", "b", "outside")}


def read_results(path: Path) -> dict:
    """A report's ``results.json``, or the ``.json.gz`` it ships as."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as handle:
        return json.load(handle)


def replot(results: Path, out: Path, protocol: Protocol = PROTOCOL_SETTINGS) -> Path:
    """``differences.png`` again from a report's ``results.json`` (or .json.gz), labels as they are now."""
    differences = [(LEGACY_LABELS.get(label, label), Difference.from_dict(d))
                   for label, d in read_results(results)["differences"].items()]
    return difference_plot(differences, out, protocol)


def difference_plot(differences: list[tuple[str, Difference]], path: Path, protocol: Protocol = PROTOCOL_SETTINGS,
                    thresholds: Optional[list[tuple[float, str]]] = None) -> Path:
    """One row per paired difference with its CI; vertical lines at ``thresholds`` ((x, legend) pairs;
    default: this protocol's primary effect and its gate)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 0.38 * len(differences) + 1.2))
    for i, (label, diff) in enumerate(differences):
        y = len(differences) - 1 - i
        ax.errorbar(diff.mean, y, xerr=[[diff.mean - diff.low], [diff.high - diff.mean]], fmt="o", color="C0", capsize=3)
    ax.axvline(0, color="black", lw=0.8)
    if thresholds is None:
        thresholds = [(protocol.primary_effect, f"primary effect +{protocol.primary_effect}"),
                      (protocol.gate_base_drop, f"gate / keep {protocol.gate_base_drop}")]
    for i, (x, legend) in enumerate(thresholds):
        ax.axvline(x, color=f"C{2 + i}", lw=0.8, ls="--" if i % 2 == 0 else ":", label=legend)
    ax.set_yticks(range(len(differences)), [label for label, _ in reversed(differences)], fontsize=8)
    ax.set_xlabel("paired difference in the share of objects drawn bound (95% CI, scenes resampled)")
    ax.legend(fontsize=7, loc="best")  # where it hides no interval
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def prompt_label(record) -> str:
    """A grid row's label: a short prompt as it is; a verbose one as its objects and where CLIP sees them."""
    if record.phrasing != "verbose":
        return record.text
    objects = [f"{m['size']} {m['color']} {m['shape']} ({'in' if m['in_clip_window'] else 'OUT of'} CLIP's window)"
               for m in mentions_in_clip_window(record.text, clip_tokenizer())]
    return f"verbose, {len(record.text.split())} words: " + "; ".join(objects)


def sample_grid(tasks: list[Task], path: Path, seed: Optional[int] = None, protocol: Protocol = PROTOCOL_SETTINGS,
                labels: dict[str, str] = ARMS) -> Path:
    """Rows: prompts (short post-nominal ones, then verbose ones); columns: the arms at ``seed`` (by default the
    tasks' first seed, as the reports name it), in the order and under the names of ``labels``."""
    seed = min(t.seed for t in tasks) if seed is None else seed

    picks = [("phrased_2", i) for i in (1, 4, 6, 9)] + [("verbose_2", i) for i in range(4)] + [("verbose_3", i) for i in range(4)]
    records = {name: prompt_set(name, protocol.prompts(name), protocol.scene_draw) for name in {name for name, _ in picks}}
    picks = [(name, i) for name, i in picks if i < len(records[name])]
    by_arm = {t.arm: t for t in tasks if t.seed == seed}
    arms = [a for a in labels if a in by_arm]
    rows, row_labels = [], []
    for name, index in picks:
        row_labels.append(prompt_label(records[name][index]))
        row = []
        for arm in arms:
            file = image_path(Path(by_arm[arm].out), name, index, 0)
            row.append(Image.open(file).convert("RGB") if name in by_arm[arm].sets and file.is_file() else None)
        rows.append(row)
    labelled_grid(rows, row_labels, [labels[a] for a in arms]).save(path)
    return path


# ---------------------------------------------------------------- the report


CATEGORY_ORDER = ("bound", "wrong_size", "leaked_color", "leaked_shape", "foreign_color", "misdrawn_shape",
                  "missing_object")


def damages_base(records: list[ObjectRecord], arm: str, protocol: Protocol) -> Optional[bool]:
    """Protocol v3: the arm's seen_1 bound share more than ``protocol.damage`` below the base's (a)."""
    own, base = rate(select(records, arm, "seen_1")), rate(select(records, "a", "seen_1"))
    if protocol.damage is None or own is None or base is None or arm == "a":
        return None
    return own < base - protocol.damage


def rate_table(records: list[ObjectRecord], arms: list[str], subsets: list[str],
               protocol: Protocol = PROTOCOL_SETTINGS) -> str:
    damage = protocol.damage is not None
    lines = ["| arm | " + " | ".join(subsets) + (" | damages the base |" if damage else " |"),
             "|---|" + "---|" * (len(subsets) + damage)]
    for arm in arms:
        cells = []
        for subset in subsets:
            chosen = select(records, arm, subset)
            if not chosen:
                cells.append("-")
                continue
            seeds = per_seed_rates(chosen)
            cells.append(f"{rate(chosen):.3f} ({' / '.join(f'{v:.2f}' for v in seeds.values())})")
        if damage:
            damaged = damages_base(records, arm, protocol)
            cells.append("-" if damaged is None else ("**yes**" if damaged else "no"))
        lines.append(f"| {ARMS[arm]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def breakdown_table(records: list[ObjectRecord], arms: list[str], subset: str) -> str:
    lines = ["| arm | objects | " + " | ".join(CATEGORY_ORDER) + " |", "|---|---|" + "---|" * len(CATEGORY_ORDER)]
    for arm in arms:
        chosen = select(records, arm, subset)
        if chosen:
            lines.append(f"| {ARMS[arm]} | {len(chosen)} | " + " | ".join(f"{rate(chosen, c):.3f}" for c in CATEGORY_ORDER) + " |")
    return "\n".join(lines)


def report(sweep_file: str, jobs: int = 2, base: Optional[str] = None, log=print,
           protocol: Protocol = PROTOCOL_SETTINGS, replication: Optional[str] = None) -> Path:
    """Evaluates the finished runs, applies the protocol's gates and rules, writes the report; ``replication``:
    another study's report folder (or results.json) whose outcome is added as a section of this report."""
    spec = load_sweep(sweep_file)
    cfg = load_experiment_config(spec.config, spec.base_overrides)
    base = base or cfg.model.base.pretrained
    tasks, unfinished = evaluation_tasks(spec, base, protocol)
    if not any(t.arm != "a" for t in tasks):
        raise ExperimentError(f"no finished run under {spec.output_root}; train the arms first: "
                              f"python -m llm4gen.cli.shapes_evidence run {sweep_file} (or python sweep.py {sweep_file})")
    if unfinished:
        log(f"not finished, left out of the report: {', '.join(unfinished)}")
    started = time.time()
    evaluated = run_tasks(tasks, jobs, log, protocol)
    evaluation_seconds = time.time() - started
    records = [r for task in tasks for r in object_records(task, protocol)]
    out = spec.output_root / "report"
    out.mkdir(parents=True, exist_ok=True)
    probe = run_probe(spec, spec.output_root / "probe.json", log)
    _, truncated = caption_lengths(cfg, [], protocol)
    attention = attention_shares(tasks)
    v4 = protocol.rules == "v4"
    if v4:  # no gates: what v2's gates measured besides (b) is reported and guards nothing
        gate_checks = preconditions(truncated, attention)
        rules = decisions_v4(records, protocol)
    else:
        gate_checks = gates(records, probe, truncated, attention, protocol)
        rules = decisions(records, gate_checks, protocol)
    differences = [(difference_label(a, b, subset), diff) for a, b, subset in (V4_COMPARISONS if v4 else COMPARISONS)
                   if (diff := compare(records, a, b, subset)) is not None]
    thresholds = [(protocol.primary_effect, f"primary gain +{protocol.primary_effect}"),
                  (protocol.keep_inside, f"no damage {protocol.keep_inside}"),
                  (protocol.secondary_effect, f"secondary +{protocol.secondary_effect}")] if v4 else None
    plot = difference_plot(differences, out / "differences.png", protocol, thresholds)
    grid = sample_grid(tasks, out / "samples.png", protocol=protocol)
    arms = [a for a in ARMS if any(t.arm == a for t in tasks)]
    seeds = sorted({t.seed for t in tasks})
    swaps = {}
    for arm in arms:
        counts = [swap_counts(t, "phrased_2") for t in tasks if t.arm == arm and "phrased_2" in t.sets]
        if counts:
            drawn = sum(c[1] for c in counts)
            swaps[arm] = (sum(c[0] for c in counts) / drawn if drawn else None, drawn)
    text = "\n".join([
        f"# The miniature LLM4GEN experiment: {len(tasks)} evaluations", "",
        f"Protocol: `{protocol.document}` ({protocol_commit(protocol.document)}). Sweep `{sweep_file}`, base `{base}`, seeds {seeds}"
        f"{'' if not protocol.scene_draw else f', evaluation scenes of draw {protocol.scene_draw} (fresh)'}; DDIM "
        f"{protocol.sampling_steps} steps, guidance {protocol.guidance_scale}, one image per prompt, "
        f"every arm on the same noise per (prompt, seed). Share of prompt objects drawn with every attribute right "
        f"(`bound`), pooled over seeds (per seed in brackets).", "",
        "## Bound objects per arm", "", rate_table(records, arms, list(SUBSETS), protocol), "",
        "Subsets: " + "; ".join(f"`{k}`: {v[0]}" for k, v in SUBSETS.items()) + ".", "",
        "## What went wrong instead (shares of the subset's objects)", "",
        "### verbose prompts, objects past CLIP's window", "", breakdown_table(records, arms, "outside"), "",
        "### verbose prompts, objects inside CLIP's window", "", breakdown_table(records, arms, "inside"), "",
        "### short post-nominal prompts (colored, dense)", "", breakdown_table(records, arms, "post_nominal"), "",
        "Swap rate on phrased_2 (two objects, both drawn, each in the other's colour): " + ", ".join(
            f"{ARMS[a]} {v:.3f} of {n}" if v is not None else f"{ARMS[a]} -" for a, (v, n) in swaps.items()) + ".", "",
        "## Paired differences (95% CI over scenes, 2000 bootstrap resamples)", "",
        "| comparison | difference [CI] (per seed; objects, scenes) |", "|---|---|",
        *[f"| {label} | {fmt(diff)} |" for label, diff in differences], "",
        "## Preconditions (reported; protocol v4 has no gates)" if v4 else
        "## Gates (any failure makes the result inconclusive)", "",
        *[f"- {'PASS' if c.passed else ('FAIL' if c.passed is False else 'NOT MEASURED')}: {c.name}: {c.detail}"
          for c in gate_checks], "",
        "## Decision rules", "",
        *[line for name, rule in rules.items() for line in (
            f"**{name}: {rule['outcome']}** ({'; '.join(rule['because'])})" if v4 else
            f"**{name}: {rule['outcome']}** (with every gate guarding it, the literal probe gate included: "
            f"{rule['literal']})", "",
            *[f"- {'pass' if c['passed'] else 'fail'}: {c['name']}: {c['detail']}" for c in rule["checks"]], "")],
        f"Plot: `{plot.name}`. Samples (seed {seeds[0]}; a row per prompt, a column per arm): `{grid.name}`.",
        f"Evaluation (sampling and scoring, {len(tasks)} arm x seed tasks"
        f"{'' if evaluated == len(tasks) else f'; {evaluated} here, the others by an earlier invocation'}): "
        f"{evaluation_seconds / 60:.1f} min.", "",
        *(replication_section(Path(replication), protocol, rules) if replication else [])])
    (out / "report.md").write_text(text)
    (out / "results.json").write_text(json.dumps({
        "protocol": asdict(protocol), "probe": probe, "attention_share": attention,
        "damages_base": {a: damages_base(records, a, protocol) for a in arms},
        "gates": [asdict(c) for c in gate_checks], "decisions": rules,
        "differences": {label: diff.to_dict() for label, diff in differences},
        "swap_rate_phrased_2": {a: v for a, (v, _) in swaps.items()},
        "objects": [list(asdict(r).values()) for r in records], "object_fields": list(ObjectRecord.__dataclass_fields__),
    }, indent=1))
    log(text)
    log(f"report: {out / 'report.md'}")
    return out


def preconditions(truncated: int, attention: dict[str, dict[str, float]]) -> list[Check]:
    """What protocol v4 reports beside its rules and decides nothing by: every caption whole in the LLM's
    window (the data step refuses a study otherwise), and where the UNet's cross-attention goes."""
    return [Check("no caption truncated by the LLM", truncated == 0, f"{truncated} captions over max_length", ()),
            Check("cross-attention on CLIP / the CAM's tokens / LLM padding measured", bool(attention) or None,
                  ", ".join(f"{ARMS[a]} {v['clip']:.2f} / {v['llm']:.2f} / {v['padding']:.2f}"
                            for a, v in attention.items()) or "not measured", ())]


def load_object_records(path: Path) -> list[ObjectRecord]:
    """The per-object records a report's results.json (or .json.gz) holds."""
    results = read_results(path)
    fields = results["object_fields"]
    return [ObjectRecord(**dict(zip(fields, row))) for row in results["objects"]]


REPLICATED = (("d", "b", "outside"), ("d", "b2", "outside"), ("d", "b", "post_nominal"), ("d_gated", "b", "outside"),
              ("d_gated", "b", "post_nominal"), ("b", "a", "seen_1"))


def replicated(study: dict[str, dict], replication: dict[str, dict]) -> list[str]:
    """Per decision rule, whether the two studies reached the same outcome (the protocol's meaning of
    "replicated"); neither outcome is preferred when they differ."""
    lines = []
    for name, rule in study.items():
        first, second = rule["outcome"], replication[name]["outcome"]
        verdict = "the same outcome: **replicated**" if first == second else "**the two disagree**"
        lines.append(f"- {name}: this study {first}, the replication {second}: {verdict}")
    return lines


def replication_section(path: Path, protocol: Protocol = PROTOCOL_SETTINGS,
                        study_rules: Optional[dict[str, dict]] = None) -> list[str]:
    """A replication study's outcome (its report folder or results.json): rates, gates, rules, key differences,
    and, given this study's ``study_rules``, whether each rule's outcome replicated."""
    results_file = path / "results.json" if path.is_dir() else path
    results = read_results(results_file)
    records = load_object_records(results_file)
    arms = [a for a in ARMS if any(r.arm == a for r in records)]
    seeds = sorted({r.seed for r in records})
    draw = results["protocol"].get("scene_draw", 0)
    lines = [f"## Replication: seeds {seeds}, evaluation scenes of draw {draw} (`{results_file}`)", "",
             rate_table(records, arms, list(SUBSETS), protocol), "", "Gates:", ""]
    lines += [f"- {'PASS' if c['passed'] else ('FAIL' if c['passed'] is False else 'NOT MEASURED')}: {c['name']}: "
              f"{c['detail']}" for c in results["gates"]]
    lines += ["", "Rules: " + "; ".join(f"**{name}: {rule['outcome']}**" for name, rule in results["decisions"].items()),
              "", "| comparison | difference [CI] |", "|---|---|"]
    lines += [f"| {difference_label(a, b, subset)} | {fmt(diff)} |" for a, b, subset in REPLICATED
              if (diff := compare(records, a, b, subset)) is not None]
    if study_rules is not None:
        lines += ["", "Replicated? (the same outcome under the rules in both studies):", "",
                  *replicated(study_rules, results["decisions"])]
    return lines + [""]



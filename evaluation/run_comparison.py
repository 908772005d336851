"""Differences between evaluation runs that carry their uncertainty, from the per-image details each run wrote.

- ``paired_table(a, b)``: for every (set, metric) both runs scored whose per-image details reproduce the metric (a
  details field named like the metric, whose mean over images is the metric's value), the paired difference
  a - b over the images both runs drew with the same prompt and seed, and a 95% percentile bootstrap CI that
  resamples prompts (``evaluation.paired``: a prompt's images move together). A CI that excludes 0 is marked.
- ``fig6(runs, path)``: LLM4GEN's Fig. 6, aesthetic score against CLIP score, one point per run and set, with each
  axis' 95% bootstrap CI over prompts.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from llm4gen.evaluation.paired import Observation, cluster_bootstrap, paired_difference
from llm4gen.evaluation.report import DISPLAY_SCALE, read_run_record, save_figure

FIG6_Y = "aesthetic"
FIG6_X = ("clip_score_long", "clip_score")     # the long-prompt CLIP score where the run has it
MIN_PROMPTS_FOR_CI = 2   # resampling one prompt gives it back every time: no interval to speak of


def _field_for(metric: str, scorer: str, row: dict):
    """The details field that holds ``metric`` per image (shapes: ``binding`` for ``shapes_binding``; BLIP-VQA:
    ``score`` for ``blip_vqa``), or None."""
    for candidate in (metric, metric.removeprefix(f"{scorer}_"), "score" if metric == scorer else None):
        if candidate and isinstance(row.get(candidate), (int, float)) and not isinstance(row.get(candidate), bool):
            return candidate
    return None


def per_image_values(run_dir: str | Path) -> dict[tuple[str, str], dict[tuple[int, int], float]]:
    """(set, metric) -> {(prompt index, image index): value} for the metrics the details reproduce."""
    run_dir = Path(run_dir)
    _, scores, _ = read_run_record(run_dir)
    found: dict[tuple[str, str], dict[tuple[int, int], float]] = {}
    for path in sorted((run_dir / "details").glob("*.jsonl")):
        set_name, scorer = path.name[:-len(".jsonl")].rsplit(".", 1)
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        for metric, value in scores.get(set_name, {}).items():
            if value is None or not rows:
                continue
            field = _field_for(metric, scorer, rows[0])
            if field is None:
                continue
            values = {(r["prompt_index"], r["image_index"]): float(r[field]) for r in rows if field in r}
            if len(values) == len(rows) and abs(np.mean(list(values.values())) - value) <= 1e-6 * max(1, abs(value)):
                found[(set_name, metric)] = values
    return found


def _same_draws(a: Path, b: Path, set_name: str) -> bool:
    """Both runs sampled the set's prompts with the same seeds (prompts/<set>.json)."""
    read = lambda run: json.loads((run / "prompts" / f"{set_name}.json").read_text())  # noqa: E731
    try:
        pa, pb = read(a), read(b)
    except FileNotFoundError:
        return False
    seeds = lambda p: [(i["prompt_index"], i["image_index"], i["seed"]) for i in p["images"]]  # noqa: E731
    return pa["prompts"] == pb["prompts"] and seeds(pa) == seeds(pb)


def paired_rows(run_a: str | Path, run_b: str | Path, seed: int = 0) -> list[dict]:
    """One row per shared (set, metric): means of both runs, a - b and its CI, over the same draws."""
    run_a, run_b = Path(run_a), Path(run_b)
    values_a, values_b = per_image_values(run_a), per_image_values(run_b)
    rows = []
    for (set_name, metric), a in values_a.items():
        b = values_b.get((set_name, metric))
        if b is None or set(a) != set(b) or not _same_draws(run_a, run_b, set_name):
            continue
        observe = lambda values: [Observation((set_name, p, j), (set_name, p), 0, v)  # noqa: E731
                                  for (p, j), v in sorted(values.items())]
        d = paired_difference(observe(a), observe(b), seed=seed)
        interval = d.clusters >= MIN_PROMPTS_FOR_CI
        rows.append({"set": set_name, "metric": metric, "a": float(np.mean(list(a.values()))),
                     "b": float(np.mean(list(b.values()))), "difference": d.mean,
                     "low": d.low if interval else None, "high": d.high if interval else None,
                     "prompts": d.clusters, "images": d.n, "excludes_zero": interval and (d.low > 0 or d.high < 0)})
    return rows


def paired_markdown(rows: list[dict], label_a: str, label_b: str) -> str:
    lines = [f"Paired differences {label_a} - {label_b} (same prompts and seeds; 95% bootstrap CI over prompts; "
             f"* = the CI excludes 0)", "",
             f"| set | metric | {label_a} | {label_b} | difference | 95% CI | prompts |",
             "| --- | --- | ---: | ---: | ---: | --- | ---: |"]
    for r in rows:
        k = DISPLAY_SCALE.get(r["metric"], 1.0)
        # 4 significant digits: a difference far smaller than the values (a near-constant metric) still shows
        interval = (f"[{r['low'] * k:+.4g}, {r['high'] * k:+.4g}]" if r["low"] is not None
                    else f"none: {r['prompts']} prompt")
        lines.append(f"| {r['set']} | {r['metric']}{f' (x{k:g})' if k != 1 else ''} | {r['a'] * k:.4g} | "
                     f"{r['b'] * k:.4g} | {r['difference'] * k:+.4g}{' *' if r['excludes_zero'] else ''} | "
                     f"{interval} | {r['prompts']} |")
    if not rows:
        lines.append("| (none: no metric both runs scored on the same prompts and seeds with per-image details) |"
                     " | | | | | |")
    return "\n".join(lines)


def fig6_points(run_dirs: list[str | Path], seed: int = 0) -> list[dict]:
    """Per run and set holding both an aesthetic and a CLIP score: each mean with its bootstrap CI over prompts."""
    points = []
    for run_dir in run_dirs:
        label, _, _ = read_run_record(run_dir)
        values = per_image_values(run_dir)
        for (set_name, metric), y in values.items():
            if metric != FIG6_Y:
                continue
            x_metric = next((m for m in FIG6_X if (set_name, m) in values), None)
            if x_metric is None:
                continue
            point = {"run": label, "set": set_name, "x_metric": x_metric}
            for axis, data in (("x", values[(set_name, x_metric)]), ("y", y)):
                keys = sorted(data)
                point[axis], point[f"{axis}_low"], point[f"{axis}_high"] = cluster_bootstrap(
                    [data[k] for k in keys], [k[0] for k in keys], seed=seed)
            points.append(point)
    return points


def fig6(run_dirs: list[str | Path], path: str | Path) -> Path | None:
    """Aesthetic score against CLIP score (LLM4GEN's Fig. 6), one point per run and set with 95% CIs; None when no
    run has both."""
    points = fig6_points(run_dirs)
    if not points:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    runs = list(dict.fromkeys(p["run"] for p in points))
    sets = list(dict.fromkeys(p["set"] for p in points))
    for p in points:   # a colour per run, a marker per prompt set
        ax.errorbar(p["x"], p["y"], xerr=[[p["x"] - p["x_low"]], [p["x_high"] - p["x"]]],
                    yerr=[[p["y"] - p["y_low"]], [p["y_high"] - p["y"]]], fmt="osD^v"[sets.index(p["set"]) % 5],
                    color=f"C{runs.index(p['run'])}", capsize=4, markersize=7, label=f"{p['run']} ({p['set']})")
    x_metrics = sorted({p["x_metric"] for p in points})
    ax.set_xlabel(" / ".join(x_metrics) + " (CLIP score, 100 x cosine)")
    ax.set_ylabel("aesthetic score (LAION predictor)")
    ax.set_title("aesthetic vs CLIP score, 95% CI over prompts")
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    return save_figure(fig, path)

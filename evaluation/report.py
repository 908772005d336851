"""Tables and plots over evaluation runs: one markdown table (a row per run, a column per set and
metric) and a bar plot PNG with a panel per metric."""

from __future__ import annotations

import json
from pathlib import Path

# How a metric's value is shown: T2I-CompBench and the paper give BLIP-VQA x100.
DISPLAY_SCALE = {"blip_vqa": 100.0}
LOWER_IS_BETTER = {"fid"}


def columns(runs: dict[str, dict[str, dict[str, float]]]) -> list[tuple[str, str]]:
    """(set, metric) pairs in first-seen order over all runs."""
    seen: dict[tuple[str, str], None] = {}
    for scores in runs.values():
        for set_name, metrics in scores.items():
            for metric in metrics:
                seen[(set_name, metric)] = None
    return list(seen)


def header(set_name: str, metric: str) -> str:
    scale = DISPLAY_SCALE.get(metric)
    arrow = "↓" if metric in LOWER_IS_BETTER else "↑"
    return f"{set_name} {metric}{f' (x{scale:g})' if scale else ''} {arrow}"


def markdown_table(runs: dict[str, dict[str, dict[str, float]]]) -> str:
    cols = columns(runs)
    lines = ["| run | " + " | ".join(header(s, m) for s, m in cols) + " |",
             "| --- |" + " ---: |" * len(cols)]
    for label, scores in runs.items():
        cells = []
        for set_name, metric in cols:
            metrics = scores.get(set_name, {})
            value = metrics.get(metric)
            # blank: the run did not score it; "-": scored but undefined (JSON null, e.g. a swap rate
            # over images with no two objects drawn)
            cells.append(("-" if metric in metrics else "") if value is None
                         else f"{value * DISPLAY_SCALE.get(metric, 1.0):.2f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def read_run(run_dir: str | Path) -> tuple[str, dict[str, dict[str, float]]]:
    path = Path(run_dir) / "scores.json"
    if not path.is_file():
        raise FileNotFoundError(f"{str(run_dir)!r} has no scores.json: is it an evaluate.py output folder?")
    data = json.loads(path.read_text())
    return data.get("label") or Path(run_dir).name, data["scores"]


def bar_plot(runs: dict[str, dict[str, dict[str, float]]], path: str | Path) -> Path:
    """A panel per metric, a group of bars per prompt set, a bar per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = columns(runs)
    metrics = list(dict.fromkeys(m for _, m in cols))
    fig, axes = plt.subplots(1, len(metrics), figsize=(max(4.0, 3.0 + 1.2 * len(cols)), 3.6), squeeze=False)
    width = 0.8 / max(1, len(runs))
    for ax, metric in zip(axes[0], metrics):
        sets = [s for s, m in cols if m == metric]
        for k, (label, scores) in enumerate(runs.items()):
            values = [scores.get(s, {}).get(metric) for s in sets]  # None (absent or null): no bar
            values = [float("nan") if v is None else v * DISPLAY_SCALE.get(metric, 1.0) for v in values]
            ax.bar([i + k * width for i in range(len(sets))], values, width, label=label)
        ax.set_xticks([i + width * (len(runs) - 1) / 2 for i in range(len(sets))], sets)
        ax.set_title(header("", metric).strip())
    axes[0][0].legend(fontsize="small")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def compare(run_dirs: list[str | Path], out: str | Path) -> tuple[Path, Path]:
    """``<out>/compare.md`` and ``<out>/compare.png`` over the runs' scores.json."""
    runs: dict[str, dict] = {}
    for run_dir in run_dirs:
        label, scores = read_run(run_dir)
        if label in runs:
            label = str(run_dir)
        runs[label] = scores
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    table = out / "compare.md"
    table.write_text(markdown_table(runs) + "\n")
    return table, bar_plot(runs, out / "compare.png")

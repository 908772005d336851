"""Tables and plots over evaluation runs: one markdown table (a row per run, a column per set and
metric) and a bar plot PNG with a panel per metric."""

from __future__ import annotations

import json
from pathlib import Path

# How a metric's value is shown: T2I-CompBench and the paper give BLIP-VQA x100, ELLA's table DPG-Bench x100.
DISPLAY_SCALE = {"blip_vqa": 100.0, **{f"{vqa}_{column}": 100.0 for vqa in ("dpg", "dpg_blip", "dpg_shapes")
                                     for column in ("score", "global", "entity", "attribute", "relation", "other")}}
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
    label, scores, _ = read_run_record(run_dir)
    return label, scores


def read_run_record(run_dir: str | Path) -> tuple[str, dict[str, dict[str, float]], dict | None]:
    """(label, scores, protocol record or None for a run written before records existed)."""
    path = Path(run_dir) / "scores.json"
    if not path.is_file():
        raise FileNotFoundError(f"{str(run_dir)!r} has no scores.json: is it an evaluate.py output folder?")
    data = json.loads(path.read_text())
    return data.get("label") or Path(run_dir).name, data["scores"], data.get("protocol")


# Fields that differ between the runs of one table by design: what was evaluated, and the code's version.
PER_RUN_FIELDS = ("sampler", "code")


def _flatten(record: dict, prefix: str = "") -> dict[str, object]:
    flat = {}
    for key, value in record.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def protocol_differences(records: dict[str, dict | None]) -> list[str]:
    """The protocol fields on which the runs differ, as "field: run=value, ..." (per-run fields aside)."""
    flat = {label: _flatten({k: v for k, v in (r or {}).items() if k not in PER_RUN_FIELDS})
            for label, r in records.items()}
    fields = sorted(set().union(*flat.values())) if flat else []
    differences = []
    for field_name in fields:
        values = {label: f.get(field_name, "(not recorded)") for label, f in flat.items()}
        if len({json.dumps(v, sort_keys=True, default=str) for v in values.values()}) > 1:
            differences.append(f"{field_name}: " + ", ".join(f"{label}={v}" for label, v in values.items()))
    return differences


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
    return save_figure(fig, path)


def save_figure(fig, path: str | Path) -> Path:
    """A matplotlib figure written as a PNG (its folder made), then closed."""
    import matplotlib.pyplot as plt  # optional: the [eval] extra

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


class MixedProtocols(ValueError):
    pass


def compare(run_dirs: list[str | Path], out: str | Path, allow_mixed_protocols: bool = False) -> tuple[Path, Path]:
    """``<out>/compare.md`` and ``<out>/compare.png`` over the runs' scores.json. Runs measured under
    different protocols (prompt files, parser, scorer options, generation settings) are refused unless
    ``allow_mixed_protocols``."""
    runs: dict[str, dict] = {}
    records: dict[str, dict | None] = {}
    for run_dir in run_dirs:
        label, scores, record = read_run_record(run_dir)
        if label in runs:
            label = str(run_dir)
        runs[label], records[label] = scores, record
    differences = protocol_differences(records)
    if differences and not allow_mixed_protocols:
        shown = "; ".join(differences[:6]) + ("; ..." if len(differences) > 6 else "")
        raise MixedProtocols(f"these runs were measured under different protocols, so their numbers do not belong "
                             f"in one table: {shown}. Re-run them under one protocol, or pass "
                             f"--allow-mixed-protocols to compare anyway.")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    table = out / "compare.md"
    table.write_text(markdown_table(runs) + "\n")
    return table, bar_plot(runs, out / "compare.png")

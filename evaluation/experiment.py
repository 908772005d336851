"""The miniature LLM4GEN experiment on the shapes benchmark: five arms x three seeds, one report.

    python -m evaluation.experiment run configs/sweeps/shapes_binding.yaml      # data, sweep, report
    python -m evaluation.experiment data configs/sweeps/shapes_binding.yaml     # only the shared shards
    python -m evaluation.experiment report configs/sweeps/shapes_binding.yaml   # evaluate finished runs

The arms (paper: LLM4GEN vs the SD1.5 fine-tuned control), all on the experiment config's base (meant
to be a base pretrained on the shapes world by ``embedded/pretrain.py``; set ``model.base.pretrained``),
the same shards and the same number of steps:

    (a) base                   the pretrained base alone, no training
    (b) UNet ft                the UNet fine-tuned on CLIP alone (``model.adapter.enabled=false``)
    (c) CAM                    CAM + MiniLM, UNet frozen
    (d) CAM + UNet ft          CAM + MiniLM, UNet fine-tuned (the released model tuned its UNet)
    (e) CAM + UNet ft + entity (d) with the entity-guided loss

Training goes through ``sweep.py`` (``run`` calls ``python sweep.py SWEEP --jobs 2``; on a cluster
``data``, then ``sweep.py SWEEP --slurm``); arms b-e are the sweep's runs, told apart by their resolved ``config.yaml``. ``report``
evaluates (a) with the base and every finished run's ``last.ckpt`` on the six fixed prompt sets
(seen / held-out colour-shape pairs x 1-3 objects, 48 prompts each, one image per prompt; the image
seeds are the sets' own seeds plus the run's seed, so the spread over seeds includes sampling noise,
also for (a)), and writes ``<output_root>/report/``: ``report.md`` (mean +- std over seeds of the
binding score per set, and per attribute category on each split), ``binding.png`` (bar plot with
std error bars), ``grid_<arm>.png`` (seed 0's images, a row per prompt set) and ``results.json``.
Images already generated are kept, so a report run again only scores.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from configs.errors import UserError, entry_point

SETS = ("seen_1", "seen_2", "seen_3", "heldout_1", "heldout_2", "heldout_3")
CATEGORIES = ("color", "shape", "size")
ARMS = {
    "a": "(a) base",
    "b": "(b) UNet ft",
    "c": "(c) CAM",
    "d": "(d) CAM + UNet ft",
    "e": "(e) CAM + UNet ft + entity",
}
DATA_SAMPLES = 4096
DATA_SEED = 0
SAMPLING = dict(steps=20, guidance_scale=5.0)


class ExperimentError(UserError, ValueError):
    """The sweep cannot be reported (no finished run, runs of an unknown arm)."""


def arm_of(model: dict) -> str:
    """The arm letter of a resolved ``model`` config section (see the module docstring)."""
    if not model["adapter"].get("enabled", True):
        return "b"
    if model["unet_training"] == "frozen":
        return "c"
    return "e" if model["objective"]["lambda_entity"] > 0 else "d"


@dataclass
class Evaluated:
    arm: str
    seed: int
    eval_dir: Path
    scores: dict  # set -> {metric: value}


# ---------------------------------------------------------------- steps


def write_data(spec) -> Path:
    """The shards every run of the sweep trains on, written once from a fixed seed."""
    from datamodules.synthetic import ensure_synthetic_shards
    from launch.sweep import load_experiment_config

    cfg = load_experiment_config(spec.config, spec.base_overrides)
    shards = Path(cfg.data.shards)
    ensure_synthetic_shards(str(shards), num_samples=DATA_SAMPLES, resolution=cfg.data.resolution, seed=DATA_SEED)
    return shards


def evaluate_one(out: Path, seed: int, checkpoint: Optional[Path] = None, base: Optional[str] = None,
                 limit: Optional[int] = None, steps: int = SAMPLING["steps"]) -> dict:
    import evaluate

    argv = ["--output-dir", str(out), "--shapes", "all", "--scorers", "shapes", "--images-per-prompt", "1",
            "--seed", str(seed), "--steps", str(steps), "--guidance-scale", str(SAMPLING["guidance_scale"]),
            "--batch-size", "48", "--no-progress"]
    argv += ["--shapes-limit", str(limit)] if limit else []
    argv += ["--checkpoint", str(checkpoint)] if checkpoint else ["--base", base]
    if not (out / "scores.json").is_file():
        code = evaluate.main(argv)
        if code:
            raise ExperimentError(f"evaluate.py {' '.join(argv)} failed (exit {code})")
    return json.loads((out / "scores.json").read_text())["scores"]


def evaluate_all(spec, base: str, seeds: list[int], **options) -> list[Evaluated]:
    from omegaconf import OmegaConf

    from launch.sweep import expand_runs, is_finished

    results = []
    for seed in seeds:
        out = spec.output_root / f"base_seed={seed}" / "eval"
        results.append(Evaluated("a", seed, out, evaluate_one(out, seed, base=base, **options)))
    unfinished = []
    for run in expand_runs(spec):
        if not is_finished(run):
            unfinished.append(run.name)
            continue
        cfg = OmegaConf.to_container(OmegaConf.load(run.output_dir / "config.yaml"), resolve=True)
        out = run.output_dir / "eval"
        scores = evaluate_one(out, cfg["seed"], checkpoint=run.output_dir / "checkpoints" / "last.ckpt", **options)
        results.append(Evaluated(arm_of(cfg["model"]), cfg["seed"], out, scores))
    if unfinished:
        print(f"not finished, left out of the report: {', '.join(unfinished)}", file=sys.stderr)
    return results


# ---------------------------------------------------------------- statistics and tables (pure)


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def summarize(results: list[Evaluated], metric: str = "shapes_binding") -> dict[str, dict[str, tuple[float, float, int]]]:
    """arm -> set -> (mean, std, seeds) of ``metric``."""
    table: dict[str, dict[str, tuple[float, float, int]]] = {}
    for arm in ARMS:
        runs = [r for r in results if r.arm == arm]
        if runs:
            table[arm] = {}
            for name in SETS:
                values = [r.scores[name][metric] for r in runs if name in r.scores]
                table[arm][name] = (*mean_std(values), len(values))
    return table


def split_categories(results: list[Evaluated]) -> dict[str, dict[str, tuple[float, float, int]]]:
    """arm -> '<split> <category>' -> (mean, std, seeds): a split's score is the mean of its three sets
    (48 images each), per seed, before the statistics over seeds."""
    table: dict[str, dict[str, tuple[float, float, int]]] = {}
    for arm in ARMS:
        runs = [r for r in results if r.arm == arm]
        if not runs:
            continue
        table[arm] = {}
        for split in ("seen", "heldout"):
            names = [f"{split}_{n}" for n in (1, 2, 3)]
            for category in CATEGORIES:
                per_seed = [sum(r.scores[n][f"shapes_{category}"] for n in names) / len(names) for r in runs]
                table[arm][f"{split} {category}"] = (*mean_std(per_seed), len(per_seed))
    return table


def markdown(table: dict[str, dict[str, tuple[float, float, int]]]) -> str:
    columns = list(next(iter(table.values())))
    lines = ["| arm | seeds | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
    for arm, row in table.items():
        seeds = max(n for _, _, n in row.values())
        lines.append(f"| {ARMS[arm]} | {seeds} | " + " | ".join(f"{m:.3f} ± {s:.3f}" for m, s, _ in row.values()) + " |")
    return "\n".join(lines)


def comparisons(table: dict[str, dict[str, tuple[float, float, int]]]) -> list[str]:
    """The issue's question, per held-out multi-object set: does (d) / (e) beat (b) by more than the
    seed spread (the larger of the two standard deviations)?"""
    lines = []
    if "b" not in table:
        return lines
    for arm in ("d", "e"):
        if arm not in table:
            continue
        for name in ("heldout_2", "heldout_3"):
            (mb, sb, _), (ma, sa, _) = table["b"][name], table[arm][name]
            spread = max(sb, sa)
            verdict = "beats" if ma - mb > spread else ("loses to" if mb - ma > spread else "is within the seed spread of")
            lines.append(f"- {ARMS[arm]} {verdict} (b) on {name}: {ma:.3f} vs {mb:.3f} "
                         f"(difference {ma - mb:+.3f}, spread {spread:.3f})")
    return lines


# ---------------------------------------------------------------- pictures


def bar_plot(table: dict[str, dict[str, tuple[float, float, int]]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 3.8))
    width = 0.8 / len(table)
    for k, (arm, row) in enumerate(table.items()):
        means = [row[s][0] for s in SETS]
        stds = [row[s][1] for s in SETS]
        ax.bar([i + k * width for i in range(len(SETS))], means, width, yerr=stds, capsize=2, label=ARMS[arm])
    ax.set_xticks([i + width * (len(table) - 1) / 2 for i in range(len(SETS))], SETS)
    ax.set_ylabel("binding (mean ± std over seeds)")
    ax.set_ylim(0, 1)
    ax.set_title("shapes benchmark: objects drawn with every attribute right")
    ax.legend(fontsize="small", ncols=3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def sample_grid(eval_dir: Path, path: Path, per_set: int = 12, scale: int = 2) -> Path:
    """A row per prompt set (seen_1 .. heldout_3), its first ``per_set`` prompts' images, ``scale`` x larger."""
    from PIL import Image

    from evaluation.runner import image_path
    from lightning_modules.callbacks import image_grid

    images = []
    for name in SETS:
        for i in range(per_set):
            with Image.open(image_path(eval_dir, name, i, 0)) as image:
                images.append(image.convert("RGB").resize((image.width * scale, image.height * scale), Image.NEAREST))
    image_grid(images, columns=per_set).save(path)
    return path


# ---------------------------------------------------------------- the report


def report(sweep_file: str, base: Optional[str] = None, limit: Optional[int] = None,
           steps: int = SAMPLING["steps"]) -> Path:
    from launch.sweep import load_experiment_config, load_sweep

    spec = load_sweep(sweep_file)
    cfg = load_experiment_config(spec.config, spec.base_overrides)
    base = base or cfg.model.base.pretrained
    seeds = sorted({int(v) for v in spec.grid.get("seed", [cfg.seed])})
    results = evaluate_all(spec, base, seeds, limit=limit, steps=steps)
    if not any(r.arm != "a" for r in results):
        raise ExperimentError(f"no finished run under {spec.output_root}; train the arms first: python sweep.py {sweep_file}")
    out = spec.output_root / "report"
    out.mkdir(parents=True, exist_ok=True)
    binding = summarize(results)
    categories = split_categories(results)
    plot = bar_plot(binding, out / "binding.png")
    grids = {}
    for arm in binding:
        first = min((r for r in results if r.arm == arm), key=lambda r: r.seed)
        grids[arm] = sample_grid(first.eval_dir, out / f"grid_{arm}.png", per_set=min(12, limit or 12))
    verdicts = comparisons(binding)
    text = "\n".join([
        f"# Shapes benchmark: {len(results)} evaluations ({', '.join(ARMS[a] for a in binding)})", "",
        f"Sweep `{sweep_file}`, base `{base}`; {SAMPLING['steps']} DDIM steps, guidance {SAMPLING['guidance_scale']}, "
        f"one image per prompt, {limit or 48} prompts per set; mean ± std over seeds {seeds}.", "",
        "## Binding (every attribute of an object right, per object, per image)", "", markdown(binding), "",
        "## Per attribute category, mean of the split's 1-, 2- and 3-object sets", "",
        "colour: object found in its colour and shape; shape: its shape; size: its shape and size.", "",
        markdown(categories), "",
        "## Held-out two- and three-object binding: LLM arms against (b)", "", *verdicts, "",
        f"Plot: `{plot.name}`. Sample grids (seed {seeds[0]}, rows seen_1 .. heldout_3): "
        + ", ".join(f"`{p.name}`" for p in grids.values()), ""])
    (out / "report.md").write_text(text)
    (out / "results.json").write_text(json.dumps(
        {"binding": binding, "categories": categories,
         "runs": [{"arm": r.arm, "seed": r.seed, "eval_dir": str(r.eval_dir), "scores": r.scores} for r in results]},
        indent=2))
    print(text)
    print(f"report: {out / 'report.md'}")
    return out


def run(sweep_file: str, jobs: int = 2) -> Path:
    from launch.sweep import load_sweep

    spec = load_sweep(sweep_file)
    print(f"data: {write_data(spec)}")
    root = Path(__file__).resolve().parent.parent
    code = subprocess.call([sys.executable, str(root / "sweep.py"), sweep_file, "--jobs", str(jobs)])
    if code != 0:
        raise ExperimentError(f"sweep.py {sweep_file} failed (exit {code}); run it again to resume the unfinished runs")
    return report(sweep_file)


@entry_point("python -m evaluation.experiment")
def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m evaluation.experiment", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("run", "data", "report"))
    parser.add_argument("sweep", help="the sweep file, e.g. configs/sweeps/shapes_binding.yaml")
    parser.add_argument("--base", help="report: evaluate this base for arm (a) (default: the config's)")
    parser.add_argument("--limit", type=int, default=None, help="report: prompts per set (default: all 48)")
    parser.add_argument("--steps", type=int, default=SAMPLING["steps"], help="report: sampling steps")
    parser.add_argument("--jobs", type=int, default=2, help="run: training runs at a time (sweep.py --jobs; "
                                                            "2 single-thread runs use 2 cores best)")
    args = parser.parse_args(argv)
    if args.command == "data":
        from launch.sweep import load_sweep

        print(f"data: {write_data(load_sweep(args.sweep))}")
    elif args.command == "report":
        report(args.sweep, args.base, args.limit, args.steps)
    else:
        run(args.sweep, args.jobs)
    return 0


if __name__ == "__main__":
    sys.exit(main())

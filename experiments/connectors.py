"""The connector comparison (issue 21; protocol: docs/connectors/protocol.md).

    python -m llm4gen.cli.connectors run configs/sweeps/connectors.yaml      # data, runs, report
    python -m llm4gen.cli.connectors report configs/sweeps/connectors.yaml   # the report alone
    python -m llm4gen.cli.connectors run configs/sweeps/connectors_lora.yaml # the UNet-LoRA variant

Each kind of ``model.adapter.kind`` (cam, mlp, lavi_bridge, ella) trains on the evidence experiment's data
and recipe, at each seed, with the UNet frozen (connectors.yaml) or with LoRA in it (connectors_lora.yaml,
arms named ``kind+lora``); every arm and the base (a) are sampled on the evidence protocol's prompt sets
with the same noise, scored per object by the shapes analyzer, and compared with the sweep's CAM arm by
paired, scene-clustered bootstrap differences. The decision rules are the protocols', in :func:`classify`,
:func:`ella_ablation` and (the LoRA variant against the shipped frozen records) :func:`lora_effects`. The data step, the sampling and the per-object records are the
evidence experiment's own functions (llm4gen.experiments.shapes_evidence).
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from llm4gen.configs.choices import CONNECTOR_KINDS
from llm4gen.datamodules.batch import Batch
from llm4gen.evaluation.paired import Difference
from llm4gen.experiments import evidence_data, evidence_protocol, evidence_report, evidence_rules, evidence_tasks
from llm4gen.experiments.runner import ExperimentError, finished_runs, run_study, study_command
from llm4gen.launch.sweep import load_experiment_config, load_sweep
from llm4gen.lightning_modules.sampler import load_checkpoint_module

MODULE = "llm4gen.cli.connectors"  # the command line
PROTOCOLS = {"": "docs/connectors/protocol.md", "+lora": "docs/connectors/protocol_lora.md"}  # by variant
UNET = {"": "UNet frozen", "+lora": "LoRA in the UNet"}
FROZEN_RESULTS = evidence_protocol.ROOT / "docs" / "connectors" / "results.json.gz"  # the frozen variant's records
SUBSETS = ("seen_1", "short", "outside", "inside")
LABELS = {"a": "(a) base", "cam": "cam (LLM4GEN)", "mlp": "mlp", "lavi_bridge": "lavi_bridge", "ella": "ella"}


@dataclass(frozen=True)
class Rules:
    """The protocol's thresholds."""
    effect: float = 0.03         # |difference| at least this, with its CI clear of 0
    damage: float = 0.10         # an arm's seen_1 more than this below the base's: it damages the base


RULES = Rules()
RULES_V3 = Rules(damage=0.03)  # protocol v3 (docs/evidence/protocol_v3.md): 0.03 below the base damages it
V3_DOCUMENT = "docs/evidence/protocol_v3.md"


def arm_of(model: dict) -> str:
    kind = model["adapter"].get("kind", "cam")
    return kind if model["unet_training"] == "frozen" else f"{kind}+{model['unet_training']}"


def split_arm(arm: str) -> tuple[str, str]:
    """``"ella+lora"`` -> (``"ella"``, ``"+lora"``); ``"cam"`` -> (``"cam"``, ``""``)."""
    kind, plus, training = arm.partition("+")
    return kind, plus + training


def sweep_arms(arms) -> tuple[list[str], str]:
    """The sweep's arms in a fixed order (the base, then CONNECTOR_KINDS') and the variant they share:
    ``""`` (UNet frozen) or ``"+lora"``. One report reads one variant: a mix is refused."""
    variants = {split_arm(a)[1] for a in arms if a != "a"}
    if len(variants) > 1:
        raise ExperimentError(f"one sweep, one UNet variant: these arms mix {sorted(variants)} "
                                       f"({sorted(set(arms))}); report the frozen and LoRA sweeps apart")
    variant = variants.pop() if variants else ""
    if variant not in PROTOCOLS:
        raise ExperimentError(f"no connector protocol for the variant {variant!r}; "
                                       f"the comparison runs {sorted(PROTOCOLS)}")
    order = ["a", *(kind + variant for kind in CONNECTOR_KINDS)]
    return [a for a in order if a in set(arms)], variant


def label(arm: str) -> str:
    kind, variant = split_arm(arm)
    return LABELS.get(kind, kind) + variant


def evaluation_tasks(spec, base: str) -> tuple[list[evidence_tasks.Task], list[str]]:
    """Every finished run's last checkpoint, and the base at each of their seeds."""
    tasks, seeds = [], set()
    finished, unfinished = finished_runs(spec)
    for run, cfg in finished:
        arm, seed = arm_of(cfg["model"]), int(cfg["seed"])
        seeds.add(seed)
        tasks.append(evidence_tasks.Task(arm, seed, str(run.output_dir / "eval" / arm), evidence_protocol.SETS,
                                   checkpoint=str(run.output_dir / "checkpoints" / "last.ckpt")))
    tasks += evidence_tasks.base_tasks(spec, seeds, base)
    return sorted(tasks, key=lambda t: (t.seed, t.arm)), unfinished


# ---------------------------------------------------------------- the decision rules (pure)


def classify(diff: Optional[Difference], rules: Rules = RULES) -> str:
    """better / worse / no difference shown, by the protocol's rule; "not measured" without a difference."""
    if diff is None:
        return "not measured"
    if diff.mean >= rules.effect and diff.low > 0:
        return "better"
    if diff.mean <= -rules.effect and diff.high < 0:
        return "worse"
    return "no difference shown"


def damages_base(records, arm: str, rules: Rules = RULES) -> Optional[bool]:
    own, base = evidence_rules.rate(evidence_rules.select(records, arm, "seen_1")), evidence_rules.rate(evidence_rules.select(records, "a", "seen_1"))
    return None if own is None or base is None else own < base - rules.damage


def verdicts(records, arms: list[str], rules: Rules = RULES, reference: str = "cam") -> dict[str, dict[str, dict]]:
    """arm -> subset -> {difference vs ``reference``, class}; an arm that damages the base is never "better"."""
    out = {}
    for arm in arms:
        if arm in ("a", reference):
            continue
        damaged = damages_base(records, arm, rules)
        out[arm] = {}
        for subset in SUBSETS:
            diff = evidence_rules.compare(records, arm, reference, subset)
            label = classify(diff, rules)
            if label == "better" and damaged:
                label = "better, but it damages the base (not called better)"
            out[arm][subset] = {"difference": diff.to_dict() if diff else None, "class": label}
    return out


def ella_ablation(records, rules: Rules = RULES, variant: str = "") -> dict:
    """ELLA's MLP -> timestep-aware resampler ablation, on short prompts: replicates / contradicted / not decided."""
    ella, mlp = "ella" + variant, "mlp" + variant
    diff = evidence_rules.compare(records, ella, mlp, "short")
    if diff is None:
        return {"outcome": "not measured"}
    damaged = [arm for arm in (ella, mlp) if damages_base(records, arm, rules)]
    if diff.mean >= rules.effect and diff.low > 0 and not damaged:
        outcome = "replicates"
    elif diff.mean <= -rules.effect and diff.high < 0:
        outcome = "contradicted"
    else:
        verb = "damage" if len(damaged) > 1 else "damages"
        outcome = "not decided" + (f" ({' and '.join(damaged)} {verb} the base)" if damaged else "")
    return {"outcome": outcome, "difference": diff.to_dict()}


def base_agrees(records, frozen_records) -> Optional[str]:
    """None when the base (a) drew, object for object, what it drew in the frozen run (so the two runs' arms
    pair on the same draws); else why not."""
    def outcomes(rs):
        return {(r.seed, r.set, r.prompt, r.object): r.category for r in rs if r.arm == "a"}
    here, there = outcomes(records), outcomes(frozen_records)
    if not here or not there:
        return "a run holds no base records"
    if here.keys() != there.keys():
        return f"the runs sampled different prompts or seeds ({len(here)} vs {len(there)} base objects)"
    differ = sum(here[k] != there[k] for k in here)
    return f"the base's outcome differs on {differ} of {len(here)} objects" if differ else None


def lora_effects(records, frozen_records, arms: list[str], rules: Rules = RULES) -> dict:
    """protocol_lora.md rule 4: (kind+lora) - (kind, frozen) per subset, paired with the frozen run's
    records, classed by rule 1's thresholds; "not measured" unless the base agrees object for object."""
    disagreement = base_agrees(records, frozen_records)
    if disagreement:
        return {"outcome": "not measured", "reason": disagreement}
    words = {"better": "LoRA helps", "worse": "LoRA hurts"}
    by_kind = {}
    for arm in arms:
        kind, variant = split_arm(arm)
        if arm == "a" or not variant:
            continue
        pooled = [r for r in records if r.arm == arm] + [r for r in frozen_records if r.arm == kind]
        by_kind[kind] = {}
        for subset in SUBSETS:
            diff = evidence_rules.compare(pooled, arm, kind, subset)
            label = classify(diff, rules)
            by_kind[kind][subset] = {"difference": diff.to_dict() if diff else None, "class": words.get(label, label)}
    return {"outcome": "measured", "by_kind": by_kind}


load_records = evidence_report.load_object_records  # the per-object records of a report's results.json (gzipped or not)


# ---------------------------------------------------------------- size and speed


def connector_size_and_step_time(checkpoint: str, batch_size: int = 16, warmup: int = 2, steps: int = 5) -> dict:
    """Trainable parameters and the median wall time of one training step (forward, backward, AdamW) of a
    run's module on a synthetic batch of its resolution, one thread."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each evaluation worker runs; restored for the caller
    try:
        return _size_and_step_time(checkpoint, batch_size, warmup, steps)
    finally:
        torch.set_num_threads(threads)


def _size_and_step_time(checkpoint: str, batch_size: int, warmup: int, steps: int) -> dict:
    import torch

    module = load_checkpoint_module(checkpoint)
    module.train()
    params = module.trainable_parameters()
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    size = module.unet.config.sample_size * 2 ** (len(module.vae.config.block_out_channels) - 1)
    g = torch.Generator().manual_seed(0)
    batch = Batch(captions=["a small red circle and a large blue square on a white background"] * batch_size,
                  pixel_values=torch.rand(batch_size, 3, size, size, generator=g) * 2 - 1)
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        terms = module.compute_losses(batch, generator=torch.Generator().manual_seed(i))
        optimizer.zero_grad(set_to_none=True)
        terms.diffusion.backward()
        optimizer.step()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    connector = sum(p.numel() for p in module.adapter.parameters() if p.requires_grad)
    return {"params": sum(p.numel() for p in params), "connector_params": connector,
            "step_seconds": statistics.median(times)}


# ---------------------------------------------------------------- the report


def difference_cell(diff: Optional[dict], label: str) -> str:
    if diff is None:
        return "-"
    return f"{diff['mean']:+.3f} [{diff['low']:+.3f}, {diff['high']:+.3f}] {label}".rstrip()


def report(sweep_file: str, jobs: int = 2, log=print, protocol: evidence_protocol.Protocol = evidence_protocol.PROTOCOL_SETTINGS,
           frozen_results: Optional[Path] = FROZEN_RESULTS, v3: bool = False) -> Path:
    """Evaluates every finished run and the base, applies the variant's protocol and writes ``report/``
    (report.md, results.json, differences.png, samples.png). A LoRA sweep is also paired with the frozen
    variant's records in ``frozen_results`` (protocol_lora.md, rule 4)."""
    spec = load_sweep(sweep_file)
    cfg = load_experiment_config(spec.config, spec.base_overrides)
    tasks, unfinished = evaluation_tasks(spec, cfg.model.base.pretrained)
    if not any(t.arm != "a" for t in tasks):
        raise ExperimentError(f"no finished run under {spec.output_root}; train the arms first: "
                                       f"python -m llm4gen.cli.connectors run {sweep_file}")
    arms, variant = sweep_arms([t.arm for t in tasks])
    reference = "cam" + variant
    thresholds, document = (RULES_V3, V3_DOCUMENT) if v3 else (RULES, PROTOCOLS[variant])
    if unfinished:
        log(f"not finished, left out of the report: {', '.join(unfinished)}")
    started = time.time()
    evidence_tasks.run_tasks(tasks, jobs, log, protocol)
    evaluation_seconds = time.time() - started
    records = [r for task in tasks for r in evidence_tasks.object_records(task, protocol)]
    seeds = sorted({t.seed for t in tasks})
    rules = verdicts(records, arms, thresholds, reference=reference)
    ablation = ella_ablation(records, thresholds, variant=variant)
    effects = None
    if variant:
        effects = (lora_effects(records, load_records(Path(frozen_results)), arms)
                   if frozen_results is not None and Path(frozen_results).exists()
                   else {"outcome": "not measured", "reason": f"no frozen-variant records at {frozen_results}"})
    sizes = {}
    for arm in arms:
        if arm != "a":
            checkpoint = next(t.checkpoint for t in tasks if t.arm == arm)
            sizes[arm] = connector_size_and_step_time(checkpoint)
            log(f"  {arm}: {sizes[arm]['params']:,} parameters, {sizes[arm]['step_seconds']:.2f} s per step")
    out = spec.output_root / "report"
    out.mkdir(parents=True, exist_ok=True)
    plot = difference_plot(rules, effects, reference, out / "differences.png")
    grid = evidence_report.sample_grid(tasks, out / "samples.png", protocol=protocol, labels={a: label(a) for a in arms})
    damage = {arm: damages_base(records, arm, thresholds) for arm in arms if arm != "a"}
    text = "\n".join([
        f"# Connector comparison ({UNET[variant]}): {len(tasks)} evaluations", "",
        f"Protocol: `{document}`. Sweep `{sweep_file}`, seeds {seeds}, {UNET[variant]} in every connector "
        f"arm. Share of prompt objects drawn with every attribute right (`bound`), pooled over seeds (per seed in "
        f"brackets). Params: what trains (the connector's own in brackets).", "",
        "## Bound objects per arm", "", *rate_table(records, arms, sizes, damage), "",
        f"## Paired differences against {reference} (95% CI over scenes) and the protocol's class", "",
        *difference_table(rules, f"arm - {reference}"), "",
        f"**ELLA's ablation (ella{variant} - mlp{variant} on short prompts): {ablation['outcome']}**"
        + (f", {difference_cell(ablation.get('difference'), '')}" if ablation.get("difference") else ""), "",
        *lora_section(effects), f"Plot: `{plot.name}`. Samples (seed {seeds[0]}): `{grid.name}`.",
        f"Evaluation (sampling and scoring): {evaluation_seconds / 60:.1f} min.", ""])
    (out / "report.md").write_text(text)
    (out / "results.json").write_text(json.dumps({
        "protocol": document, "variant": variant, "reference": reference,
        "rules": asdict(thresholds), "verdicts": rules, "ella_ablation": ablation, "lora_effects": effects,
        "sizes": sizes, "damages_base": damage,
        "objects": [list(asdict(r).values()) for r in records],
        "object_fields": list(evidence_tasks.ObjectRecord.__dataclass_fields__)}, indent=1))
    log(text)
    log(f"report: {out / 'report.md'}")
    return out


def plot_rows(by_arm: dict[str, dict[str, dict]], effects: Optional[dict], reference: str) -> list[tuple[str, Difference]]:
    """(label, difference) for every arm against ``reference`` per subset and, for a LoRA sweep whose rule 4
    was measured, for what the LoRA does to each kind; unmeasured cells left out."""
    rows = [(f"{arm} - {reference}, {s}", v["difference"]) for arm, by_subset in by_arm.items()
            for s, v in by_subset.items()]
    if effects and effects.get("outcome") == "measured":
        rows += [(f"{kind}+lora - {kind} (frozen), {s}", v["difference"]) for kind, by_subset in effects["by_kind"].items()
                 for s, v in by_subset.items()]
    return [(label, Difference.from_dict(d)) for label, d in rows if d is not None]


def difference_plot(by_arm: dict[str, dict[str, dict]], effects: Optional[dict], reference: str, path: Path) -> Path:
    """:func:`plot_rows` with their CIs and the protocol's +-effect lines."""
    lines = [(RULES.effect, f"+{RULES.effect}: better (CI above 0)"), (-RULES.effect, f"-{RULES.effect}: worse (CI below 0)")]
    return evidence_report.difference_plot(plot_rows(by_arm, effects, reference), path, thresholds=lines)


def replot(results: Path, out: Path) -> Path:
    """``differences.png`` again from a report's results.json (or .json.gz)."""
    recorded = evidence_report.read_results(results)
    reference = recorded.get("reference", "cam")
    return difference_plot(recorded["verdicts"], recorded.get("lora_effects"), reference, out)


def rate_table(records, arms: list[str], sizes: dict, damage: dict) -> list[str]:
    rows = ["| arm | params | step (s) | " + " | ".join(SUBSETS) + " | damages the base |",
            "|---|---|---|" + "---|" * len(SUBSETS) + "---|"]
    for arm in arms:
        cells = [rate_cell(records, arm, subset) for subset in SUBSETS]
        size = sizes.get(arm)
        params = "-"
        if size:
            own = size.get("connector_params", size["params"])
            params = f"{size['params']:,}" + (f" ({own:,})" if own != size["params"] else "")
        step = f"{size['step_seconds']:.2f}" if size else "-"
        damaged = "-" if arm == "a" else ("yes" if damage[arm] else "no")
        rows.append(f"| {label(arm)} | {params} | {step} | " + " | ".join(cells) + f" | {damaged} |")
    return rows


def rate_cell(records, arm: str, subset: str) -> str:
    """An arm's bound share on a subset, pooled over seeds, each seed's in brackets; "-" without records."""
    chosen = evidence_rules.select(records, arm, subset)
    if not chosen:
        return "-"
    per_seed = evidence_rules.per_seed_rates(chosen)
    return f"{evidence_rules.rate(chosen):.3f} ({' / '.join(f'{v:.2f}' for v in per_seed.values())})"


def difference_table(by_arm: dict[str, dict[str, dict]], title: str) -> list[str]:
    rows = [f"| {title} | " + " | ".join(SUBSETS) + " |", "|---|" + "---|" * len(SUBSETS)]
    for arm, by_subset in by_arm.items():
        rows.append(f"| {arm} | " + " | ".join(difference_cell(by_subset[s]["difference"], by_subset[s]["class"])
                                               for s in SUBSETS) + " |")
    return rows


def lora_section(effects: Optional[dict]) -> list[str]:
    """protocol_lora.md rule 4 in the report: nothing for a frozen sweep."""
    if effects is None:
        return []
    head = "## What LoRA does to each kind: (kind+lora) - (kind, frozen), paired with the frozen run's records"
    if effects["outcome"] != "measured":
        return [head, "", f"**Not measured**: {effects['reason']}.", ""]
    return [head, "", *difference_table(effects["by_kind"], "kind"), ""]


def run(sweep_file: str, jobs: int = 2, log=print, v3: bool = False) -> Path:
    flags = ["--protocol", "v3"] if v3 else []
    return run_study(study_command(MODULE, "run", sweep_file, *flags), sweep_file,
                     lambda spec: evidence_data.write_data(spec, log=log), lambda: report(sweep_file, jobs, log=log, v3=v3),
                     jobs, log)

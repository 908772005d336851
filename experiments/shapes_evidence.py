"""The miniature LLM4GEN experiment on the shapes benchmark, run as pre-registered in docs/evidence/protocol.md.

    python -m llm4gen.experiments.shapes_evidence run configs/sweeps/shapes_evidence.yaml      # data, training, report
    python -m llm4gen.experiments.shapes_evidence data configs/sweeps/shapes_evidence.yaml     # shards + feature cache only
    python -m llm4gen.experiments.shapes_evidence report configs/sweeps/shapes_evidence.yaml   # evaluate finished runs

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
The gates and decision rules of the protocol are applied in code (``gates``, ``decisions``) and written
to ``<output_root>/report/``: ``report.md``, ``results.json``, ``differences.png`` and ``samples.png``.
Images already generated are kept, so a report run again only scores.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import gzip
import json
import multiprocessing
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from omegaconf import OmegaConf
from PIL import Image

from llm4gen.configs.errors import entry_point
from llm4gen.datamodules.synthetic import clip_tokenizer, ensure_synthetic_shards
from llm4gen.datamodules.shards import iter_tar_samples
from llm4gen.encoders.sources import load_pretrained
from llm4gen.evaluation.grids import labelled_grid
from llm4gen.evaluation.paired import Difference, Observation, paired_difference
from llm4gen.evaluation.prompt_sets import prompt_set
from llm4gen.evaluation.prompts import shapes_sets
from llm4gen.evaluation.runner import Evaluation, image_path
from llm4gen.evaluation.shapes_scorer import ShapesScorer
from llm4gen.experiments.probes import (
    ProbeSplits,
    layer_sweep,
    llm_attention_share,
    load_encoders,
)
from llm4gen.experiments.runner import ExperimentError, run_study, study_command, study_parser
from llm4gen.launch.sweep import (
    expand_runs,
    is_finished,
    load_experiment_config,
    load_sweep,
)
from llm4gen.lightning_modules.sampler import SamplingSettings, initial_sampler, load_sampler
from llm4gen.losses.token_alignment import mentions_in_clip_window
from llm4gen.tools.feature_cache import run_cache

MODULE = "llm4gen.experiments.shapes_evidence"
ROOT = Path(__file__).resolve().parent.parent
PROTOCOL = "docs/evidence/protocol.md"

ARMS = {
    "a": "(a) base",
    "b": "(b) UNet ft",
    "b2": "(b2) UNet ft, chunked CLIP",
    "c": "(c) CAM, UNet frozen",
    "d": "(d) CAM, then CAM + UNet",
    "e": "(e) (d) + entity loss",
    "d_shuffled": "(d), LLM features of another prompt",
    "c_gated": "(c) gated CAM, UNet frozen",
    "d_gated": "(d) gated CAM, then + UNet",
}
SETS = ("seen_1", "heldout_2", "phrased_2", "phrased_3", "verbose_2", "verbose_3")
# Arms that need fewer sets: (b2) differs from (b) only past CLIP's window; the ablation asks about verbose prompts.
ARM_SETS = {"b2": ("seen_1", "verbose_2", "verbose_3"), "d_shuffled": ("verbose_2", "verbose_3")}
SET_LIMITS = {"heldout_2": 24}           # continuity only: its first half
POST_NOMINAL = ("colored", "dense")      # "a circle colored red": CLIP's causal noun cannot see its colour
PRE_NOMINAL = ("list", "beside")         # "a red circle": it can


@dataclass(frozen=True)
class Protocol:
    """The settings a protocol document fixes (the training recipe lives in the configs): protocol.md (v2)
    by default, protocol_v3.md in ``PROTOCOLS["v3"]``."""
    document: str = PROTOCOL
    data_samples: int = 4096
    data_seed: int = 2025               # pretraining drew from "pretrain/0": disjoint scenes
    verbose_share: float = 0.75
    samples_per_shard: int = 512
    sampling_steps: int = 10
    guidance_scale: float = 5.0
    eval_batch: int = 48
    prompts_per_set: Optional[int] = None  # None: every prompt of a set (but SET_LIMITS); tests take a few
    scene_draw: int = 0                    # 0: the fixed evaluation scenes; > 0: freshly drawn ones (a replication)

    def prompts(self, name: str) -> Optional[int]:
        """How many of set ``name``'s prompts are sampled (the first ones)."""
        limits = [n for n in (self.prompts_per_set, SET_LIMITS.get(name)) if n is not None]
        return min(limits) if limits else None
    gate_base_drop: float = -0.03        # (b) - (a) on seen_1 and the short sets, at least
    gate_probe: float = 0.95             # the probe's own-colour accuracy at the chosen layer, at least
    primary_effect: float = 0.10         # (d) - (b) on outside-window objects, at least
    primary_refuted_below: float = 0.05  # the primary CI's upper bound under this refutes
    keep_inside: float = -0.03           # (d) - (b) on inside-window objects and seen_1, at least
    secondary_effect: float = 0.04       # (d) - (b) on post-nominal short prompts, at least
    secondary_refuted_below: float = 0.02
    damage: Optional[float] = None       # v3: an arm more than this below the base on seen_1 "damages the base"


PROTOCOL_SETTINGS = Protocol()
PROTOCOLS = {  # --protocol: what each study reads its rules and evaluation scenes from
    "v2": PROTOCOL_SETTINGS,
    "v3": Protocol(document="docs/evidence/protocol_v3.md", damage=0.03),
    "v3-replication": Protocol(document="docs/evidence/protocol_v3.md", damage=0.03, scene_draw=1),
}


# ---------------------------------------------------------------- arms and runs


def arm_of(model: dict) -> str:
    """The arm letter of a run's resolved ``model`` config section (see the module docstring)."""
    if not model["adapter"].get("enabled", True):
        return "b2" if model["base"].get("clip_chunks", 1) > 1 else "b"
    gated = "_gated" if model["adapter"].get("fusion") == "gated" else ""
    if model["unet_training"] == "frozen":
        return "c" + gated
    if model["objective"]["lambda_entity"] > 0:
        return "e" + gated
    return "d" + gated


@dataclass(frozen=True)
class Task:
    """One evaluation: an arm at a seed, sampled from a checkpoint (or the base) into ``out``."""
    arm: str
    seed: int
    out: str
    sets: tuple[str, ...]
    checkpoint: Optional[str] = None    # None: the base alone (or ``initial``)
    base: Optional[str] = None
    shuffle_llm: bool = False
    initial: Optional[str] = None       # a run's config.yaml: what it trains, at its initial weights (step 0)


def checkpoint_at(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step={step:07d}.ckpt"


def evaluation_tasks(spec, base: str) -> tuple[list[Task], list[str]]:
    """Every arm x seed the finished runs allow, and the names of unfinished runs."""
    tasks, unfinished, seeds = [], [], set()
    for run in expand_runs(spec):
        if not is_finished(run):
            unfinished.append(run.name)
            continue
        cfg = OmegaConf.to_container(OmegaConf.load(run.output_dir / "config.yaml"), resolve=True)
        arm, seed = arm_of(cfg["model"]), int(cfg["seed"])
        seeds.add(seed)
        last = str(run.output_dir / "checkpoints" / "last.ckpt")
        evaluated = run.output_dir / "eval"
        tasks.append(Task(arm, seed, str(evaluated / arm), ARM_SETS.get(arm, SETS), checkpoint=last))
        if arm in ("d", "d_gated"):
            start = int(cfg["model"]["optim"].get("unet_start_step") or 0)
            frozen = arm.replace("d", "c", 1)  # (c): (d) at its start step, the CAM trained with the UNet frozen
            if start > 0:
                tasks.append(Task(frozen, seed, str(evaluated / frozen), SETS,
                                  checkpoint=str(checkpoint_at(run.output_dir, start))))
        if arm == "d":
            tasks.append(Task("d_shuffled", seed, str(evaluated / "d_shuffled"), ARM_SETS["d_shuffled"],
                              checkpoint=last, shuffle_llm=True))
    tasks += [Task("a", seed, str(spec.output_root / f"base_seed={seed}" / "eval"), SETS, base=base) for seed in sorted(seeds)]
    order = list(ARMS)
    return sorted(tasks, key=lambda t: (t.seed, order.index(t.arm))), unfinished


# ---------------------------------------------------------------- sampling (one task per process)


def donor_prompts(records) -> dict[str, str]:
    """The shuffled-feature ablation's mapping: each prompt of a set to the next scene's prompt (cyclically)."""
    texts = [r.text for r in records]
    return {text: texts[(i + 1) % len(texts)] for i, text in enumerate(texts)}


class ShuffledLLM:
    """A sampler whose LLM reads another prompt of the set (``donor_prompts``); CLIP reads the prompt."""

    def __init__(self, sampler, donors: dict[str, str]):
        self.sampler, self.donors = sampler, donors
        self.settings = sampler.settings
        self.description = {**sampler.description, "llm_features": "another prompt's (donor_prompts)"}

    def generate(self, prompts, seeds):
        module = self.sampler.module
        s = self.settings
        with (module.ema_weights() if self.sampler.use_ema else contextlib.nullcontext()):
            return module.generate(prompts, seeds, s.num_inference_steps, s.guidance_scale, s.scheduler,
                                   s.negative_prompt, llm_prompts=[self.donors[p] for p in prompts])


def run_task(task: Task, protocol: Protocol = PROTOCOL_SETTINGS, threads: int = 1) -> str:
    """Generates the task's missing images and writes its analyzer details; returns its folder."""
    import torch

    torch.set_num_threads(threads)
    out = Path(task.out)
    if (out / "scores.json").is_file():
        return task.out
    sets = [shapes_sets([name], protocol.prompts(name), protocol.scene_draw)[0] for name in task.sets]
    evaluation = Evaluation(out, sets, [ShapesScorer()], images_per_prompt=1, seed=task.seed,
                            batch_size=protocol.eval_batch, progress=False)
    settings = SamplingSettings(protocol.sampling_steps, protocol.guidance_scale)
    sampler = (initial_sampler(task.initial, settings) if task.initial
               else load_sampler(task.checkpoint, base=task.base, settings=settings))
    if task.shuffle_llm:
        donors = {}
        for name in task.sets:
            donors.update(donor_prompts(prompt_set(name, protocol.prompts(name), protocol.scene_draw)))
        sampler = ShuffledLLM(sampler, donors)
    plan = evaluation.plan()
    evaluation.generate(sampler, plan)
    evaluation.write(evaluation.score(plan), label=f"{task.arm} seed {task.seed}")
    return task.out


def run_tasks(tasks: list[Task], jobs: int = 2, log=print, protocol: Protocol = PROTOCOL_SETTINGS) -> None:
    """Each task in its own worker process, ``jobs`` at a time with one thread each (two one-thread
    samplers use 2 cores better than one two-thread sampler)."""
    todo = [t for t in tasks if not (Path(t.out) / "scores.json").is_file()]
    log(f"evaluating {len(todo)} of {len(tasks)} arm x seed tasks ({len(tasks) - len(todo)} done already)")
    if not todo:
        return
    context = multiprocessing.get_context("spawn")  # torch's thread pools do not survive a fork
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
        futures = {pool.submit(run_task, task, protocol): task for task in todo}
        for future in concurrent.futures.as_completed(futures):
            task = futures[future]
            future.result()
            log(f"  evaluated {ARMS.get(task.arm, task.arm)} seed {task.seed}: {task.out}")


# ---------------------------------------------------------------- per-object outcomes


@dataclass(frozen=True)
class ObjectRecord:
    """What became of one prompt object in one image."""
    arm: str
    seed: int
    set: str
    prompt: int          # index in the set
    object: int          # index among the prompt's objects, in text order
    scene: str           # scene_id: every phrasing of a scene, every seed
    phrasing: str
    n_objects: int
    category: str        # one of evaluation.shapes.OUTCOMES
    window: str          # inside | outside (verbose prompts: whether CLIP's 77 tokens hold the object) | short


def object_records(task: Task, protocol: Protocol = PROTOCOL_SETTINGS) -> list[ObjectRecord]:
    """The task's per-object outcomes, from its analyzer details and the prompt sets' records."""
    records = []
    for name in task.sets:
        prompts = prompt_set(name, protocol.prompts(name), protocol.scene_draw)
        details = [json.loads(line) for line in (Path(task.out) / "details" / f"{name}.shapes.jsonl").read_text().splitlines()]
        if len(details) != len(prompts):
            raise ExperimentError(f"{task.out}: {len(details)} scored images of {name}, expected {len(prompts)}")
        for detail, prompt in zip(details, prompts):
            windows = ["short"] * prompt.n_objects
            if prompt.phrasing == "verbose":
                windows = ["inside" if m["in_clip_window"] else "outside"
                           for m in mentions_in_clip_window(prompt.text, clip_tokenizer())]
            if len(detail["categories"]) != len(windows):
                raise ExperimentError(f"{task.out}: {name} prompt {detail['prompt_index']} has "
                                      f"{len(detail['categories'])} scored objects but {len(windows)} mentions")
            for k, (category, window) in enumerate(zip(detail["categories"], windows)):
                records.append(ObjectRecord(task.arm, task.seed, name, detail["prompt_index"], k, prompt.scene_id,
                                            prompt.phrasing, prompt.n_objects, category, window))
    return records


def swap_counts(task: Task, name: str) -> tuple[int, int]:
    """(swapped pairs, drawn pairs) over a set's images (the analyzer's details)."""
    path = Path(task.out) / "details" / f"{name}.shapes.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return sum(r["swapped_pairs"] for r in rows), sum(r["drawn_pairs"] for r in rows)


# ---------------------------------------------------------------- subsets, rates and comparisons (pure)

# name -> (what it is, predicate over an ObjectRecord)
SUBSETS = {
    "outside": ("verbose prompts, objects past CLIP's window", lambda r: r.window == "outside"),
    "inside": ("verbose prompts, objects CLIP's window holds", lambda r: r.window == "inside"),
    "seen_1": ("single objects (seen_1)", lambda r: r.set == "seen_1"),
    "heldout_2": ("two objects, a held-out pair (heldout_2)", lambda r: r.set == "heldout_2"),
    "short": ("short prompts, every phrasing (phrased_2/3)", lambda r: r.set.startswith("phrased_")),
    "post_nominal": ("short prompts, colour after its noun (colored, dense)",
                     lambda r: r.set.startswith("phrased_") and r.phrasing in POST_NOMINAL),
    "pre_nominal": ("short prompts, colour before its noun (list, beside)",
                    lambda r: r.set.startswith("phrased_") and r.phrasing in PRE_NOMINAL),
}


def select(records: list[ObjectRecord], arm: str, subset: str) -> list[ObjectRecord]:
    keep = SUBSETS[subset][1]
    return [r for r in records if r.arm == arm and keep(r)]


def observations(records: list[ObjectRecord], category: str = "bound") -> list[Observation]:
    """1.0 where an object's outcome is ``category``, keyed so two arms' records pair up."""
    return [Observation((r.seed, r.set, r.prompt, r.object), r.scene, r.seed, float(r.category == category))
            for r in records]


def rate(records: list[ObjectRecord], category: str = "bound") -> Optional[float]:
    return sum(r.category == category for r in records) / len(records) if records else None


def per_seed_rates(records: list[ObjectRecord], category: str = "bound") -> dict[int, float]:
    seeds = sorted({r.seed for r in records})
    return {s: rate([r for r in records if r.seed == s], category) for s in seeds}


def compare(records: list[ObjectRecord], a: str, b: str, subset: str, category: str = "bound",
            samples: int = 2000) -> Optional[Difference]:
    """``a - b`` on ``subset``'s objects (share in ``category``), paired; None when either arm lacks it."""
    first, second = select(records, a, subset), select(records, b, subset)
    if not first or not second:
        return None
    return paired_difference(observations(first, category), observations(second, category), samples=samples)


def leaks(records: list[ObjectRecord]) -> list[ObjectRecord]:
    """The records with "leaked" as their category when the object leaked a colour or shape (for rates)."""
    return [r if r.category not in ("leaked_color", "leaked_shape") else
            ObjectRecord(**{**asdict(r), "category": "leaked"}) for r in records]


# ---------------------------------------------------------------- gates and decision rules (pure)


@dataclass
class Check:
    name: str
    passed: Optional[bool]   # None: could not be measured
    detail: str
    guards: tuple[str, ...] = ("primary", "secondary")  # the decision rules this gate is a precondition of


def gates(records: list[ObjectRecord], probe: Optional[dict], truncated: int, attention: dict[str, float],
          protocol: Protocol = PROTOCOL_SETTINGS) -> list[Check]:
    """The protocol's gates; a failed gate makes the rules it guards inconclusive. The probe gate is read
    per claim (protocol.md, pilot 2): the short phrasings guard the binding rule; the issue's literal
    reading, every phrasing pooled, is reported beside them and guards nothing by itself."""
    checks = []
    for subset in ("seen_1", "short"):
        diff = compare(records, "b", "a", subset)
        checks.append(Check(f"(b) - (a) on {subset} >= {protocol.gate_base_drop}",
                            None if diff is None else diff.mean >= protocol.gate_base_drop,
                            "not measured" if diff is None else fmt(diff)))
    if probe is None:
        checks.append(Check(f"probe own colour >= {protocol.gate_probe}", None, "not measured", ("secondary",)))
    else:
        test = probe["test"]
        per_phrasing = ", ".join(f"{k} {v['own']:.2f}" for k, v in test.items() if k not in ("all", "short"))
        checks.append(Check(f"probe own colour at layer {probe['layer']} >= {protocol.gate_probe}, short phrasings "
                            f"(the binding claim's precondition)", test["short"]["own"] >= protocol.gate_probe,
                            f"{test['short']['own']:.3f} ({per_phrasing})", ("secondary",)))
        checks.append(Check(f"probe own colour at layer {probe['layer']} >= {protocol.gate_probe}, every phrasing "
                            f"pooled (the issue's literal gate; reported, guards no rule by itself)",
                            test["all"]["own"] >= protocol.gate_probe, f"{test['all']['own']:.3f}", ()))
    checks.append(Check("no caption truncated by the LLM (the long-description claim's precondition)", truncated == 0,
                        f"{truncated} captions over max_length"))
    checks.append(Check("cross-attention on CLIP / the CAM's tokens / LLM padding measured", bool(attention) or None,
                        ", ".join(f"{ARMS[a]} {v['clip']:.2f} / {v['llm']:.2f} / {v['padding']:.2f}"
                                  for a, v in attention.items()) or "not measured"))
    return checks


def decisions(records: list[ObjectRecord], gate_checks: list[Check],
              protocol: Protocol = PROTOCOL_SETTINGS) -> dict[str, dict]:
    """Both pre-registered rules applied: each "shown", "refuted" or "inconclusive", with the reasons; and
    what each would be if every gate, the literal probe gate included, guarded it."""
    def gates_pass(rule: str, literal: bool = False) -> bool:
        return all(c.passed for c in gate_checks if rule in c.guards or (literal and not c.guards))

    d_b = compare(records, "d", "b", "outside")
    d_b2 = compare(records, "d", "b2", "outside")
    shuffled = compare(records, "d_shuffled", "b", "outside")
    inside = compare(records, "d", "b", "inside")
    single = compare(records, "d", "b", "seen_1")
    primary_checks = []
    if d_b is not None:
        primary_checks += [
            Check(f"(d) - (b) on outside-window objects >= +{protocol.primary_effect}, CI above 0, positive in every seed",
                  d_b.mean >= protocol.primary_effect and d_b.low > 0 and d_b.positive_in_every_seed, fmt(d_b))]
    if d_b2 is not None:
        primary_checks.append(Check("(d) - (b2) on outside-window objects > 0, CI above 0", d_b2.mean > 0 and d_b2.low > 0,
                                    fmt(d_b2)))
    if shuffled is not None and d_b is not None:
        primary_checks.append(Check("the shuffled-feature ablation loses most of the gain: (d shuffled) - (b) <= half of (d) - (b)",
                                    shuffled.mean <= d_b.mean / 2, f"{shuffled.mean:+.3f} vs half of {d_b.mean:+.3f}"))
    for diff, what in ((inside, "inside-window objects"), (single, "seen_1")):
        if diff is not None:
            primary_checks.append(Check(f"(d) - (b) on {what} >= {protocol.keep_inside}", diff.mean >= protocol.keep_inside,
                                        fmt(diff)))
    refuted = d_b is not None and (d_b.high < protocol.primary_refuted_below or
                                   (d_b2 is not None and d_b2.high < protocol.primary_refuted_below))

    post = compare(records, "d", "b", "post_nominal")
    pre = compare(records, "d", "b", "pre_nominal")
    secondary_checks = []
    if post is not None:
        secondary_checks.append(Check(f"(d) - (b) on post-nominal short prompts >= +{protocol.secondary_effect}, CI above 0",
                                      post.mean >= protocol.secondary_effect and post.low > 0, fmt(post)))
        fewer_leaks = compare_categories(records, "post_nominal", ("leaked_color", "leaked_shape"))
        fewer_missing = compare_categories(records, "post_nominal", ("missing_object",))
        secondary_checks.append(Check("from fewer leaks rather than fewer missing objects: (b) - (d) leaks > (b) - (d) missing",
                                      fewer_leaks > fewer_missing, f"leaks {fewer_leaks:+.3f}, missing {fewer_missing:+.3f}"))
        if pre is not None:
            secondary_checks.append(Check("larger than on pre-nominal prompts", post.mean > pre.mean,
                                          f"post {post.mean:+.3f} vs pre {pre.mean:+.3f}"))
    secondary_refuted = post is not None and post.high < protocol.secondary_refuted_below
    return {
        "primary": {**verdict(gates_pass("primary"), primary_checks, refuted, expected=5),
                    "literal": verdict(gates_pass("primary", True), primary_checks, refuted, expected=5)["outcome"]},
        "secondary": {**verdict(gates_pass("secondary"), secondary_checks, secondary_refuted, expected=3),
                      "literal": verdict(gates_pass("secondary", True), secondary_checks, secondary_refuted, expected=3)["outcome"]},
    }


def compare_categories(records: list[ObjectRecord], subset: str, categories: tuple[str, ...]) -> float:
    """(b)'s share of ``subset``'s objects in ``categories`` minus (d)'s (positive: (d) has fewer)."""
    def share(arm):
        chosen = select(records, arm, subset)
        return sum(r.category in categories for r in chosen) / len(chosen) if chosen else 0.0
    return share("b") - share("d")


def verdict(gates_pass: bool, checks: list[Check], refuted: bool, expected: int) -> dict:
    if not gates_pass:
        outcome = "inconclusive (a gate failed)"
    elif len(checks) == expected and all(c.passed for c in checks):
        outcome = "shown"
    elif refuted:
        outcome = "refuted"
    else:
        outcome = "inconclusive"
    return {"outcome": outcome, "checks": [asdict(c) for c in checks]}


def fmt(diff: Difference) -> str:
    seeds = ", ".join(f"{v:+.3f}" for v in diff.per_seed.values())
    return f"{diff.mean:+.3f} [{diff.low:+.3f}, {diff.high:+.3f}] (per seed {seeds}; {diff.n} objects, {diff.clusters} scenes)"


# ---------------------------------------------------------------- the data step


def write_data(spec, protocol: Protocol = PROTOCOL_SETTINGS, log=print) -> Path:
    """The rendered shards (``<output_root>/data``), every caption checked against the LLM's max_length,
    and the feature cache the runs train on (``data.shards`` of the experiment config)."""
    cfg = load_experiment_config(spec.config, spec.base_overrides)
    raw = spec.output_root / "data"
    shards = ensure_synthetic_shards(str(raw), num_samples=protocol.data_samples,
                                     samples_per_shard=protocol.samples_per_shard, resolution=cfg.data.resolution,
                                     seed=protocol.data_seed, verbose_share=protocol.verbose_share)
    longest, truncated = caption_lengths(cfg, shards, protocol)
    if truncated:
        raise ExperimentError(f"{truncated} captions are longer than model.llm.max_length={cfg.model.llm.max_length} "
                              f"LLM tokens (the longest: {longest}); the protocol lets the LLM see every caption whole: "
                              f"raise model.llm.max_length in {spec.config}")
    log(f"data: {len(shards)} shards in {raw}; the longest caption is {longest} LLM tokens "
        f"(max_length {cfg.model.llm.max_length}): none truncated")
    run_cache(cfg, str(raw), str(cfg.data.shards), fields=list(cfg.data.precomputed_keys), cache_dtype="float32",
              log=log)
    return Path(cfg.data.shards)


def caption_lengths(cfg, shards: list[str], protocol: Protocol = PROTOCOL_SETTINGS) -> tuple[int, int]:
    """(the longest caption in LLM tokens, how many exceed max_length) over the training shards and every
    evaluation prompt (of the protocol's scene draw)."""
    from transformers import AutoTokenizer

    tokenizer = load_pretrained(AutoTokenizer.from_pretrained, cfg.model.llm.tokenizer or cfg.model.llm.pretrained,
                                "model.llm.tokenizer")
    captions = [r.text for name in SETS for r in prompt_set(name, draw=protocol.scene_draw)]
    for shard in shards:
        captions += [sample["txt"].decode() for sample in iter_tar_samples(shard) if "txt" in sample]
    lengths = [len(ids) for ids in tokenizer([cfg.model.llm.prefix + c for c in captions]).input_ids]
    return max(lengths), sum(n > cfg.model.llm.max_length for n in lengths)


# ---------------------------------------------------------------- probe and attention


def run_probe(spec, path: Path, log=print) -> dict:
    """The protocol's layer probe (llm4gen.experiments.probes: 3000 / 500 / 500 captions over every pair, every
    phrasing) at the experiment's LLM settings, written once to ``path``."""
    if path.is_file():
        return json.loads(path.read_text())
    cfg = load_experiment_config(spec.config, spec.base_overrides)
    _, llm = load_encoders(cfg.model.base.pretrained, cfg.model.llm.pretrained, cfg.model.llm.max_length)
    choice = layer_sweep(llm, ProbeSplits.make(3000, 500, 500, seed=0))
    result = {"layer": choice.layer, "configured_layer": cfg.model.llm.layer, "validation": {str(k): v for k, v in choice.validation.items()},
              "test": choice.test}
    if choice.layer != cfg.model.llm.layer:
        log(f"warning: the probe now picks layer {choice.layer!r}, the config reads {cfg.model.llm.layer!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    log(f"probe: layer {choice.layer!r}, own colour on the test split {choice.test['all']['own']:.3f} "
        f"(short phrasings {choice.test['short']['own']:.3f}, verbose {choice.test['verbose']['own']:.3f})")
    return result


CONNECTOR_ARMS = ("c", "d", "e", "c_gated", "d_gated")


def attention_shares(tasks: list[Task]) -> dict[str, dict[str, float]]:
    """Per connector arm, the mean over seeds of where the UNet's cross-attention goes on verbose_2 (with the
    EMA weights the arm is evaluated with): CLIP's tokens, the connector's real tokens, LLM padding
    (lightning_modules/attention_split.py)."""
    prompts = [r.text for r in prompt_set("verbose_2")]
    shares: dict[str, list] = {}
    for task in tasks:
        if task.arm in CONNECTOR_ARMS and task.checkpoint:
            shares.setdefault(task.arm, []).append(llm_attention_share(task.checkpoint, prompts))
    return {arm: {part: sum(getattr(s, part) for s in splits) / len(splits) for part in ("clip", "llm", "padding")}
            for arm, splits in shares.items()}


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


def arm_tag(arm: str) -> str:
    """An arm's short name in the plot and the table: "(d)", "(d shuffled)" for the ablation of (d), "(d gated)"."""
    if arm == "d_shuffled":
        return "(d shuffled)"
    letter = ARMS[arm].split(" ")[0]
    return f"{letter[:-1]} gated)" if arm.endswith("_gated") else letter


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


def sample_grid(tasks: list[Task], path: Path, seed: int = 0, protocol: Protocol = PROTOCOL_SETTINGS,
                labels: dict[str, str] = ARMS) -> Path:
    """Rows: prompts (short post-nominal ones, then verbose ones); columns: the arms at ``seed``, in the order
    and under the names of ``labels``."""

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
    tasks, unfinished = evaluation_tasks(spec, base)
    if not any(t.arm != "a" for t in tasks):
        raise ExperimentError(f"no finished run under {spec.output_root}; train the arms first: "
                              f"python -m llm4gen.experiments.shapes_evidence run {sweep_file} (or python sweep.py {sweep_file})")
    if unfinished:
        log(f"not finished, left out of the report: {', '.join(unfinished)}")
    started = time.time()
    run_tasks(tasks, jobs, log, protocol)
    evaluation_seconds = time.time() - started
    records = [r for task in tasks for r in object_records(task, protocol)]
    out = spec.output_root / "report"
    out.mkdir(parents=True, exist_ok=True)
    probe = run_probe(spec, spec.output_root / "probe.json", log)
    _, truncated = caption_lengths(cfg, [], protocol)
    attention = attention_shares(tasks)
    gate_checks = gates(records, probe, truncated, attention, protocol)
    rules = decisions(records, gate_checks, protocol)
    differences = [(difference_label(a, b, subset), diff) for a, b, subset in COMPARISONS
                   if (diff := compare(records, a, b, subset)) is not None]
    plot = difference_plot(differences, out / "differences.png", protocol)
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
        f"Protocol: `{protocol.document}`. Sweep `{sweep_file}`, base `{base}`, seeds {seeds}"
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
        "## Gates (any failure makes the result inconclusive)", "",
        *[f"- {'PASS' if c.passed else ('FAIL' if c.passed is False else 'NOT MEASURED')}: {c.name}: {c.detail}"
          for c in gate_checks], "",
        "## Decision rules", "",
        *[line for name, rule in rules.items() for line in (
            f"**{name}: {rule['outcome']}** (with every gate guarding it, the literal probe gate included: "
            f"{rule['literal']})", "",
            *[f"- {'pass' if c['passed'] else 'fail'}: {c['name']}: {c['detail']}" for c in rule["checks"]], "")],
        *(replication_section(Path(replication), protocol) if replication else []),
        f"Plot: `{plot.name}`. Samples (seed {seeds[0]}; a row per prompt, a column per arm): `{grid.name}`.",
        f"Evaluation (sampling and scoring, {len(tasks)} arm x seed tasks): {evaluation_seconds / 60:.1f} min.", ""])
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


def load_object_records(path: Path) -> list[ObjectRecord]:
    """The per-object records a report's results.json (or .json.gz) holds."""
    results = read_results(path)
    fields = results["object_fields"]
    return [ObjectRecord(**dict(zip(fields, row))) for row in results["objects"]]


REPLICATED = (("d", "b", "outside"), ("d", "b2", "outside"), ("d", "b", "post_nominal"), ("d_gated", "b", "outside"),
              ("d_gated", "b", "post_nominal"), ("b", "a", "seen_1"))


def replication_section(path: Path, protocol: Protocol = PROTOCOL_SETTINGS) -> list[str]:
    """A replication study's outcome (its report folder or results.json): rates, gates, rules, key differences."""
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
    return lines + [""]


def run(sweep_file: str, jobs: int = 2, log=print, protocol: Protocol = PROTOCOL_SETTINGS, name: str = "v2",
        replication: Optional[str] = None) -> Path:
    """Data (shards, feature cache, the probe), the sweep's runs, the report: the whole experiment."""
    def data(spec):
        write_data(spec, protocol, log=log)
        run_probe(spec, spec.output_root / "probe.json", log)

    flags = [] if name == "v2" else ["--protocol", name]
    return run_study(study_command(MODULE, "run", sweep_file, *flags), sweep_file, data,
                     lambda: report(sweep_file, jobs, log=log, protocol=protocol, replication=replication), jobs, log)


@entry_point(f"python -m {MODULE}")
def main(argv: Optional[list[str]] = None) -> int:
    parser = study_parser(MODULE, __doc__, "configs/sweeps/shapes_evidence.yaml (replot: a report's results.json[.gz]; "
                          "differences.png is written beside it)", ("run", "data", "report", "replot"))
    parser.add_argument("--base", help="report: evaluate this base for arm (a) (default: the config's)")
    parser.add_argument("--protocol", choices=list(PROTOCOLS), default="v2",
                        help="whose rules and evaluation scenes: v2 (docs/evidence/protocol.md), v3 "
                             "(protocol_v3.md), v3-replication (v3 on freshly drawn scenes)")
    parser.add_argument("--replication", help="report/run: a replication study's report folder, added as a section")
    args = parser.parse_args(argv)
    protocol = PROTOCOLS[args.protocol]

    if args.command == "data":
        spec = load_sweep(args.sweep)
        write_data(spec, protocol)
        run_probe(spec, spec.output_root / "probe.json")
    elif args.command == "report":
        report(args.sweep, args.jobs, args.base, protocol=protocol, replication=args.replication)
    elif args.command == "replot":
        print(replot(Path(args.sweep), Path(args.sweep).parent / "differences.png", protocol))
    else:
        run(args.sweep, args.jobs, protocol=protocol, name=args.protocol, replication=args.replication)
    return 0


if __name__ == "__main__":
    sys.exit(main())

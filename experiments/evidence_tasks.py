"""The evidence experiment's evaluation tasks: which checkpoint of which arm samples which prompt set, the
sampling (one task per process), and each prompt object's outcome as the shapes analyzer scores it."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import multiprocessing
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from omegaconf import OmegaConf

from llm4gen.datamodules.synthetic import clip_tokenizer, mentions_in_clip_window
from llm4gen.evaluation.prompt_sets import prompt_set
from llm4gen.evaluation.prompts import shapes_sets
from llm4gen.evaluation.runner import Evaluation
from llm4gen.evaluation.shapes_scorer import ShapesScorer
from llm4gen.experiments.evidence_protocol import ARMS, ARM_SETS, PROTOCOL_SETTINGS, Protocol, SETS
from llm4gen.experiments.runner import ExperimentError, finished_runs
from llm4gen.launch.sweep import load_experiment_config
from llm4gen.lightning_modules.sampler import SamplingSettings, initial_sampler, load_sampler


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


def base_tasks(spec, seeds, base: str, sets: tuple[str, ...] = SETS) -> list[Task]:
    """Arm (a), the base alone, at each of ``seeds``, on every set."""
    return [Task("a", seed, str(spec.output_root / f"base_seed={seed}" / "eval"), sets, base=base) for seed in sorted(seeds)]


# Arm (a chunked): what (b2) trains from, at its initial weights (step 0): the base's UNet reading CLIP over three
# 77-token windows, no connector, no training (initial_sampler builds exactly what a run's first step would train)
CHUNKED_BASE = ("model.adapter.enabled=false", "model.unet_training=full", "model.base.clip_chunks=3")


def chunked_base_tasks(spec, seeds) -> list[Task]:
    """Arm (a chunked) at each of ``seeds``; its resolved config is written once to
    ``<output_root>/base_chunked/config.yaml`` (the experiment config with ``CHUNKED_BASE``)."""
    config = spec.output_root / "base_chunked" / "config.yaml"
    if not config.is_file():
        config.parent.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(load_experiment_config(spec.config, [*spec.base_overrides, *CHUNKED_BASE]), config, resolve=True)
    return [Task("a_chunked", seed, str(config.parent / f"seed={seed}" / "eval"), ARM_SETS["a_chunked"],
                 initial=str(config)) for seed in sorted(seeds)]


def arm_sets(arm: str, protocol: Protocol) -> tuple[str, ...]:
    """The sets an arm samples: fewer for the arms that ask only about some (ARM_SETS), else the protocol's."""
    return ARM_SETS.get(arm, protocol.sets)


def evaluation_tasks(spec, base: str, protocol: Protocol = PROTOCOL_SETTINGS) -> tuple[list[Task], list[str]]:
    """Every arm x seed the finished runs allow, and the names of unfinished runs."""
    tasks, seeds = [], set()
    finished, unfinished = finished_runs(spec)
    for run, cfg in finished:
        arm, seed = arm_of(cfg["model"]), int(cfg["seed"])
        seeds.add(seed)
        last = str(run.output_dir / "checkpoints" / "last.ckpt")
        evaluated = run.output_dir / "eval"
        tasks.append(Task(arm, seed, str(evaluated / arm), arm_sets(arm, protocol), checkpoint=last))
        if arm in ("d", "d_gated"):
            start = int(cfg["model"]["optim"].get("unet_start_step") or 0)
            frozen = arm.replace("d", "c", 1)  # (c): (d) at its start step, the CAM trained with the UNet frozen
            if start > 0:
                tasks.append(Task(frozen, seed, str(evaluated / frozen), protocol.sets,
                                  checkpoint=str(checkpoint_at(run.output_dir, start))))
        if arm == protocol.shuffled_arm:  # v2, v3: (d shuffled); v4: (c shuffled)
            shuffled = f"{arm}_shuffled"
            tasks.append(Task(shuffled, seed, str(evaluated / shuffled), ARM_SETS[shuffled],
                              checkpoint=last, shuffle_llm=True))
    tasks += base_tasks(spec, seeds, base, protocol.sets)
    if protocol.chunked_base and seeds:
        tasks += chunked_base_tasks(spec, seeds)
    order = list(ARMS)
    return sorted(tasks, key=lambda t: (t.seed, order.index(t.arm))), unfinished


# ---------------------------------------------------------------- sampling (one task per process)


def donor_prompts(records) -> dict[str, str]:
    """The shuffled-feature ablation's mapping: each prompt of a set to the next scene's prompt (cyclically; in a
    verbose set every record is its own scene)."""
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


def run_tasks(tasks: list[Task], jobs: int = 2, log=print, protocol: Protocol = PROTOCOL_SETTINGS) -> int:
    """Each task not evaluated yet in its own worker process, ``jobs`` at a time with one thread each (two
    one-thread samplers use 2 cores better than one two-thread sampler); returns how many it evaluated."""
    todo = [t for t in tasks if not (Path(t.out) / "scores.json").is_file()]
    log(f"evaluating {len(todo)} of {len(tasks)} arm x seed tasks ({len(tasks) - len(todo)} done already)")
    if not todo:
        return 0
    context = multiprocessing.get_context("spawn")  # torch's thread pools do not survive a fork
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
        futures = {pool.submit(run_task, task, protocol): task for task in todo}
        for future in concurrent.futures.as_completed(futures):
            task = futures[future]
            future.result()
            log(f"  evaluated {ARMS.get(task.arm, task.arm)} seed {task.seed}: {task.out}")
    return len(todo)


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



"""One evaluation run: load the scorers (fail early), plan the images, generate the missing ones,
score, write ``scores.json`` and ``scores.md``.

The folder tree of a run (``<out>``):

    run.json                       what was sampled from and how (refuses a rerun with other settings)
    prompts/<set>.json             the set's prompts and every image's seed
    images/<set>/<i:05d>_<j:02d>.png   image j of prompt i
    details/<set>.<scorer>.jsonl   per-image scores
    scores.json, scores.md         {set: {metric: value}} and the same as a markdown table

Image j of prompt i is sampled with seed ``seed + 1000 * i + j`` (in a set with its own seed per prompt,
the shapes benchmark's: ``seed + own_seed_i + 1_000_000 * j``, so image 0 has the benchmark's seed):
the same image whatever the batch size, the number of images per prompt or the order of generation
(up to float rounding: a batch of another size may sum in another order, seen as +-1 in a few pixel
values), so an interrupted run resumes where it stopped (existing images are kept; each is written to
a temporary name, then renamed).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

import llm4gen
from llm4gen.evaluation.prompts import PromptSet
from llm4gen.evaluation.report import markdown_table
from llm4gen.evaluation.scorers import ImageRecord, Scorer

MAX_IMAGES_PER_PROMPT = 1000


class EvaluationError(ValueError):
    pass


def image_seed(seed: int, prompt_index: int, image_index: int, own_seed: int | None = None,
               shared: bool = False) -> int:
    """``shared``: every prompt's image j has seed + j (T2I-CompBench's generation script: 42 + j)."""
    if not 0 <= image_index < MAX_IMAGES_PER_PROMPT:
        raise ValueError(f"image index {image_index}: at most {MAX_IMAGES_PER_PROMPT} images per prompt")
    if shared:
        return seed + image_index
    if own_seed is not None:
        return seed + own_seed + 1_000_000 * image_index
    return seed + MAX_IMAGES_PER_PROMPT * prompt_index + image_index


def image_path(out: Path, set_name: str, prompt_index: int, image_index: int) -> Path:
    return out / "images" / set_name / f"{prompt_index:05d}_{image_index:02d}.png"


def plan_images(out: Path, prompt_set: PromptSet, images_per_prompt: int, seed: int,
                shared_seeds: bool = False) -> list[ImageRecord]:
    own = prompt_set.seeds or [None] * len(prompt_set.prompts)
    return [ImageRecord(i, j, prompt, image_seed(seed, i, j, own[i], shared_seeds),
                        image_path(out, prompt_set.name, i, j))
            for i, prompt in enumerate(prompt_set.prompts) for j in range(images_per_prompt)]


def missing_images(plan: dict[str, list[ImageRecord]]) -> int:
    """How many planned images are not on disk yet (what a run will generate)."""
    return sum(1 for records in plan.values() for r in records if not r.path.is_file())


def generate_missing(sampler, records: list[ImageRecord], batch_size: int, progress: bool = True, bar=None) -> int:
    """Generates the records whose image file is absent, ``batch_size`` at a time; returns how many.
    ``bar``: a progress bar over a larger run to advance (else one of its own)."""

    todo = [r for r in records if not r.path.is_file()]
    own = bar is None
    if own:
        bar = tqdm(total=len(todo), desc="generating", unit="img", disable=not progress or not todo)
    for start in range(0, len(todo), batch_size):
        batch = todo[start:start + batch_size]
        images = sampler.generate([r.prompt for r in batch], [r.seed for r in batch])
        for record, image in zip(batch, images):
            record.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = record.path.with_name(f".{record.path.name}.tmp-{os.getpid()}.png")
            image.save(tmp)
            os.replace(tmp, record.path)
        bar.update(len(batch))
    if own:
        bar.close()
    return len(todo)


def _write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def check_run_record(out: Path, record: dict) -> None:
    """Images in ``out`` must come from the same model and sampling settings as this run's."""
    path = out / "run.json"
    if path.is_file():
        previous = json.loads(path.read_text())
        keys = ("sampler", "sampling", "seed", "shared_seeds")
        if any(previous.get(k) != record.get(k) for k in keys):
            changed = [k for k in keys if previous.get(k) != record.get(k)]
            raise EvaluationError(
                f"{out} holds images from another evaluation (different {', '.join(changed)}: was "
                f"{ {k: previous.get(k) for k in changed} }, now { {k: record.get(k) for k in changed} }); "
                f"use another --output-dir, or delete the folder to start over")
    _write_json(path, record)


@dataclass
class Evaluation:
    out: Path
    prompt_sets: list[PromptSet]
    scorers: list[Scorer]
    images_per_prompt: int = 10
    seed: int = 0
    batch_size: int = 8
    progress: bool = True
    shared_seeds: bool = False  # image j of every prompt has seed + j (a T2I-CompBench protocol)

    def load_scorers(self) -> None:
        """Every scorer's model, before any image is generated (a missing model fails in seconds)."""
        for scorer in self.scorers:
            scorer.load()

    def plan(self) -> dict[str, list[ImageRecord]]:
        return {s.name: plan_images(self.out, s, self.images_per_prompt, self.seed, self.shared_seeds)
                for s in self.prompt_sets}

    def check_output(self, description: dict, settings) -> None:
        """Refuses an output folder holding images of another model or other settings (before loading)."""
        record = {"sampler": description, "sampling": settings.as_dict(), "seed": self.seed}
        if self.shared_seeds:
            record["shared_seeds"] = True
        check_run_record(self.out, record)

    def generate(self, sampler, plan: dict[str, list[ImageRecord]]) -> int:
        """Every missing image of every set, under one progress bar."""

        self.check_output(sampler.description, sampler.settings)
        todo = missing_images(plan)
        bar = tqdm(total=todo, desc="generating", unit="img", disable=not self.progress or not todo)
        generated = 0
        for prompt_set in self.prompt_sets:
            records = plan[prompt_set.name]
            _write_json(self.out / "prompts" / f"{prompt_set.name}.json",
                        {"name": prompt_set.name, "kind": prompt_set.kind, "prompts": prompt_set.prompts,
                         "images": [{"prompt_index": r.prompt_index, "image_index": r.image_index, "seed": r.seed,
                                     "path": str(r.path.relative_to(self.out))} for r in records]})
            generated += generate_missing(sampler, records, self.batch_size, self.progress, bar=bar)
        bar.close()
        return generated

    def score(self, plan: dict[str, list[ImageRecord]]) -> dict[str, dict[str, float]]:
        scores: dict[str, dict[str, float]] = {}
        for prompt_set in self.prompt_sets:
            records = plan[prompt_set.name]
            missing = [str(r.path) for r in records if not r.path.is_file()]
            if missing:
                raise EvaluationError(f"{len(missing)} images of set {prompt_set.name!r} are missing (first: "
                                      f"{missing[0]}); run the evaluation with a model to generate them")
            scores[prompt_set.name] = {}
            for scorer in self.scorers:
                if not scorer.applies(prompt_set):
                    continue
                values, details = scorer.score(prompt_set, records)
                if not values:
                    raise EvaluationError(f"scorer {scorer.name} returned no value for prompt set {prompt_set.name!r}")
                scores[prompt_set.name].update(values)
                if details:
                    path = self.out / "details" / f"{prompt_set.name}.{scorer.name}.jsonl"
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_text("".join(json.dumps({"prompt_index": r.prompt_index, "image_index": r.image_index,
                                                        "prompt": r.prompt, **d}) + "\n"
                                            for r, d in zip(records, details)))
            if not scores[prompt_set.name]:  # never an empty table, silently
                raise EvaluationError(f"no scorer scored prompt set {prompt_set.name!r} (scorers: "
                                      f"{', '.join(s.name for s in self.scorers) or 'none'}); give one that reads it")
        return scores

    def protocol_record(self, sampler_description: dict, settings, protocol: str | None = None,
                        dtype: str = "float32") -> dict:
        """What the scores depend on beyond the model: the prompt sets (with checksums of their prompts),
        the generation settings and seeds, each scorer's model and options, the code version."""
        scorers = {s.name: s.record() for s in self.scorers if hasattr(s, "record")}
        scorers.update({s.name: {} for s in self.scorers if not hasattr(s, "record")})
        return {
            "protocol": protocol or "custom",
            "prompt_sets": {s.name: {"kind": s.kind, "prompts": len(s.prompts),
                                     "sha256": hashlib.sha256("\n".join(s.prompts).encode()).hexdigest(),
                                     **({"file_sha256": s.meta["file_sha256"]} if "file_sha256" in s.meta else {})}
                            for s in self.prompt_sets},
            "generation": {**settings.as_dict(), "images_per_prompt": self.images_per_prompt, "dtype": dtype,
                           "seeds": (f"image j of every prompt: {self.seed} + j" if self.shared_seeds else
                                     f"image j of prompt i: {self.seed} + 1000 i + j")},
            "scorers": scorers,
            "sampler": sampler_description,
            "code": {"llm4gen": llm4gen.__version__},
        }

    def write(self, scores: dict[str, dict[str, float]], label: str | None = None, protocol: dict | None = None) -> None:
        _write_json(self.out / "scores.json", {"label": label or self.out.name, "scores": scores,
                                               "images_per_prompt": self.images_per_prompt,
                                               "prompts": {s.name: len(s.prompts) for s in self.prompt_sets},
                                               **({"protocol": protocol} if protocol else {})})
        (self.out / "scores.md").write_text(markdown_table({label or self.out.name: scores}) + "\n")

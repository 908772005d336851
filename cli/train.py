"""Train the LLM4GEN Cross-Adapter Module.

    python train.py                                   # the embedded tiny default, CPU, minutes
    python train.py --config configs/sd15_t5xl.yaml   # the paper's SD1.5 + T5-XL setup
    python train.py --config CFG dotted.key=value ... # overrides; --print-config shows the result

The run folder is ``output_dir``: config.yaml, checkpoints/ (last.ckpt), samples/, logs/, export/,
final_metrics.json. A restarted run (or a requeued SLURM job) resumes from its newest valid checkpoint.

A mistake in the config, a path or a checkpoint is reported in one paragraph with exit code 2 before
any model loads (configs/errors.py).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

from omegaconf import OmegaConf

from llm4gen.configs.buckets import resolve_buckets
from llm4gen.configs.errors import entry_point
from llm4gen.configs.schema import DataConfig, load_config, to_yaml
from llm4gen.datamodules.entity_targets import EntityTargetBuilder, TokenizerSources
from llm4gen.datamodules.synthetic import ensure_synthetic_shards
from llm4gen.datamodules.webdataset_datamodule import WebDatasetDataModule
from llm4gen.launch.preflight import preflight
from llm4gen.lightning_modules import console, run_checkpoints
from llm4gen.lightning_modules.callbacks import (
    AtomicCheckpointIO,
    RunCheckpoint,
    SkippedSamples,
    ValidationImages,
    read_validation_scores,
)
from llm4gen.lightning_modules.llm4gen import LLM4GenModule
from llm4gen.lightning_modules.loggers import build_logger
from llm4gen.lightning_modules.nonfinite import NonFiniteStepsError
from llm4gen.lightning_modules.preemption import (
    Preempted,
    StepBoundaryCheckpoint,
    signal_number,
    slurm_job_id,
)
from llm4gen.lightning_modules.safe_loading import TRUST_FLAG, TRUST_HELP, trusted_checkpoints
from llm4gen.lightning_modules.sampler import load_checkpoint_module
from llm4gen.lightning_modules.sharding import STRATEGY_NAME, ShardedStrategy
from llm4gen.lightning_modules.run_checkpoints import (
    CheckpointSaveError,
    checkpoint_step,
    prune_signal_checkpoints,
)
from llm4gen.lightning_modules.throughput import TrainingThroughput


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="experiment YAML overlaid on the defaults (configs/*.yaml)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    level = parser.add_mutually_exclusive_group()
    level.add_argument("--quiet", "-q", action="store_true",
                       help="no progress bar, model table or validation lines: warnings, errors and the final summary")
    level.add_argument("--verbose", "-v", action="store_true",
                       help="every library notice, Lightning's model summary and the loading bars")
    parser.add_argument(TRUST_FLAG, action="store_true", help=f"resume= and resume=auto's checkpoints: {TRUST_HELP}")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    return parser.parse_args(argv)


def find_resume_checkpoint(output_dir: Path) -> Path | None:
    """The readable checkpoint of a run with the highest stored step (lightning_modules/run_checkpoints.py)."""
    return run_checkpoints.find_resume_checkpoint(output_dir)


def build_datamodule(cfg) -> WebDatasetDataModule:
    data: DataConfig = OmegaConf.to_object(cfg.data)
    if data.synthetic_if_missing:
        ensure_synthetic_shards(data.shards, resolution=data.resolution, seed=cfg.seed)
    objective = cfg.model.objective
    with_entity = objective.lambda_entity > 0
    # the entity loss's targets are aligned in the data worker (or read from the cache), never in the step
    entity_targets = EntityTargetBuilder(TokenizerSources.from_model_config(cfg.model)) if with_entity else None
    return WebDatasetDataModule.from_config(
        data, seed=cfg.seed, entity_parser=objective.entity_parser if with_entity else None,
        entity_targets=entity_targets,
        buckets=resolve_buckets(data.buckets, data.resolution, cfg.model.base.family),  # None: square crops
        counts_dir=str(cfg.output_dir))  # the shards' sample counts, where their folder is read-only or remote


def build_module(cfg) -> LLM4GenModule:
    """The LightningModule of a loaded config: its typed ``model`` section and the run's seed."""
    return LLM4GenModule(OmegaConf.to_object(cfg.model), seed=cfg.seed)


def build_signal_checkpoint(cfg):
    """Preemption signals and Ctrl-C -> a checkpoint at the next step boundary (lightning_modules/preemption.py)."""
    requeue_signal = signal_number(cfg.slurm.signal)
    in_slurm_job = "SLURM_JOB_ID" in os.environ
    stop_signals = {signal.SIGTERM} - {requeue_signal}
    if cfg.checkpoint.on_interrupt:
        stop_signals.add(signal.SIGINT)
    return StepBoundaryCheckpoint(cfg.output_dir, requeue_signals=[requeue_signal], stop_signals=sorted(stop_signals),
                                  requeue_job=slurm_job_id() if in_slurm_job and cfg.slurm.requeue else None)


def build_trainer(cfg, resume_step=None, signal_checkpoint=None, extra_callbacks=(), console_level: str = "default"):
    import lightning as L
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    out = Path(cfg.output_dir)
    checkpoints = RunCheckpoint(dirpath=out / "checkpoints", filename="step={step:07d}", auto_insert_metric_name=False,
                                  every_n_train_steps=cfg.checkpoint.every_n_steps, save_last=True,
                                  save_top_k=cfg.checkpoint.keep_last, monitor="step", mode="max",
                                  enable_version_counter=False)  # rewrite a step's file, never "-v1" beside a bad one
    validation = ValidationImages(out / "samples", **dict(cfg.validation), announce=console_level != "quiet")
    logger = build_logger(cfg.logger, out, resume_step, wandb_options={k: v for k, v in dict(cfg.wandb).items() if v is not None})
    callbacks = ([signal_checkpoint] if signal_checkpoint is not None else []) + [checkpoints, validation,
                                                                                  SkippedSamples(), *extra_callbacks]
    # samples/s, TFLOP/s and MFU in the logs, from FLOPs per sample counted once for this configuration
    callbacks.append(TrainingThroughput(cfg.data.resolution, list(cfg.data.precomputed_keys),
                                        cfg.model.performance.peak_tflops,
                                        window_size=max(2, min(100, int(cfg.trainer.get("log_every_n_steps", 50))))))
    options = console.trainer_options(console_level, dict(cfg.trainer))
    if {**dict(cfg.trainer), **options}.get("enable_progress_bar", True):
        callbacks.append(console.StepProgressBar())
    if console_level == "default" and not cfg.trainer.get("enable_model_summary", False):
        callbacks.append(console.PartsSummary())
    trainer_options = {**dict(cfg.trainer), **options}
    sharded = trainer_options.get("strategy") == STRATEGY_NAME
    # a sharded run writes its checkpoint folders itself, atomically (lightning_modules/sharding.py)
    plugins = [] if sharded else [AtomicCheckpointIO(run_dir=out)]
    if "SLURM_JOB_ID" in os.environ and SLURMEnvironment.detect():
        # Ranks and addresses from SLURM; the requeue is ours (a step-boundary save), not Lightning's in-handler one.
        plugins.append(SLURMEnvironment(auto_requeue=False))
    if sharded:
        devices = trainer_options.get("devices", 1)
        trainer_options["strategy"] = ShardedStrategy(world_size=int(devices) * int(trainer_options.get("num_nodes", 1)),
                                                      after_save=lambda step, path: prune_signal_checkpoints(out, step, path))
    return L.Trainer(**trainer_options, default_root_dir=out, callbacks=callbacks, logger=logger, plugins=plugins)


def run(cfg, ckpt_path: str | None = None, console_level: str = "default") -> dict:
    """Trains one run described by a config that passed the preflight, from ``ckpt_path`` when given;
    returns its final metrics."""
    import lightning as L

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(to_yaml(cfg))

    signal_checkpoint = build_signal_checkpoint(cfg)
    signal_checkpoint.install()  # before the models load: an early signal stops at the first step boundary
    try:
        L.seed_everything(cfg.seed, workers=True, verbose=False)
        datamodule = build_datamodule(cfg)
        module = build_module(cfg)
        resume_step = checkpoint_step(ckpt_path) if ckpt_path else None
        trainer = build_trainer(cfg, resume_step, signal_checkpoint, console_level=console_level)
        if ckpt_path:
            print(f"resuming from {ckpt_path} (step {resume_step})")
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    finally:
        signal_checkpoint.uninstall()
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    metrics["global_step"] = trainer.global_step
    if trainer.is_global_zero:
        if isinstance(trainer.strategy, ShardedStrategy):  # its weights are shards: export the consolidated last step
            module = load_checkpoint_module(out / "checkpoints" / "last.ckpt")
        module.export_pretrained(out / "export")
        (out / "final_metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
        print(f"\nrun folder: {out}\n  checkpoints: {out / 'checkpoints'}\n  samples:     {out / 'samples'}\n"
              f"  logs:        {out / 'logs'}\n  export:      {out / 'export'} (CrossAdapter.from_pretrained)\n"
              f"  generate:    python generate.py --checkpoint {out / 'checkpoints' / 'last.ckpt'} "
              f"--prompt 'a red circle' --output-dir {out / 'generated'}")
        summary = validation_summary(out / "samples")
        if summary:
            print(summary)
    return metrics


def validation_summary(samples: Path) -> str | None:
    """Before/after lines of the shapes analyzer's validation scores (the first and last scored grid):
    the validation prompts, and the seen prompts where there are any."""
    rows = [r for r in read_validation_scores(samples) if "val/shapes_binding" in r["scores"]]
    if not rows:
        return None
    lines = ["validation grids, scored by the shapes analyzer (binding: objects drawn with every attribute "
             "right; one object right: images with at least one object in its colour and shape):"]
    groups = [("validation.prompts", "val/", "grid")]
    if "val/seen_shapes_binding" in rows[-1]["scores"]:
        groups.append(("validation.seen_prompts", "val/seen_", "seen_grid"))
    for group, prefix, grid in groups:
        if len(groups) > 1:
            lines.append(f"  {group}:")
        for label, row in (("before", rows[0]), ("after", rows[-1])) if len(rows) > 1 else (("", rows[0]),):
            scores = row["scores"]
            if f"{prefix}shapes_binding" not in scores:
                continue
            lines.append(f"  {label:<6} step {row['step']:>6}: binding {scores[f'{prefix}shapes_binding']:.3f}   "
                         f"one object right {scores.get(f'{prefix}shapes_any_correct', float('nan')):.3f}   "
                         f"{samples / row[grid]}")
    return "\n".join(lines)


@entry_point("train.py")
def main(argv=None) -> int:
    args = parse_args(argv)
    level = "quiet" if args.quiet else "verbose" if args.verbose else "default"
    console.configure(level)
    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        print(to_yaml(cfg))
        return 0
    with trusted_checkpoints(args.trust_checkpoint):
        return preflight_and_run(cfg, level)


def preflight_and_run(cfg, level: str) -> int:
    ckpt_path = preflight(cfg)  # everything checked before any weights load
    try:
        run(cfg, ckpt_path, console_level=level)
    except Preempted as stop:
        print(stop, file=sys.stderr, flush=True)
        return stop.exit_code
    except CheckpointSaveError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 1
    except NonFiniteStepsError:  # its message names the step, the terms and the last good checkpoint
        raise
    except BaseException as err:  # a bug or a crash after the preflight: say what is kept, keep the traceback
        if Path(cfg.output_dir).is_dir() and not isinstance(err, (SystemExit, KeyboardInterrupt)):
            kept = find_resume_checkpoint(Path(cfg.output_dir))
            print(f"train.py: the run stopped with {type(err).__name__}; what it wrote is kept in {cfg.output_dir} "
                  f"(config.yaml, checkpoints/, logs/); "
                  + (f"the same command resumes from its last checkpoint ({kept})" if kept else
                     "it wrote no checkpoint, so the same command starts it again from the beginning"),
                  file=sys.stderr, flush=True)
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Train the LLM4GEN Cross-Adapter Module.

    python train.py                                   # the embedded tiny default, CPU, minutes
    python train.py --config configs/sd15_t5xl.yaml   # the paper's SD1.5 + T5-XL setup
    python train.py --config CFG dotted.key=value ... # overrides; --print-config shows the result

The run folder is ``output_dir``: config.yaml, checkpoints/ (last.ckpt), samples/, logs/, export/,
final_metrics.json. A restarted run (or a requeued SLURM job) resumes from its newest valid checkpoint.

Set ``LLM4GEN_RECORD_KEYS=<path>`` to append the sample keys of every training batch (and a checksum
of the trainable weights at the end) to ``<path>`` (``<path>.rank<R>`` per rank under DDP); see
lightning_modules.callbacks.KeyRecorder. The cluster tests use it to compare runs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import zipfile
from pathlib import Path

from configs.schema import ConfigError, load_config, to_yaml


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="experiment YAML overlaid on the defaults (configs/*.yaml)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    return parser.parse_args(argv)


def check_sources(cfg) -> None:
    """Every configured model source must exist before the first one loads."""
    from encoders.sources import check_source

    check_source(cfg.model.base.pretrained, "model.base.pretrained")
    check_source(cfg.model.llm.pretrained, "model.llm.pretrained")
    if cfg.model.llm.tokenizer:
        check_source(cfg.model.llm.tokenizer, "model.llm.tokenizer")
    init_from = cfg.model.adapter.init_from
    if init_from and not Path(init_from).exists():
        raise ConfigError(f"model.adapter.init_from={init_from!r} does not exist; give a CrossAdapter "
                          f"save_pretrained folder or the released projector.pth")


def is_readable_checkpoint(path: Path) -> bool:
    """Cheap validity test: torch checkpoints are zip files, and a truncated zip has no central directory."""
    try:
        with zipfile.ZipFile(path) as archive:
            return len(archive.namelist()) > 0
    except (OSError, zipfile.BadZipFile):
        return False


def find_resume_checkpoint(output_dir: Path) -> Path | None:
    """The newest readable checkpoint of a run (step checkpoints, last.ckpt, SLURM hpc_ckpt_*)."""
    candidates = list((output_dir / "checkpoints").glob("*.ckpt")) + list(output_dir.glob("hpc_ckpt_*.ckpt"))
    for path in sorted(candidates, key=lambda p: p.stat().st_mtime, reverse=True):
        if is_readable_checkpoint(path):
            return path
        print(f"warning: skipping unreadable checkpoint {path}", file=sys.stderr)
    return None


def resume_path(cfg) -> str | None:
    if cfg.resume == "never":
        return None
    if cfg.resume == "auto":
        found = find_resume_checkpoint(Path(cfg.output_dir))
        return str(found) if found else None
    if not Path(cfg.resume).is_file():
        raise ConfigError(f"resume={cfg.resume!r} is not a checkpoint file; use 'auto', 'never' or a path")
    return cfg.resume


def build_datamodule(cfg):
    from datamodules.synthetic import ensure_synthetic_shards
    from datamodules.webdataset_datamodule import WebDatasetDataModule

    data = dict(cfg.data)
    if data.pop("synthetic_if_missing"):
        ensure_synthetic_shards(data["shards"], resolution=data["resolution"], seed=cfg.seed)
    objective = cfg.model.objective
    entity_parser = objective.entity_parser if objective.lambda_entity > 0 else None
    return WebDatasetDataModule(**data, seed=cfg.seed, entity_parser=entity_parser)


def build_trainer(cfg):
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    from lightning_modules.callbacks import AtomicCheckpointIO, KeyRecorder, ValidationImages
    from lightning_modules.throughput import TrainingThroughput

    out = Path(cfg.output_dir)
    checkpoints = ModelCheckpoint(dirpath=out / "checkpoints", filename="step={step:07d}", auto_insert_metric_name=False,
                                  every_n_train_steps=cfg.checkpoint.every_n_steps, save_last=True,
                                  save_top_k=cfg.checkpoint.keep_last, monitor="step", mode="max",
                                  enable_version_counter=False)  # rewrite a step's file, never "-v1" beside a bad one
    validation = ValidationImages(out / "samples", **dict(cfg.validation))
    logger = (TensorBoardLogger if cfg.logger == "tensorboard" else CSVLogger)(out, name="logs", version="")
    callbacks = [checkpoints, validation]
    # samples/s, TFLOP/s and MFU in the logs, from FLOPs per sample counted once for this configuration
    callbacks.append(TrainingThroughput(cfg.data.resolution, list(cfg.data.precomputed_keys),
                                        cfg.model.performance.peak_tflops,
                                        window_size=max(2, min(100, int(cfg.trainer.get("log_every_n_steps", 50))))))
    if os.environ.get("LLM4GEN_RECORD_KEYS"):
        callbacks.append(KeyRecorder(os.environ["LLM4GEN_RECORD_KEYS"]))
    plugins = [AtomicCheckpointIO()]
    if "SLURM_JOB_ID" in os.environ and SLURMEnvironment.detect():
        plugins.append(SLURMEnvironment(auto_requeue=True))
    return L.Trainer(**cfg.trainer, default_root_dir=out, callbacks=callbacks, logger=logger,
                     plugins=plugins)


def run(cfg) -> dict:
    """Trains one run described by a validated config; returns its final metrics."""
    import lightning as L
    from omegaconf import OmegaConf

    from lightning_modules.llm4gen import LLM4GenModule

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(to_yaml(cfg))
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    ckpt_path = resume_path(cfg)
    datamodule = build_datamodule(cfg)
    module = LLM4GenModule(OmegaConf.to_container(cfg.model, resolve=True), seed=cfg.seed)
    trainer = build_trainer(cfg)
    if ckpt_path:
        print(f"resuming from {ckpt_path}")
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    metrics["global_step"] = trainer.global_step
    if trainer.is_global_zero:
        module.export_pretrained(out / "export")
        (out / "final_metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
        print(f"\nrun folder: {out}\n  checkpoints: {out / 'checkpoints'}\n  samples:     {out / 'samples'}\n"
              f"  logs:        {out / 'logs'}\n  export:      {out / 'export'} (CrossAdapter.from_pretrained)\n"
              f"  generate:    python generate.py --checkpoint {out / 'checkpoints' / 'last.ckpt'} "
              f"--prompt 'a red circle' --output-dir {out / 'generated'}")
    return metrics


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if args.print_config:
            print(to_yaml(cfg))
            return 0
        check_sources(cfg)
        if cfg.data.precomputed_keys:  # a cache made with other settings is refused before models load
            from datamodules.feature_cache import check_cache_key

            check_cache_key(cfg.data.shards, cfg)
        resume_path(cfg)
    except (ConfigError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    run(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())

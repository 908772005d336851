"""The config-only refusals that used to wait for the models to load (issue 51), with the overrides that make each
and the files they point at: tests/test_setup_refusals.py gives them to every entry point,
tests/test_refusal_parity.py holds the constructors' raises against them."""

from __future__ import annotations

import importlib.util
import json
import string
from pathlib import Path
from typing import Callable, NamedTuple, Optional

import torch

from llm4gen.adapters.cross_adapter import CrossAdapter
from llm4gen.configs import schema
from llm4gen.configs.schema import load_config
from llm4gen.datamodules.synthetic import MARKER
from llm4gen.encoders.sources import resolve_source
from llm4gen.lightning_modules import performance


class Refusal(NamedTuple):
    overrides: list[str]  # $placeholders name the files fixture's paths
    message: str  # text of the paragraph every entry point prints ($placeholders too)
    # (file, function, the check it calls): the constructor's guard; None where a loader outside the scanned
    # packages failed (evaluation/)
    guard: Optional[tuple[str, str, str]] = None
    machine: bool = False  # what the machine that trains lacks: submit.py leaves it to train.py in the job
    setup: Optional[Callable] = None  # (monkeypatch) -> None: make this machine lack it


def no_compiler(monkeypatch):
    monkeypatch.setattr(performance.shutil, "which", lambda name: None)
    monkeypatch.setattr(performance.torch.cuda, "is_available", lambda: False)


def no_dynamo(monkeypatch):
    import torch._dynamo  # torch.compile's front end: imported when a test needs it (about a second)

    monkeypatch.setattr(torch._dynamo, "is_dynamo_supported", lambda: False)


def no_bitsandbytes(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))


MODULE = "lightning_modules/llm4gen.py"
DATAMODULE = "datamodules/webdataset_datamodule.py"
PERFORMANCE = "lightning_modules/performance.py"
REFUSALS = {
    "full UNet in bf16": Refusal(
        ["model.unet_training=full", "model.base.dtype=bfloat16"], "model.unet_training=full needs fp32 master weights",
        (MODULE, "LLM4GenModule._setup_unet_training", "check_full_unet_dtype")),
    "context width": Refusal(
        ["model.base.pretrained=$sd_wide_clip"], "UNet cross_attention_dim 64 != CLIP width 96",
        (MODULE, "LLM4GenModule.__init__", "check_context_width")),
    "connector widths": Refusal(
        ["model.adapter.init_from=$narrow_cam"], "a connector between widths 32 (UNet context) and 384 (LLM)",
        (MODULE, "LLM4GenModule._build_adapter", "connector_widths_message")),
    "SDXL family, SD1.5 UNet": Refusal(
        ["model.base.family=sdxl"], "has a UNet with addition_embed_type=None, not 'text_time'",
        ("encoders/stable_diffusion.py", "load_sdxl", "check_sdxl_unet")),
    "prediction type": Refusal(
        ["model.base.pretrained=$sd_sample_prediction"], "prediction_type 'sample' of the base model's scheduler",
        ("losses/diffusion.py", "diffusion_target", "check_prediction_type")),
    "LLM model type": Refusal(
        ["model.llm.pretrained=$llm_unknown_type"], "model_type 'not_a_model', which transformers does not know",
        ("encoders/llm.py", "load_llm_config", "unknown_llm_type_message")),
    "LLM LoRA targets": Refusal(
        ["model.llm.pretrained=$llm_distilbert", "model.llm.lora_rank=4"],
        "no default LoRA targets for LLM model_type 'distilbert'",
        ("encoders/llm.py", "default_lora_targets", "lora_targets_of")),
    "spaCy pipeline": Refusal(
        ["model.objective.lambda_entity=0.1", "model.objective.entity_parser=xx_no_such_pipeline"],
        "spaCy model 'xx_no_such_pipeline' is not installed",
        ("losses/entity_parser.py", "load_spacy_pipeline", "spacy_model_missing_message")),
    "resampled without epoch_batches": Refusal(
        ["data.resampled=true"], "data.resampled=true draws shards forever",
        (DATAMODULE, "WebDatasetDataModule.__init__", "check_data_stream")),
    "precomputed key": Refusal(
        ["data.precomputed_keys=[latent]"], "unknown data.precomputed_keys ['latent']",
        (DATAMODULE, "WebDatasetDataModule.__init__", "check_data_stream")),
    "prefetch without workers": Refusal(
        ["data.prefetch_factor=2"], "data.prefetch_factor=2 needs num_workers > 0",
        (DATAMODULE, "WebDatasetDataModule.__init__", "check_data_stream")),
    "a shard per (rank, worker)": Refusal(
        ["data.epoch_batches=5", "data.num_workers=8"], "4 shards for 1 ranks x 8 workers",
        (DATAMODULE, "WebDatasetDataModule.setup", "check_shard_slots")),
    "synthetic pattern": Refusal(
        ["data.shards=$files/synthetic/shard-{000000..000009}.tar"], "names 10 shards but the settings write 4",
        ("datamodules/synthetic.py", "ensure_synthetic_shards", "synthetic_shards_plan")),
    "synthetic pattern over folders": Refusal(
        ["data.shards=$files/{a,b}/shard-000000.tar"], "spans several directories",
        ("datamodules/synthetic.py", "ensure_synthetic_shards", "synthetic_shards_plan")),
    "synthetic shards of another world": Refusal(
        ["data.shards=$old_synthetic"], "holds synthetic shards of shapes world version 0",
        ("datamodules/synthetic.py", "ensure_synthetic_shards", "synthetic_shards_plan")),
    "fsdp2 resumes from a file": Refusal(
        ["trainer.strategy=fsdp2", "model.unet_training=full", "resume=$full_unet_checkpoint"],
        "is not a sharded checkpoint folder", ("lightning_modules/sharding.py", "ShardedStrategy.load_checkpoint",
                                               "check_resume_layout")),
    "CLIPScore model": Refusal(
        ["validation.metrics=[clip_score]", "validation.clip_model=$files/no-such-clip"],
        "validation.clip_model: '$files/no-such-clip' is not an existing folder"),  # loaded at the first grid
    "compile backend": Refusal(
        ["model.performance.compile=true", "model.performance.compile_backend=no-such-backend"],
        "compile_backend='no-such-backend' is not a torch.compile backend",
        (PERFORMANCE, "apply_performance", "check_compile_supported")),
    "compile without a compiler": Refusal(
        ["model.performance.compile=true"], "inductor backend on a CPU needs a C++ compiler",
        (PERFORMANCE, "apply_performance", "check_compile_supported"), machine=True, setup=no_compiler),
    "compile where dynamo is not supported": Refusal(
        ["model.performance.compile=true", "model.performance.compile_backend=aot_eager"],
        "torch.compile is not supported on this Python/platform",
        (PERFORMANCE, "apply_performance", "check_compile_supported"), machine=True, setup=no_dynamo),
    "8-bit AdamW without bitsandbytes": Refusal(
        ["model.performance.optimizer=adamw_8bit"], "adamw_8bit needs bitsandbytes",
        (PERFORMANCE, "build_optimizer", "check_optimizer_available"), machine=True, setup=no_bitsandbytes),
}


def mirror(source: Path, target: Path, edits: dict[str, dict]) -> str:
    """``target``: a model folder that is ``source`` (files linked, not copied) except the JSON files in ``edits``,
    whose keys are updated."""
    for path in source.rglob("*"):
        relative = path.relative_to(source)
        if path.is_dir():
            (target / relative).mkdir(parents=True, exist_ok=True)
        elif str(relative) in edits:
            (target / relative).parent.mkdir(parents=True, exist_ok=True)
            (target / relative).write_text(json.dumps({**json.loads(path.read_text()), **edits[str(relative)]}))
        else:
            (target / relative).parent.mkdir(parents=True, exist_ok=True)
            (target / relative).symlink_to(path)
    return str(target)


def write_refusal_files(root: Path) -> dict[str, str]:
    """The model folders, checkpoints and shards REFUSALS and the guards point at, written under ``root``; returns
    the $placeholder -> path table."""
    sd, llm = Path(resolve_source("embedded:shapes-sd")), Path(resolve_source("embedded:minilm"))
    paths = {"files": str(root)}
    paths["sd_wide_clip"] = mirror(sd, root / "sd-wide-clip", {"text_encoder/config.json": {"hidden_size": 96}})
    paths["sd_sample_prediction"] = mirror(sd, root / "sd-sample", {"scheduler/scheduler_config.json":
                                                                    {"prediction_type": "sample"}})
    paths["llm_unknown_type"] = mirror(llm, root / "llm-unknown", {"config.json": {"model_type": "not_a_model"}})
    paths["llm_distilbert"] = mirror(llm, root / "llm-distilbert", {"config.json": {"model_type": "distilbert"}})
    CrossAdapter(clip_dim=32, llm_dim=384, num_heads=4).save_pretrained(root / "narrow-cam")
    paths["narrow_cam"] = str(root / "narrow-cam")
    (root / "old-synthetic").mkdir()
    (root / "old-synthetic" / "shard-000000.tar").write_bytes(b"")
    (root / "old-synthetic" / MARKER).write_text(json.dumps({"shapes_world": 0}))
    paths["old_synthetic"] = str(root / "old-synthetic")
    model = load_config(None, ["model.unet_training=full"]).model  # a checkpoint an unsharded full-UNet run wrote
    torch.save({"state_dict": {"adapter.blocks.0.q_proj.weight": torch.zeros(1), "unet.conv_in.weight": torch.zeros(1)},
                "hyper_parameters": {"model": schema.as_plain(model), "seed": 0}}, root / "full-unet.ckpt")
    paths["full_unet_checkpoint"] = str(root / "full-unet.ckpt")
    (root / "empty-dir").mkdir()
    paths["empty_dir"] = str(root / "empty-dir")
    (root / "not-a-connector").mkdir()
    (root / "not-a-connector" / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    paths["not_a_connector"] = str(root / "not-a-connector")
    torch.save({"weights": torch.zeros(4)}, root / "weights.pt")
    paths["torchfile"] = str(root / "weights.pt")
    return paths


def fill(overrides: list[str], files: dict[str, str]) -> list[str]:
    return [string.Template(o).substitute(files) for o in overrides]

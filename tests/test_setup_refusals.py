"""Every refusal the config alone decides is made before any model loads (issue 51), and stays so.

REFUSALS holds the refusals that used to live in constructors and setup code only (the LightningModule, the
encoders, the datamodule, the objective, the sharded strategy), each with the overrides that make it. Given to
``train.py``, ``submit.py --dry-run`` and ``sweep.py`` (in-process ``main()``, with tripwires on every model load,
training run and submission), each is one paragraph, exit code 2, the same message, and no run folder; and
``load_config`` with the preflight alone refuses it. A refusal that depends on the machine that trains (a C++
compiler, bitsandbytes) is train.py's and a local sweep's; ``submit.py`` leaves it to train.py's own preflight in
the job, which still runs before any model loads.

The parity test is an AST scan of every ``raise`` in adapters/, encoders/, datamodules/ and lightning_modules/
(constructors, their setup code and everything else there), held against INVENTORY, which gives each site a
verdict (keyed by file, function and the first words of its message, not by line):

- ``Refused(name)``: the site is the REFUSALS entry's check, or a constructor's guard that calls it;
- ``Guard(overrides)``: a library guard of a condition the config checks already refuse: load_config and the
  preflight must refuse each set of overrides;
- ``Check(caller)``: the site is part of the preflight itself (the preflight calls ``caller``);
- ``Needs(reason)``: decided by a built model, a batch, a file's contents or runtime state the checks cannot see;
- ``Library(reason)``: an argument no config key sets; ``Command(reason)``: another command's input (export,
  generate, a checkpoint it reads); ``Protocol(reason)``: part of a protocol (``len()``), not a refusal.

A new raise fails the scan until someone writes its verdict down, and a verdict whose site is gone fails too.
Whether a condition is decided by the config alone cannot be read off the code in general, so the scan holds
the one shape it can see against the two verdicts that claim otherwise: a ``Needs`` or ``Library`` site whose
guarding ``if`` reads nothing but config values (names bound to a config section: ``cfg``, ``acfg``,
``self.cfg``, a parameter annotated with a schema section, or a local name taken from one), which is the shape
issue 51's example had (``if cfg.base.dtype != "float32"`` in ``_setup_unet_training``). Each REFUSALS entry
that keeps a constructor guard names it, and the guard must call the entry's check (one condition, one
message). tests/test_bad_inputs.py keeps the refusals that never lived in a constructor.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import shutil
import string
from pathlib import Path
from typing import Callable, NamedTuple, Optional

import pytest
import torch
import yaml

from llm4gen.configs import schema
from llm4gen.configs.errors import UserError
from llm4gen.configs.schema import load_config
from llm4gen.launch.preflight import preflight

REPO_ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("adapters", "encoders", "datamodules", "lightning_modules")


# ---------------------------------------------------------------- the refusals that used to need the models


class Refusal(NamedTuple):
    overrides: list[str]  # $placeholders name the files fixture's paths
    message: str  # text of the paragraph every entry point prints
    guard: Optional[tuple[str, str, str]] = None  # (file, function, the check it calls): the constructor's guard
    machine: bool = False  # what the machine that trains lacks: submit.py leaves it to train.py in the job
    setup: Optional[Callable] = None  # (monkeypatch) -> None: make this machine lack it


def no_compiler(monkeypatch):
    import llm4gen.lightning_modules.performance as performance

    monkeypatch.setattr(performance.shutil, "which", lambda name: None)
    monkeypatch.setattr(performance.torch.cuda, "is_available", lambda: False)


def no_dynamo(monkeypatch):
    import torch._dynamo

    monkeypatch.setattr(torch._dynamo, "is_dynamo_supported", lambda: False)


def no_bitsandbytes(monkeypatch):
    import importlib.util

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


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    from llm4gen.adapters.cross_adapter import CrossAdapter
    from llm4gen.datamodules.synthetic import MARKER
    from llm4gen.encoders.sources import resolve_source

    root = tmp_path_factory.mktemp("setup-refusals")
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


@pytest.fixture
def tripwires(monkeypatch):
    """Loading a model, training, submitting or starting a sweep's run fails the test: the refusal must come first."""
    def refuse(*args, **kwargs):
        raise AssertionError("work started before the bad config was refused")

    import llm4gen.encoders.llm as llm
    import llm4gen.encoders.stable_diffusion as sd
    import llm4gen.launch.sweep as launch_sweep
    from llm4gen.cli import submit as submit_cli
    from llm4gen.cli import sweep as sweep_cli
    from llm4gen.cli import train as train_cli

    for family in sd.LOADERS:
        monkeypatch.setitem(sd.LOADERS, family, refuse)
    monkeypatch.setattr(llm.LLMEncoder, "__init__", refuse)
    monkeypatch.setattr(train_cli, "run", refuse)
    monkeypatch.setattr(sweep_cli, "run_locally", refuse)
    monkeypatch.setattr(sweep_cli, "submit", refuse)
    monkeypatch.setattr(launch_sweep.subprocess, "run", refuse)
    monkeypatch.setattr(submit_cli, "submit", refuse)


@pytest.mark.parametrize("name", REFUSALS)
def test_the_config_checks_alone_refuse_it(name, files, monkeypatch, tmp_path):
    refusal = REFUSALS[name]
    monkeypatch.chdir(tmp_path)
    if refusal.setup:
        refusal.setup(monkeypatch)
    with pytest.raises(UserError, match=None) as refused:
        preflight(load_config(None, [f"output_dir={tmp_path / 'run'}", *fill(refusal.overrides, files)]))
    assert refusal.message in str(refused.value)


@pytest.mark.parametrize("name", REFUSALS)
def test_train_submit_and_sweep_refuse_it_in_one_paragraph_before_anything_loads(name, files, tripwires, monkeypatch,
                                                                                tmp_path, capsys):
    from llm4gen.cli import submit as submit_cli
    from llm4gen.cli import sweep as sweep_cli
    from llm4gen.cli import train as train_cli

    refusal = REFUSALS[name]
    monkeypatch.chdir(tmp_path)  # the default synthetic shards' folder (data/) would be made here
    if refusal.setup:
        refusal.setup(monkeypatch)
    overrides = fill(refusal.overrides, files)
    config = tmp_path / "run.yaml"
    config.write_text(f"output_dir: {tmp_path / 'runs' / 'one'}\n")

    def paragraph(code: int) -> tuple[int, str]:
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) <= 1 and "Traceback" not in err, err
        return code, lines[0].split(": error: ", 1)[1] if lines else ""

    code, message = paragraph(train_cli.main(["--config", str(config), *overrides]))
    assert code == 2 and refusal.message in message
    code, submitted = paragraph(submit_cli.main(["--config", str(config), "--dry-run", *overrides]))
    if refusal.machine:
        assert (code, submitted) == (0, "")  # the job's own train.py refuses it on the node, before any model loads
    else:
        assert (code, submitted) == (2, message)
    capsys.readouterr()
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({"config": str(config), "output_root": str(tmp_path / "sweep"),
                                     "base_overrides": overrides, "grid": {"seed": [0]}}))
    code, swept = paragraph(sweep_cli.main([str(sweep)]))
    assert code == 2 and "no run was started" in swept and swept.endswith(message)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.yaml", "sweep.yaml"], "a refused run wrote files"


def test_a_sharded_folder_is_refused_under_ddp_and_a_file_under_fsdp2(tmp_path):
    from llm4gen.lightning_modules.checkpoint_files import META_FILE, CheckpointError, check_resume_layout

    (tmp_path / "step=4.ckpt").mkdir()
    (tmp_path / "step=4.ckpt" / META_FILE).write_bytes(b"")
    (tmp_path / "last.ckpt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="resumes under trainer.strategy=fsdp2 only"):
        check_resume_layout(tmp_path / "step=4.ckpt", "ddp")
    with pytest.raises(CheckpointError, match="is not a sharded checkpoint folder"):
        check_resume_layout(tmp_path / "last.ckpt", "fsdp2")
    check_resume_layout(tmp_path / "step=4.ckpt", "fsdp2")
    check_resume_layout(tmp_path / "last.ckpt", None)


def test_the_precomputed_keys_are_the_cache_members():
    from llm4gen.configs.choices import PRECOMPUTED_KEYS
    from llm4gen.datamodules.cache_codec import PRECOMPUTED_MEMBERS

    assert set(PRECOMPUTED_KEYS) == set(PRECOMPUTED_MEMBERS)


# ---------------------------------------------------------------- the parity scan


class Verdict(NamedTuple):
    kind: str
    reason: str = ""
    overrides: tuple[tuple[str, ...], ...] = ()
    names: tuple[str, ...] = ()


def Refused(*names):
    return Verdict("refused", names=names)


def Guard(*override_sets):
    return Verdict("guard", overrides=tuple(tuple(o) for o in override_sets))


def Check(caller):
    return Verdict("check", reason=caller)


def Needs(reason):
    return Verdict("needs", reason)


def Library(reason):
    return Verdict("library", reason)


def Command(reason):
    return Verdict("command", reason)


def Protocol(reason):
    return Verdict("protocol", reason)


BATCH = Needs("a batch's tensors")
SAMPLE = Needs("a sample's members (skipped and counted)")
STREAM = Needs("the stream at run time: workers, shard contents, a resumed position")
CHECKPOINT = Needs("a checkpoint's contents or the weights of the built module")
# "file::function" covers every raise in the function; "file::function::words" the raises whose message starts so
INVENTORY = {
    "adapters/connectors.py::build_connector": Guard(["model.adapter.kind=clip"]),
    "adapters/connectors.py::saved_kind": Guard(["model.adapter.init_from=$empty_dir"],
                                                ["model.adapter.init_from=$not_a_connector"]),
    "adapters/cross_adapter.py::CrossAdapterBlock.__init__": Guard(["model.adapter.num_heads=7"]),
    "adapters/cross_adapter.py::CrossAdapter.__init__": Guard(["model.adapter.num_blocks=0"]),
    "adapters/cross_adapter.py::CrossAdapter.fuse": Needs("the features' widths at a forward call"),
    "adapters/cross_adapter.py::convert_released_state_dict": Guard(["model.adapter.init_from=$torchfile"]),
    "adapters/cross_adapter.py::to_released_state_dict": Command("export.py --release: the adapter it is given"),
    "adapters/ella.py::ResamplerBlock.__init__": Guard(["model.adapter.kind=ella", "model.adapter.ella.num_heads=7"]),
    "adapters/ella.py::TimestepAwareConnector.__init__": Guard(["model.adapter.kind=ella",
                                                                "model.adapter.ella.num_blocks=0"]),
    "adapters/ella.py::TimestepAwareConnector.embed_timestep": Needs("the timestep tensor of a forward call"),
    "adapters/ella.py::TimestepAwareConnector.forward": Needs("a forward call without a timestep"),
    "adapters/gated_fusion.py::GatedFusion.__init__": Needs("the built UNet's cross-attention modules"),
    "adapters/gated_fusion.py::GatedFusion.install": Needs("the built UNet's module names against the fusion's"),
    "adapters/gated_fusion.py::GatedFusionProcessor.__call__": Needs("an attention call's inputs"),
    "adapters/layout.py::check_widths": Needs("the features' widths at a forward call"),
    "adapters/release.py::release_overrides": Command("generate.py and evaluate.py --release: the folder given"),
    "encoders/llm.py::LLMFeatures.padded_to": BATCH,
    "encoders/llm.py::LLMEncoder.__init__": Guard(["model.llm.kind=decodr"]),
    "encoders/llm.py::LLMEncoder.from_model": Library("a pipeline's loaded LLM, whose kind the pipeline gives"),
    "encoders/llm.py::num_hidden_layers": Needs("transformers' config class: a config.json may leave the layer "
                                                "count to the class default"),
    "encoders/llm.py::hidden_state_index": Guard(["model.llm.layer=7"], ["model.llm.layer=top"]),
    "encoders/llm.py::normalizes": Guard(["model.llm.layer_norm=maybe"]),
    "encoders/llm.py::run_until.stop": Needs("control flow: stops the LLM's forward pass at the layer read"),
    "encoders/llm.py::run_until": Needs("a model whose forward pass never reaches the layer read"),
    "encoders/llm.py::load_llm_config::re-raise": Needs("transformers' own error for a trusted or unloadable config"),
    "encoders/llm.py::load_llm_config::unknown_llm_type_message()": Refused("LLM model type"),
    "encoders/sdxl.py::add_time_ids": BATCH,
    "encoders/sdxl.py::SdxlTextEncoder.__init__": Library("the text encoder classes it is handed"),
    "encoders/sdxl.py::SdxlTextEncoder.unet_kwargs": BATCH,
    "encoders/sources.py::check_source": Check("check_sources"),
    "encoders/sources.py::load_pretrained": Needs("a model that fails to load from an existing source"),
    "encoders/strict_loading.py::check_loading_info": Needs("the weights a loaded model reports missing or extra"),
    "encoders/weight_files.py": Check("check_weights"),
    "datamodules/batch.py": BATCH,
    "datamodules/cache_codec.py": SAMPLE,
    "datamodules/collate.py": BATCH,
    "datamodules/entity_targets.py::parsed_groups": BATCH,
    "datamodules/entity_targets.py::EntityTargetBuilder.__init__": Library("train.py always gives the sources"),
    "datamodules/entity_targets.py::EntityTargetBuilder.__call__": BATCH,
    "datamodules/shards.py::resolve_shards": Check("check_shards"),
    "datamodules/shards.py::_read_manifest": Check("check_shards"),
    "datamodules/shards.py::iter_tar_samples": SAMPLE,
    "datamodules/shards.py::ShuffleBuffer.__next__": Needs("the iteration protocol"),
    "datamodules/stream.py": STREAM,
    "datamodules/stream.py::ShardStream.__len__": Protocol("len() of an endless stream: Lightning reads the TypeError "
                                                           "as a length it cannot know"),
    "datamodules/synthetic.py::write_synthetic_shards::verbose_share": Library("train.py writes verbose_share 0"),
    "datamodules/synthetic.py::write_synthetic_shards::num_samples": Library("train.py writes its defaults"),
    "datamodules/synthetic.py::write_synthetic_shards::images must be": Guard(["data.resolution=4"]),
    "datamodules/synthetic.py::synthetic_shards_plan::pattern": Refused("synthetic pattern",
                                                                        "synthetic pattern over folders"),
    "datamodules/synthetic.py::synthetic_shards_plan::holds synthetic shards": Refused(
        "synthetic shards of another world"),
    "datamodules/synthetic.py::ensure_synthetic_shards": Library("train.py writes verbose_share 0"),
    "datamodules/synthetic.py::mentions_in_clip_window": Needs("a tokenizer's output for a caption"),
    "datamodules/transforms.py": SAMPLE,
    "datamodules/transforms.py::SampleError.__init__": Library("a skip reason is a name in the code"),
    "datamodules/transforms.py::resize_shorter_side": Guard(["data.resolution=0"]),
    "datamodules/transforms.py::resize_to_cover": Guard(["data.resolution=0"]),
    "datamodules/transforms.py::crop_box::a random crop": Library("the stream always passes its rng"),
    "datamodules/transforms.py::maybe_flip": Library("the stream always passes its rng"),
    "datamodules/webdataset_datamodule.py::WebDatasetDataModule.__init__::WebDatasetDataModule got": Library(
        "keywords of a datamodule built in code; from_config passes the schema's fields"),
    "datamodules/webdataset_datamodule.py::WebDatasetDataModule.__init__::give both rank": Library(
        "rank and world_size of a datamodule built in code"),
    "datamodules/webdataset_datamodule.py::WebDatasetDataModule.__init__::buckets must be": Guard(
        ["data.buckets.enabled=true", "data.buckets.min_aspect=0"]),
    "datamodules/webdataset_datamodule.py::WebDatasetDataModule.on_batch_consumed": Needs("batches reported late"),
    "lightning_modules/callbacks.py": Needs("a checkpoint write failing on the file system"),
    "lightning_modules/checkpoint_files.py": Check("load_checkpoint_checked"),
    "lightning_modules/checkpoint_files.py::check_resume_layout": Refused("fsdp2 resumes from a file"),
    "lightning_modules/console.py::configure": Command("train.py's --quiet / --verbose, not a config key"),
    "lightning_modules/flops.py::latent_size_for": Guard(["data.resolution=31"]),
    "lightning_modules/llm4gen.py::check_checkpoint_keys": CHECKPOINT,
    "lightning_modules/llm4gen.py::load_llm_lora": CHECKPOINT,
    "lightning_modules/llm4gen.py::LLM4GenModule._build_adapter": Refused("connector widths"),
    "lightning_modules/llm4gen.py::LLM4GenModule.context_tokens": BATCH,
    "lightning_modules/llm4gen.py::LLM4GenModule.latents": BATCH,
    "lightning_modules/llm4gen.py::LLM4GenModule.entity_targets::the batch's": BATCH,
    "lightning_modules/llm4gen.py::LLM4GenModule.entity_targets::the entity loss needs": Guard(
        ["model.adapter.kind=ella", "model.objective.lambda_entity=0.1"]),
    "lightning_modules/llm4gen.py::LLM4GenModule._step_is_nonfinite": Needs("a step's loss and gradients"),
    "lightning_modules/llm4gen.py::LLM4GenModule.on_save_checkpoint": CHECKPOINT,
    "lightning_modules/llm4gen.py::LLM4GenModule.on_load_checkpoint": CHECKPOINT,
    "lightning_modules/llm4gen.py::LLM4GenModule.generate": Command("generate(): the prompts a caller passes"),
    "lightning_modules/llm4gen.py::LLM4GenModule.export_release": Command("export.py --release: the checkpoint's run"),
    "lightning_modules/performance.py::check_compile_supported": Refused(
        "compile backend", "compile without a compiler", "compile where dynamo is not supported"),
    "lightning_modules/performance.py::check_optimizer_available": Refused("8-bit AdamW without bitsandbytes"),
    "lightning_modules/performance.py::build_optimizer": Guard(["model.performance.optimizer=sgd"]),
    "lightning_modules/preemption.py::requeue_slurm_job": Needs("the job id SLURM gives the process"),
    "lightning_modules/preemption.py::StepBoundaryCheckpoint": Needs("a signal received while training"),
    "lightning_modules/preemption.py::signal_number": Guard(["slurm.signal=SIGHUP"]),
    "lightning_modules/sampler.py": Command("generate.py and evaluate.py arguments"),
    "lightning_modules/sharding.py::ShardedStrategy.save_checkpoint": Library("storage_options, never passed"),
    "lightning_modules/throughput.py::device_peak_flops": Guard(["model.performance.peak_tflops=0"]),
}


class RaiseSite(NamedTuple):
    file: str
    function: str
    words: str
    node: ast.Raise
    guards: Optional[list[ast.expr]]  # the tests of the ifs it sits under; None inside an except clause
    config_names: frozenset  # names and dotted chains bound to a config section in its function

    @property
    def key(self) -> str:
        return f"{self.file}::{self.function}::{self.words}"


def message_words(node: ast.Raise) -> str:
    """The first words of a raise's message (its first literal text), the function that makes its message, or
    the exception raised: what keys a site in INVENTORY, whatever line it moves to."""
    exc = node.exc
    if exc is None:
        return "re-raise"
    if not isinstance(exc, ast.Call):
        return ast.unparse(exc)
    if exc.args:
        first = exc.args[0]
        if isinstance(first, ast.Constant) and isinstance(first.value, str):
            return first.value.strip()[:40]
        if isinstance(first, ast.JoinedStr):
            text = next((part.value.strip() for part in first.values
                         if isinstance(part, ast.Constant) and len(part.value.strip()) >= 3), "")
            return text[:40]
        if isinstance(first, ast.Call):
            return f"{ast.unparse(first.func)}()"
    return f"{ast.unparse(exc.func)}()"


SCHEMA_SECTIONS = {cls.__name__ for cls in vars(schema).values()
                   if isinstance(cls, type) and dataclasses.is_dataclass(cls)}
# the config sections' usual names: the module's ModelConfig, the datamodule's and the stream's DataConfig
CONFIG_NAMES = {"cfg", "acfg", "self.cfg", "self.data", "self.config.data"}


def dotted(node: ast.expr) -> Optional[str]:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    return ".".join([node.id, *reversed(parts)]) if isinstance(node, ast.Name) else None


def config_names_of(function: ast.FunctionDef) -> frozenset:
    """Names and dotted chains bound to a config section in ``function``: the usual ones, parameters annotated
    with a schema section, and local names assigned from a chain (``kind = acfg.kind``; ``c = self.config`` makes
    ``c.data`` one)."""
    names = set(CONFIG_NAMES)
    for arg in [*function.args.args, *function.args.kwonlyargs]:
        if arg.annotation is not None and any(s in ast.unparse(arg.annotation) for s in SCHEMA_SECTIONS):
            names.add(arg.arg)
    for node in ast.walk(function):
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            chain, alias = dotted(node.value), node.targets[0].id
            if chain is None:
                continue
            names |= {alias + name[len(chain):] for name in list(names)
                      if name == chain or name.startswith(chain + ".")}  # c = self.config: c.data
            if any(chain == n or chain.startswith(n + ".") for n in names):
                names.add(alias)  # kind = acfg.kind
    return frozenset(names)


SAFE_CALLS = {"len", "isinstance", "set", "sorted", "any", "all", "min", "max", "str", "int", "float", "bool",
              "list", "tuple"}


def reads_only_config(test: ast.expr, config_names: frozenset) -> bool:
    """Whether an ``if`` test reads nothing but config values (and constants, comprehension variables, builtins)."""
    bound = {t.id for comp in ast.walk(test) if isinstance(comp, ast.comprehension)
             for t in ast.walk(comp.target) if isinstance(t, ast.Name)}

    def only_config(node: ast.AST) -> bool:
        chain = dotted(node) if isinstance(node, (ast.Attribute, ast.Name)) else None
        if chain is not None:
            root = chain.split(".")[0]
            return (any(chain == n or chain.startswith(n + ".") for n in config_names) or root in bound
                    or root.isupper() or (root in SAFE_CALLS and chain == root))
        if isinstance(node, ast.Call) and not (isinstance(node.func, ast.Name) and node.func.id in SAFE_CALLS):
            return False
        return all(only_config(child) for child in ast.iter_child_nodes(node)
                   if not (isinstance(node, ast.Call) and child is node.func))

    return only_config(test)


def raise_sites() -> list[RaiseSite]:
    sites = []

    def visit(node: ast.AST, file: str, names: list[str], function, guards: Optional[list], config_names):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                visit(child, file, names + [child.name], child, [], config_names_of(child))
            elif isinstance(child, ast.ClassDef):
                visit(child, file, names + [child.name], function, guards, config_names)
            elif isinstance(child, ast.Raise):
                sites.append(RaiseSite(file, ".".join(names), message_words(child), child, guards, config_names))
                visit(child, file, names, function, guards, config_names)
            elif isinstance(child, (ast.If, ast.While)):
                inner = None if guards is None else guards + [child.test]
                for stmt in child.body + child.orelse:
                    visit(ast.Module(body=[stmt], type_ignores=[]), file, names, function, inner, config_names)
            elif isinstance(child, ast.ExceptHandler):
                visit(child, file, names, function, None, config_names)
            else:
                visit(child, file, names, function, guards, config_names)

    for package in SCANNED:
        for path in sorted((REPO_ROOT / package).glob("*.py")):
            relative = str(path.relative_to(REPO_ROOT))
            visit(ast.parse(path.read_text()), relative, [], None, [], frozenset(CONFIG_NAMES))
    return sites


def verdict_of(site: RaiseSite) -> tuple[Optional[str], Optional[Verdict]]:
    """The most specific INVENTORY entry for a site: its words, its function (or a class or function it sits in),
    its file."""
    def covers(key: str) -> bool:
        if key.count("::") == 2:  # by the message's first words
            return site.key.startswith(key)
        return site.key.startswith(key) and site.key[len(key)] in ":."  # a file, a class or a function

    candidates = [(key, verdict) for key, verdict in INVENTORY.items() if covers(key)]
    return max(candidates, key=lambda kv: len(kv[0]), default=(None, None))


@pytest.fixture(scope="module")
def sites() -> list[RaiseSite]:
    return raise_sites()


def test_every_raise_has_a_verdict_and_every_verdict_a_raise(sites):
    assert len(sites) > 100  # the scan sees the packages
    missing = [f"{site.key} (line {site.node.lineno})" for site in sites if verdict_of(site)[1] is None]
    assert not missing, ("raises without a verdict in INVENTORY: decide whether the config alone decides each "
                         "(then move it to the config checks or the preflight, REFUSALS) or say what it needs:\n"
                         + "\n".join(missing))
    used = {verdict_of(site)[0] for site in sites}
    assert not set(INVENTORY) - used, f"verdicts whose raise is gone: {sorted(set(INVENTORY) - used)}"


def test_no_site_that_needs_a_model_reads_only_the_config(sites):
    offending = [f"{site.key} (line {site.node.lineno}): if {' and '.join(ast.unparse(t) for t in site.guards)}"
                 for site in sites if verdict_of(site)[1] and verdict_of(site)[1].kind in ("needs", "library")
                 and site.guards and all(reads_only_config(t, site.config_names) for t in site.guards)]
    assert not offending, ("these raises are decided by config values alone, so load_config or the preflight can "
                           "refuse them before any model loads:\n" + "\n".join(offending))


def test_the_scan_sees_a_config_only_refusal_in_a_constructor():
    """The scan's own check: the issue's example, as it was written, is caught."""
    source = ('def _setup_unet_training(self, cfg):\n    if cfg.unet_training == "full":\n'
              '        if cfg.base.dtype != "float32":\n            raise ValueError("fp32 masters")\n'
              'def build(self, acfg: AdapterConfig):\n    kind = acfg.kind\n    if kind == "x" and len(LIST) > 1:\n'
              '        raise ValueError("x")\n'
              'def load(self, acfg):\n    if Path(acfg.init_from).is_dir() or self.clip.hidden_size != 3:\n'
              '        raise ValueError("y")\n')
    tree = ast.parse(source)
    verdicts = []
    for function in tree.body:
        names = config_names_of(function)
        tests = [node.test for node in ast.walk(function) if isinstance(node, ast.If)]
        verdicts.append(all(reads_only_config(t, names) for t in tests))
    assert verdicts == [True, True, False]


@pytest.mark.parametrize("key", [k for k, v in INVENTORY.items() if v.kind == "guard"])
def test_each_guard_is_refused_by_the_config_checks_alone(key, files, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for overrides in INVENTORY[key].overrides:
        with pytest.raises(UserError):
            preflight(load_config(None, [f"output_dir={tmp_path / 'run'}", *fill(list(overrides), files)]))


def calls_in(tree: ast.AST) -> set[str]:
    return {ast.unparse(node.func).split(".")[-1] for node in ast.walk(tree) if isinstance(node, ast.Call)}


def function_node(file: str, qualname: str) -> ast.AST:
    node: ast.AST = ast.parse((REPO_ROOT / file).read_text())
    for name in qualname.split("."):
        node = next(child for child in ast.iter_child_nodes(node)
                    if isinstance(child, (ast.FunctionDef, ast.ClassDef)) and child.name == name)
    return node


def test_verdicts_name_real_refusals_and_preflight_checks():
    preflight_calls = calls_in(ast.parse((REPO_ROOT / "launch" / "preflight.py").read_text()))
    for key, verdict in INVENTORY.items():
        assert set(verdict.names) <= set(REFUSALS), key
        if verdict.kind == "check":
            assert verdict.reason in preflight_calls, f"{key}: the preflight does not call {verdict.reason}"
        if verdict.kind in ("needs", "library", "command", "protocol"):
            assert verdict.reason, key


@pytest.mark.parametrize("name", [n for n, r in REFUSALS.items() if r.guard])
def test_each_kept_guard_calls_the_check_the_config_path_runs(name):
    file, function, check = REFUSALS[name].guard
    assert check in calls_in(function_node(file, function)), f"{file}::{function} does not call {check}"

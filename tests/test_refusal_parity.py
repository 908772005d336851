"""No constructor refuses what the config checks could have seen: every ``raise`` in adapters/, encoders/,
datamodules/ and lightning_modules/ (constructors, their setup code and everything else there) against a
written verdict.

The scan (tests/helpers/raise_scan.py) finds each raise site; INVENTORY gives each one a verdict, keyed by file,
function and the first words of its message (not by line):

- ``Refused(name)``: the site is a REFUSALS entry's check (tests/helpers/refusals.py), or a constructor's guard
  that raises its message; tests/test_setup_refusals.py gives each entry to train.py, submit.py and sweep.py;
- ``Guard(overrides)``: a library guard of a condition the config checks already refuse: load_config and the
  preflight must refuse each set of overrides;
- ``Check(caller)``: the site is part of the preflight itself (launch/preflight.py calls ``caller``);
- ``Needs(reason)``: decided by a built model, a batch, a file's contents or runtime state the checks cannot see;
- ``Library(reason)``: an argument no config key sets; ``Command(reason)``: another command's input (export,
  generate, a checkpoint it reads); ``Protocol(reason)``: part of a protocol (``len()``), not a refusal.

A new raise fails the scan until someone writes its verdict down, and a verdict whose site is gone fails too.
Whether a condition is decided by the config alone cannot be read off the code in general, so the scan holds the
one shape it can see against the two verdicts that claim otherwise: a ``Needs`` or ``Library`` site whose guarding
``if`` reads nothing but config values (names bound to a config section: ``cfg``, ``acfg``, ``self.cfg``, the
datamodule's ``self.data``, a parameter annotated with a schema section, or a local name taken from one), which
is the shape issue 51's example had (``if cfg.base.dtype != "float32"`` in ``_setup_unet_training``). A
constructor that keeps a guard for a REFUSALS entry must call the entry's check (one condition, one message):
a guard that calls the check has no raise of its own for the scan to see.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import NamedTuple, Optional

import pytest

from llm4gen.configs.errors import UserError
from llm4gen.configs.schema import load_config
from llm4gen.launch.preflight import preflight
from tests.helpers.raise_scan import (
    RaiseSite,
    calls_in,
    config_names_of,
    function_node,
    raise_sites,
    reads_only_config,
)
from tests.helpers.refusals import REFUSALS, fill, write_refusal_files

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    return write_refusal_files(tmp_path_factory.mktemp("guards"))


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
    "adapters/gated_fusion.py::GatedFusion.install_in_controlnet": Needs("a ControlNet's module names and widths"),
    "adapters/gated_fusion.py::GatedIPAdapterProcessor.__call__": Needs("an attention call's inputs and the "
                                                                        "IP-Adapters loaded"),
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
    "datamodules/shards.py::manifest_entries": Check("check_shards"),
    "datamodules/shards.py::_tar_samples": SAMPLE,
    "datamodules/shards.py::_lockstep_samples": SAMPLE,
    "datamodules/captions.py::draw_caption": SAMPLE,
    "datamodules/captions.py::captions_held": SAMPLE,
    "datamodules/captions.py::weighted_choice": Library("draw_caption passes the weights above 0 of the keys a sample "
                                                        "holds; check_caption_mix refuses a mix whose weights are all 0"),
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
    "lightning_modules/run_checkpoints.py::checkpoint_step::re-raise": CHECKPOINT,
    "lightning_modules/safe_loading.py": Needs("a file's contents: what it would unpickle (refused unless "
                                               "--trust-checkpoint)"),
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

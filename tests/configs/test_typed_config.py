"""The schema's dataclasses reach the module and the datamodule as objects: the defaults live in the schema
alone, a mapping (a checkpoint's hyper_parameters) is checked and completed by it, and what a checkpoint
stores stays plain containers."""

import dataclasses
import inspect

import pytest
import torch
from omegaconf import OmegaConf

from llm4gen.cli import train
from llm4gen.configs.errors import ConfigError
from llm4gen.configs.schema import Config, DataConfig, ModelConfig, as_plain, load_config, model_config
from llm4gen.datamodules.webdataset_datamodule import WebDatasetDataModule
from llm4gen.lightning_modules.llm4gen import LLM4GenModule


def test_every_datamodule_keyword_shared_with_the_schema_defaults_to_the_schemas_value():
    schema = DataConfig()
    parameters = inspect.signature(WebDatasetDataModule.__init__).parameters
    # shards is required; buckets takes the resolved sizes (configs.buckets.resolve_buckets), not the section
    shared = [f.name for f in dataclasses.fields(DataConfig) if f.name in parameters and f.name not in ("shards", "buckets")]
    assert len(shared) >= 12  # the constructor takes nearly the whole section
    for name in shared:
        default = parameters[name].default
        expected = getattr(schema, name)
        assert (list(default) if isinstance(expected, list) else default) == expected, name
    assert parameters["seed"].default == Config.seed


def test_the_datamodule_takes_the_typed_section_as_loaded(tmp_path):
    cfg = load_config(None, [f"data.shards={tmp_path}", "data.batch_size=3", "data.shuffle_buffer=5",
                             "data.caption_keys=[caption]", "data.synthetic_if_missing=false", "seed=7"])
    dm = train.build_datamodule(cfg)
    assert (dm.batch_size, dm.shuffle_buffer, dm.caption_keys, dm.seed, dm.resolution) == (3, 5, ("caption",), 7, 32)
    typed = OmegaConf.to_object(cfg.data)
    assert isinstance(typed, DataConfig)
    again = WebDatasetDataModule.from_config(typed, seed=7)
    assert (again.batch_size, again.shuffle_buffer, again.caption_keys) == (3, 5, ("caption",))


def test_model_config_completes_a_partial_mapping_and_refuses_an_unknown_key():
    partial = {"adapter": {"num_heads": 2}, "optim": {"lr": 3e-4}}
    typed = model_config(partial)
    assert isinstance(typed, ModelConfig) and typed.adapter.num_heads == 2 and typed.optim.lr == 3e-4
    assert typed.adapter.kind == ModelConfig().adapter.kind and typed.optim.unet_lr is None  # schema defaults
    with pytest.raises(ConfigError, match=r"adapter\.num_head.*adapter\.num_heads"):
        model_config({"adapter": {"num_head": 2}}, "the checkpoint's model config")
    with pytest.raises(ConfigError, match="optim.lr"):
        model_config({"optim": {"lr": "fast"}})


def test_the_module_holds_the_typed_config_and_stores_plain_containers(tmp_path):
    cfg = load_config(None, ["model.base.pretrained=embedded:tiny-sd", "model.adapter.num_heads=2"])
    module = train.build_module(cfg)
    assert isinstance(module.cfg, ModelConfig) and module.cfg.adapter.num_heads == 2
    stored = module.hparams["model"]
    assert type(stored) is dict and stored == as_plain(cfg.model)
    # what a checkpoint holds rebuilds the same module, parameter for parameter
    rebuilt = LLM4GenModule(stored, seed=module.hparams["seed"])
    assert rebuilt.cfg == module.cfg
    for (name, a), (_, b) in zip(module.adapter.state_dict().items(), rebuilt.adapter.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)

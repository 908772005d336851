"""The schema's dataclasses reach the module and the datamodule as objects: the defaults live in the schema
alone, a mapping (a checkpoint's hyper_parameters) is checked and completed by it, and what a checkpoint
stores stays plain containers."""

import dataclasses

import pytest
import torch
from omegaconf import OmegaConf

from llm4gen.cli import train
from llm4gen.configs.errors import ConfigError
from llm4gen.configs.schema import DataConfig, ModelConfig, as_plain, load_config, model_config
from llm4gen.datamodules.webdataset_datamodule import WebDatasetDataModule
from llm4gen.lightning_modules.llm4gen import LLM4GenModule


def test_the_datamodule_holds_the_schemas_data_section_and_refuses_other_keywords(tmp_path):
    """No default is restated: a keyword-built datamodule holds a DataConfig whose every field not given is the
    schema's, and a keyword that is no field of the section is refused, naming it."""
    dm = WebDatasetDataModule(str(tmp_path), batch_size=3, caption_keys="caption")
    assert isinstance(dm.data, DataConfig)
    expected = dataclasses.replace(DataConfig(), shards=str(tmp_path), batch_size=3, caption_keys=["caption"])
    assert dm.data == expected
    with pytest.raises(TypeError, match="unknown keywords \\['batchsize'\\].*configs.schema.DataConfig"):
        WebDatasetDataModule(str(tmp_path), batchsize=3)


def test_the_datamodule_takes_the_typed_section_as_loaded(tmp_path):
    cfg = load_config(None, [f"data.shards={tmp_path}", "data.batch_size=3", "data.shuffle_buffer=5",
                             "data.caption_keys=[caption]", "data.synthetic_if_missing=false", "seed=7"])
    dm = train.build_datamodule(cfg)
    assert (dm.data.batch_size, dm.data.shuffle_buffer, dm.data.caption_keys, dm.seed, dm.data.resolution) == (3, 5, ["caption"], 7, 32)
    typed = OmegaConf.to_object(cfg.data)
    assert isinstance(typed, DataConfig)
    again = WebDatasetDataModule.from_config(typed, seed=7)
    assert again.data == dataclasses.replace(typed, buckets=DataConfig().buckets)


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

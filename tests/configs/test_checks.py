"""Value checks that must not refuse good configs, the model-config reads behind them, and the one home
of the choice lists and of the feature-cache key's dependencies."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from llm4gen.configs import choices
from llm4gen.configs.checks import check_trainer_values
from llm4gen.configs.model_files import llm_length_limit, model_json
from llm4gen.configs.schema import ConfigError, load_config

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("overrides", [
    [],
    ["trainer.precision=bf16-mixed", "trainer.devices=auto", "trainer.max_time=00:01:00:00"],
    ["trainer.devices=[0,1]", "trainer.val_check_interval=0.5", "trainer.gradient_clip_val=null"],
    ["trainer.precision=32", "trainer.limit_train_batches=0.25", "trainer.enable_progress_bar=false"],
    ["model.objective.entity_layers=8,16", "model.objective.entity_timesteps=[200,800]", "data.resolution=64"],
    ["model.adapter.num_heads=4", "checkpoint.keep_last=-1", "model.objective.min_snr_gamma=5.0"],
])
def test_good_configs_pass(overrides):
    load_config(None, overrides)


def test_the_shipped_experiments_load():
    for path in sorted((REPO_ROOT / "configs").glob("*.yaml")):
        load_config(path)  # hub models not on this machine are not checked, never refused


def test_trainer_values_are_held_against_trainer_annotations():
    with pytest.raises(ConfigError, match="trainer.accumulate_grad_batches' is 'two'.*int"):
        check_trainer_values({"accumulate_grad_batches": "two"})
    with pytest.raises(ConfigError, match="'bf16-mixed'"):
        check_trainer_values({"precision": "bf16_mixed"})
    with pytest.raises(ConfigError, match="max_steps' is True"):
        check_trainer_values({"max_steps": True})  # a bool is not an int here


def test_model_facts_are_read_from_config_files_without_weights(tmp_path):
    unet = model_json("embedded:tiny-sd", "unet/config.json")
    assert unet["cross_attention_dim"] == 64
    assert model_json("embedded:minilm", "config.json")["hidden_size"] == 384
    assert model_json(str(tmp_path), "config.json") is None  # absent: not checked
    assert model_json("nobody/nothing-cached-here", "config.json") is None
    assert llm_length_limit({"max_position_embeddings": 512}, {"model_max_length": 10**30}) == (
        512, "the model's max_position_embeddings")
    assert llm_length_limit({}, {"model_max_length": 256})[0] == 256


def test_resolution_is_checked_against_a_local_vae_config(tmp_path):
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text('{"block_out_channels": [128, 256, 512, 512]}')
    from llm4gen.configs.checks import check_against_models

    cfg = load_config(None, ["data.resolution=516"])
    cfg.model.base.pretrained = str(tmp_path)
    with pytest.raises(ConfigError, match="resolution' is 516.*multiple of 8 \\(e.g. 512 or 520\\)"):
        check_against_models(cfg)
    cfg.data.resolution = 512
    check_against_models(cfg)


def test_choice_lists_have_one_home():
    from llm4gen.datamodules import transforms
    from llm4gen.encoders import llm, sources
    from llm4gen.tools import prepare_sources

    assert transforms.SKIP_REASONS == choices.SAMPLE_SKIP_REASONS
    assert prepare_sources.SKIP_REASONS == choices.PREPARE_SKIP_REASONS
    # what prepare.py reads from a folder is what training finds as an image member
    assert {extension.lstrip(".") for extension in prepare_sources.IMAGE_EXTENSIONS} == set(transforms.IMAGE_EXTENSIONS)
    assert llm.KINDS == choices.LLM_KINDS
    assert tuple(sources.TORCH_DTYPES) == choices.DTYPES


def test_cache_key_covers_every_model_setting_not_explicitly_ignored():
    from llm4gen.tools.cache_key import FIELD_DEPENDENCIES, field_key

    cfg = load_config()
    keys = {name: field_key(cfg, name) for name in FIELD_DEPENDENCIES}
    for section in ("model.base", "model.llm"):
        for setting in OmegaConf.select(cfg, section):
            dotted = f"{section}.{setting}"
            in_key = any(dotted in key for key in keys.values())
            ignored = all(setting in deps[section] for deps in FIELD_DEPENDENCIES.values() if section in deps)
            assert in_key or ignored, f"{dotted} is neither in a cache key nor ignored"
    # A setting added to the LLM section later joins the key by itself.
    cfg = OmegaConf.create(OmegaConf.to_container(cfg))  # plain, so a key the schema lacks can be added
    cfg.model.llm.new_setting = "x"
    assert field_key(cfg, "llm_features")["model.llm.new_setting"] == "x"
    assert "model.llm.new_setting" not in field_key(cfg, "latent_moments")


@pytest.mark.parametrize("which", ["tiny-sd", "tiny-sdxl", "sd15-full", "sdxl-full"])
def test_cross_attention_sides_from_the_config_json_match_the_built_unet(which):
    """The preflight's entity-layer check reads sides from config.json; the capture finds them on the UNet."""
    import json

    from llm4gen.configs.model_files import unet_cross_attention_sides
    from llm4gen.embedded import full_size
    from llm4gen.embedded.tiny import tiny_sd_path
    from llm4gen.embedded.tiny_sdxl import tiny_sdxl_path
    from llm4gen.losses.attention_capture import cross_attention_layer_sides

    if which.endswith("full"):
        unet = full_size.sd15_unet() if which == "sd15-full" else full_size.sdxl_unet()  # on the meta device
    else:
        from diffusers import UNet2DConditionModel

        root = tiny_sd_path() if which == "tiny-sd" else tiny_sdxl_path()
        unet = UNet2DConditionModel.from_pretrained(root / "unet")
    config = json.loads(unet.to_json_string())  # what config.json holds
    built = sorted({h for h, w in cross_attention_layer_sides(unet).values()}, reverse=True)
    assert unet_cross_attention_sides(config) == built
    expected = {"sd15-full": [64, 32, 16, 8], "sdxl-full": [64, 32]}.get(which)
    if expected:
        assert built == expected

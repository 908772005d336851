"""bench/memory_table.py: exact parameter counts of the full-size parts per configuration."""

import importlib.util
import sys
from pathlib import Path

import pytest

from llm4gen.configs.schema import load_config

ROOT = Path(__file__).resolve().parents[2]


def load_table():
    spec = importlib.util.spec_from_file_location("memory_table", ROOT / "bench" / "memory_table.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_parameter_counts_follow_what_trains():
    table = load_table()
    release = load_config(ROOT / "configs" / "sd15_t5xl.yaml")
    unet, adapter, llm_width = table.build_parts(release)
    assert llm_width == 2048
    assert table.count(adapter, True) == 8_663_040  # the released CAM: 8.66M
    assert table.count(unet, True) == 0 and table.count(unet, False) == 859_520_964  # SD1.5's UNet
    # a UNet that trains whole keeps fp32 master weights (the config checks refuse it in bf16)
    full_cfg = load_config(ROOT / "configs" / "sd15_t5xl.yaml", ["model.unet_training=full", "model.base.dtype=float32"])
    full, _, _ = table.build_parts(full_cfg)
    assert table.count(full, True) == 859_520_964
    lora, _, _ = table.build_parts(load_config(ROOT / "configs" / "sd15_t5xl.yaml", ["model.unet_training=lora"]))
    lora_params = table.count(lora, True)
    assert 0 < lora_params < 2_000_000 and table.count(lora, False) == 859_520_964
    assert table.llm_architecture(release).num_parameters() == 1_223_527_424  # T5-XL encoder


@pytest.mark.slow
def test_sharding_splits_what_trains_over_the_gpus_and_adds_two_gathered_blocks():
    table = load_table()
    cfg = load_config(ROOT / "configs" / "sd15_t5xl.yaml", ["model.unet_training=full", "model.base.dtype=float32"])
    cache = {("sd15", "cam", "concat", "full", None, False, 256, 2048): (0.0, 0.0)}  # activations: not checked here
    ddp = table.estimate("ddp", cfg, 512, 8, cache)
    sharded = table.estimate("fsdp2", cfg, 512, 8, cache, gpus=8, sharded=True)
    unet, _, _ = table.build_parts(cfg)
    block = table.largest_sharded_block(unet)
    assert 0 < block < ddp.trainable / 4  # a block, not the UNet
    assert sharded.states == pytest.approx(ddp.states / 8)  # gradients, AdamW moments, EMA: 1/8 on each GPU
    assert sharded.weights == pytest.approx(ddp.weights - ddp.trainable * 4 * 7 / 8 + 2 * block * 2)
    assert sharded.activations == ddp.activations and sharded.peak < ddp.peak


@pytest.mark.slow
def test_the_gated_fusion_counts_two_projections_per_cross_attention_layer():
    table = load_table()
    concat, adapter, _ = table.build_parts(load_config(ROOT / "configs" / "sd15_t5xl.yaml"))
    gated, _, _ = table.build_parts(load_config(ROOT / "configs" / "sd15_t5xl.yaml", ["model.adapter.fusion=gated"]))
    layers = [m for n, m in concat.named_modules() if n.endswith("attn2")]
    assert len(layers) == 16  # SD1.5's cross-attention layers
    expected = sum(2 * 768 * layer.to_k.out_features + 1 for layer in layers)  # keys, values, a gate each
    assert table.count(gated, True) == expected and table.count(concat, True) == 0

"""bench/recaption_cost.py: LLaVA-1.5-7B's FLOPs per image, counted on its published shape (meta device)."""

import importlib.util
import sys
from pathlib import Path

import pytest

from llm4gen.embedded import full_size

ROOT = Path(__file__).resolve().parents[2]


def load_bench():
    spec = importlib.util.spec_from_file_location("recaption_cost", ROOT / "bench" / "recaption_cost.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_the_count_is_llavas_published_size_and_each_decode_step_is_its_matmuls_plus_attention():
    bench = load_bench()
    model = full_size.llava_15_7b("meta")
    assert sum(p.numel() for p in model.parameters()) == 7_063_427_072  # llava-hf/llava-1.5-7b-hf: 7.06B
    flops = bench.recaption_flops(model, prompt_tokens=636, new_tokens=128)
    text = model.config.text_config
    decoder = model.model.language_model
    matmul_weights = sum(p.numel() for n, p in decoder.named_parameters() if p.ndim == 2 and "embed" not in n)
    matmul_weights += model.lm_head.weight.numel()
    attention = 4 * text.hidden_size * text.num_hidden_layers  # QK^T and AV of one query, per cached token
    # the new token attends to the cached ones and itself
    assert flops["decode_step_first"] == 2 * matmul_weights + attention * (636 + 1)
    assert flops["decode_step_last"] == 2 * matmul_weights + attention * (636 + 128)
    assert flops["decode"] == (flops["decode_step_first"] + flops["decode_step_last"]) / 2 * 128
    # the prefill is the same matmuls over the 636 prompt tokens (LM head on the last only) plus causal attention
    assert 636 * 2 * (matmul_weights - model.lm_head.weight.numel()) < flops["prefill"] < 1.05 * 636 * 2 * matmul_weights
    assert 0.35e12 < flops["vision"] < 0.45e12  # ViT-L/14 at 336 px: 577 tokens x 2 x 0.3B, and attention

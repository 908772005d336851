"""IP-Adapter's decoupled attention and the gated fusion in the same cross-attention layer
(adapters/gated_fusion.py ``GatedIPAdapterProcessor``), tested against each alone on one layer: IP-Adapter's
scale at 0 gives the gated fusion's output, the gate closed gives diffusers' ``IPAdapterAttnProcessor2_0`` over
CLIP's tokens, both bitwise; both open, the output is neither's; LLM padding stays out; the fusion installed after
``load_ip_adapter`` composes with it instead of replacing it, and holds none of its weights in the UNet's."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.attention_processor import Attention, IPAdapterAttnProcessor2_0

from llm4gen.adapters.gated_fusion import (
    GatedFusion,
    GatedFusionProcessor,
    GatedIPAdapterProcessor,
    GatedLLMAttention,
)
from llm4gen.pipelines.conditioning import mask_bias

CONTEXT, INNER, CLIP, LLM = 16, 32, 77, 10


@pytest.fixture
def layer():
    torch.manual_seed(0)
    attn = Attention(query_dim=INNER, cross_attention_dim=CONTEXT, heads=4, dim_head=INNER // 4).eval()
    gated = GatedLLMAttention(CONTEXT, INNER)
    ip = IPAdapterAttnProcessor2_0(hidden_size=INNER, cross_attention_dim=CONTEXT, num_tokens=(4,), scale=0.7)
    with torch.no_grad():
        for p in [*gated.parameters(), *ip.parameters()]:
            p.copy_(torch.randn(p.shape) * 0.3)
    g = torch.Generator().manual_seed(1)
    inputs = dict(hidden=torch.randn(2, 64, INNER, generator=g), clip=torch.randn(2, CLIP, CONTEXT, generator=g),
                  llm=torch.randn(2, LLM, CONTEXT, generator=g), image=torch.randn(2, 4, CONTEXT, generator=g))
    real = torch.ones(2, CLIP + LLM, dtype=torch.bool)
    real[1, CLIP + 6:] = False  # the second prompt's last 4 LLM positions are padding
    inputs["mask"] = mask_bias(real, torch.float32)
    return attn, gated, ip, inputs


def both(attn, combined, x, llm=None):
    context = torch.cat([x["clip"], x["llm"] if llm is None else llm], dim=1)
    return combined(attn, x["hidden"], (context, [x["image"]]), x["mask"])


@torch.no_grad()
def test_the_scale_at_zero_gives_the_gated_fusion_and_a_closed_gate_ip_adapter_bitwise(layer):
    attn, gated, ip, x = layer
    fused = GatedFusionProcessor(gated, CLIP)
    combined = GatedIPAdapterProcessor(ip, fused)
    gated_alone = fused(attn, x["hidden"], torch.cat([x["clip"], x["llm"]], dim=1), x["mask"])
    ip_alone = ip(attn, x["hidden"], (x["clip"], [x["image"]]))  # the base's context: CLIP's tokens alone
    opened = both(attn, combined, x)
    assert (opened - gated_alone).abs().max() > 1e-3 and (opened - ip_alone).abs().max() > 1e-3

    combined.scale = [0.0]
    assert torch.equal(both(attn, combined, x), gated_alone)
    combined.scale = [0.7]
    gated.gate.zero_()
    assert torch.equal(both(attn, combined, x), ip_alone)


@torch.no_grad()
def test_llm_padding_reaches_neither_branch(layer):
    attn, gated, ip, x = layer
    combined = GatedIPAdapterProcessor(ip, GatedFusionProcessor(gated, CLIP))
    garbage = x["llm"].clone()
    garbage[1, 6:] = 50.0
    assert torch.equal(both(attn, combined, x, garbage), both(attn, combined, x))
    changed = x["llm"].clone()
    changed[1, :6] += 1.0  # a real position of the same prompt: it changes
    assert (both(attn, combined, x, changed) - both(attn, combined, x))[1].abs().max() > 1e-4


def test_the_fusion_installed_after_ip_adapter_composes_with_it_and_keeps_its_weights_apart():
    from diffusers import UNet2DConditionModel

    from llm4gen.encoders.sources import resolve_source

    unet = UNet2DConditionModel.from_pretrained(resolve_source("embedded:tiny-sd"), subfolder="unet")
    before = set(unet.state_dict())
    fusion = GatedFusion.for_unet(unet, clip_tokens=CLIP)
    processors = {}  # IP-Adapter's processors in every cross-attention layer, as load_ip_adapter sets them
    for name, processor in unet.attn_processors.items():
        attn = unet.get_submodule(name.removesuffix(".processor"))
        processors[name] = (IPAdapterAttnProcessor2_0(attn.to_k.out_features, unet.config.cross_attention_dim)
                            if attn.is_cross_attention else processor)
    unet.set_attn_processor(processors)
    ip_weights = set(unet.state_dict()) - before
    fusion.install(unet)
    cross = [name for name in processors if name.endswith("attn2.processor")]
    installed = [unet.attn_processors[name] for name in cross]
    assert all(isinstance(p, GatedIPAdapterProcessor) for p in installed)
    assert set(unet.state_dict()) - before == ip_weights  # IP-Adapter's projections, none of the fusion's
    fusion.install(unet)  # again: the same processors, not wrapped twice
    assert [unet.attn_processors[name] for name in cross] == installed

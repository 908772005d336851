"""Cross-attention capture: same UNet output as the fused kernel, maps with gradients, layer selection."""

import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from llm4gen.embedded.registry import TINY_UNET
from llm4gen.losses.attention_capture import (
    AttentionStore,
    CapturingAttnProcessor,
    attention_probabilities,
    cross_attention_layer_names,
    cross_attention_layer_sides,
    install_attention_capture,
    remove_attention_capture,
)
from llm4gen.losses.entity import build_entity_targets, entity_loss
from llm4gen.losses.entity_parser import EntityGroup, Word

LLM_TOKENS = 8
TOKENS = 77 + LLM_TOKENS
TINY_LOWEST = [
    "down_blocks.1.attentions.0.transformer_blocks.0.attn2.processor",
    "up_blocks.0.attentions.0.transformer_blocks.0.attn2.processor",
    "up_blocks.0.attentions.1.transformer_blocks.0.attn2.processor",
    "mid_block.attentions.0.transformer_blocks.0.attn2.processor",
]


@pytest.fixture
def unet():
    torch.manual_seed(0)
    model = UNet2DConditionModel(**TINY_UNET).eval()
    model.requires_grad_(False)  # frozen, as in training: only the context needs gradients
    return model


def inputs(batch=2, seed=1):
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, 4, 16, 16, generator=generator)  # (batch, channels, height, width)
    context = torch.randn(batch, TOKENS, 64, generator=generator)  # (batch, 77 + L, dim)
    timesteps = torch.tensor([10, 500][:batch] + [999] * max(0, batch - 2))
    return latents, timesteps, context


def run(unet, latents, timesteps, context, **kwargs):
    return unet(latents, timesteps, encoder_hidden_states=context, **kwargs).sample


@pytest.mark.slow
def test_captured_unet_output_equals_fused_output(unet):
    latents, timesteps, context = inputs()
    with torch.no_grad():
        fused = run(unet, latents, timesteps, context)
        install_attention_capture(unet, cross_attention_layer_names(unet, "all"))
        captured = run(unet, latents, timesteps, context)
    torch.testing.assert_close(captured, fused, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_output_equal_and_masked_tokens_get_no_attention(unet):
    latents, timesteps, context = inputs()
    mask = torch.ones(2, TOKENS)
    mask[0, 80:] = 0  # padding of the first sample's LLM tokens
    mask[1, 77:] = 0
    with torch.no_grad():
        fused = run(unet, latents, timesteps, context, encoder_attention_mask=mask)
        store = install_attention_capture(unet, cross_attention_layer_names(unet, "all"))
        captured = run(unet, latents, timesteps, context, encoder_attention_mask=mask)
        masked_maps = store.maps()
        unmasked = run(unet, latents, timesteps, context)
    torch.testing.assert_close(captured, fused, atol=1e-5, rtol=0)
    assert (captured - unmasked).abs().max() > 1e-3  # the mask changed something
    assert len(masked_maps) == 7
    for probs in masked_maps.values():
        assert probs[0, :, 80:].max() < 1e-4 and probs[1, :, 77:].max() < 1e-4  # exp(-10000) after softmax


@pytest.mark.slow
def test_maps_have_one_row_per_pixel_summing_to_one(unet):
    store = install_attention_capture(unet, cross_attention_layer_names(unet, "all"))
    latents, timesteps, context = inputs()
    with torch.no_grad():
        run(unet, latents, timesteps, context)
    maps = store.maps()
    sides = cross_attention_layer_sides(unet)
    assert list(maps) == [  # UNet execution order
        "down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor",
        "down_blocks.1.attentions.0.transformer_blocks.0.attn2.processor",
        "mid_block.attentions.0.transformer_blocks.0.attn2.processor",
        "up_blocks.0.attentions.0.transformer_blocks.0.attn2.processor",
        "up_blocks.0.attentions.1.transformer_blocks.0.attn2.processor",
        "up_blocks.1.attentions.0.transformer_blocks.0.attn2.processor",
        "up_blocks.1.attentions.1.transformer_blocks.0.attn2.processor",
    ]
    for name, probs in maps.items():
        height, width = sides[name]
        assert probs.shape == (2, height * width, TOKENS)
        assert probs.dtype == torch.float32
        assert (probs >= 0).all()
        torch.testing.assert_close(probs.sum(-1), torch.ones(2, height * width), atol=1e-5, rtol=0)


def test_maps_are_the_head_average_of_softmax_qk(unet):
    name = "mid_block.attentions.0.transformer_blocks.0.attn2.processor"
    attn = unet.get_submodule(name.removesuffix(".processor"))
    seen = {}
    attn.register_forward_pre_hook(
        lambda m, args, kwargs: seen.update(x=args[0], ctx=kwargs["encoder_hidden_states"]), with_kwargs=True
    )
    store = install_attention_capture(unet, [name])
    latents, timesteps, context = inputs()
    with torch.no_grad():
        run(unet, latents, timesteps, context)
        q = attn.to_q(seen["x"]).view(2, -1, attn.heads, 8).transpose(1, 2)
        k = attn.to_k(seen["ctx"]).view(2, -1, attn.heads, 8).transpose(1, 2)
        expected = (q @ k.transpose(-1, -2) / 8**0.5).softmax(-1).mean(1)
    torch.testing.assert_close(store.maps()[name], expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_disabled_store_leaves_the_unet_bitwise_as_it_was(unet, dtype):
    """Sampling a model that trained with the entity loss: nothing is kept, so the captured layers run the fused
    processor they replaced and the output is the uncaptured UNet's, bit for bit (the written-out softmax differs
    from the fused kernel by rounding: in bf16 by up to 3 of 255 pixel levels after a few denoising steps)."""
    unet = unet.to(dtype)
    latents, timesteps, context = (x.to(dtype) if x.is_floating_point() else x for x in inputs())
    with torch.no_grad():
        plain = run(unet, latents, timesteps, context)
        store = install_attention_capture(unet, cross_attention_layer_names(unet, "all"), enabled=False)
        assert torch.equal(run(unet, latents, timesteps, context), plain)
        assert len(store) == 0
        with store.capturing():
            captured = run(unet, latents, timesteps, context)
    assert len(store) == len(cross_attention_layer_names(unet, "all")) and torch.isfinite(captured).all()


def test_processor_matches_fused_one_with_every_option_of_the_attention_module():
    """Group norm, spatial norm, cross norm, 4-d input, residual and rescale: unused by SD's attn2, kept anyway."""
    torch.manual_seed(0)
    attn = Attention(
        query_dim=32, cross_attention_dim=16, heads=4, dim_head=8, residual_connection=True,
        rescale_output_factor=2.0, norm_num_groups=8, spatial_norm_dim=6, cross_attention_norm="layer_norm",
    )
    hidden = torch.randn(2, 32, 4, 4)  # (batch, channels, height, width)
    context, temb = torch.randn(2, 5, 16), torch.randn(2, 6, 2, 2)
    bias = torch.tensor([[0.0, 0, 0, -10000, -10000], [0, 0, 0, 0, 0]]).unsqueeze(1)  # (batch, 1, tokens)
    fused = attn(hidden, context, bias, temb=temb)
    store = AttentionStore()
    attn.set_processor(CapturingAttnProcessor(store, "layer"))
    torch.testing.assert_close(attn(hidden, context, bias, temb=temb), fused, atol=1e-6, rtol=0)
    probs = store.maps()["layer"]
    assert probs.shape == (2, 16, 5) and probs[0, :, 3:].max() < 1e-6


def test_only_chosen_layers_are_replaced(unet):
    chosen = cross_attention_layer_names(unet, "lowest")
    store = install_attention_capture(unet, chosen)
    for name, processor in unet.attn_processors.items():
        if name in chosen:
            assert isinstance(processor, CapturingAttnProcessor) and processor.store is store
            assert processor.name == name
        else:
            assert type(processor) is AttnProcessor2_0, name
    latents, timesteps, context = inputs()
    with torch.no_grad():
        run(unet, latents, timesteps, context)
    assert list(store.maps()) == [  # execution order: down, mid, up
        TINY_LOWEST[0], TINY_LOWEST[3], TINY_LOWEST[1], TINY_LOWEST[2]]


def test_gradient_of_entity_loss_reaches_the_context(unet):
    store = install_attention_capture(unet, cross_attention_layer_names(unet, "lowest"))
    latents, timesteps, context = inputs()
    context.requires_grad_(True)
    run(unet, latents, timesteps, context)
    red, car, bus = Word("red", 0, 3), Word("car", 4, 7), Word("bus", 14, 17)
    groups = [EntityGroup(car, (red,)), EntityGroup(bus, ())]
    targets = build_entity_targets([groups, groups], [[[2], [3], [80]], [[78], [79], [5]]], TOKENS)
    entity_loss(store.maps(), targets).total.backward()
    assert context.grad is not None
    # the loss reads the words' tokens: their context rows get gradient
    assert context.grad[0, [2, 3, 80]].abs().sum() > 0 and context.grad[1, [78, 79, 5]].abs().sum() > 0


@pytest.mark.slow
def test_gradient_checkpointing_gives_the_same_gradient_and_keeps_the_forward_maps(unet):
    names = cross_attention_layer_names(unet, "lowest")
    store = install_attention_capture(unet, names)
    latents, timesteps, context = inputs()

    def context_gradient():
        ctx = context.clone().requires_grad_(True)
        run(unet, latents, timesteps, ctx)
        maps = store.maps()
        sum(m[..., 3].pow(2).sum() for m in maps.values()).backward()
        return ctx.grad, maps

    plain, _ = context_gradient()
    unet.enable_gradient_checkpointing()
    unet.train()  # diffusers checkpoints only in training mode with grad enabled
    checkpointed, forward_maps = context_gradient()
    assert plain.abs().sum() > 0
    torch.testing.assert_close(checkpointed, plain, atol=1e-6, rtol=1e-5)
    after_backward = store.maps()  # recomputation during backward did not overwrite the forward's maps
    assert all(after_backward[n] is forward_maps[n] for n in names)


@pytest.mark.slow
def test_disabled_store_captures_nothing(unet):
    store = install_attention_capture(unet, cross_attention_layer_names(unet, "all"), enabled=False)
    latents, timesteps, context = inputs()
    with torch.no_grad():
        run(unet, latents, timesteps, context)
        assert store.maps() == {} and len(store) == 0
        store.enabled = True
        run(unet, latents, timesteps, context)
        assert len(store) == 7
        store.enabled = False
        run(unet, latents, timesteps, context)  # a new forward clears; disabled, it keeps nothing
        assert len(store) == 0


@pytest.mark.slow
def test_store_holds_only_the_latest_forward(unet):
    store = install_attention_capture(unet, cross_attention_layer_names(unet, "lowest"))
    latents, timesteps, context = inputs()
    with torch.no_grad():
        run(unet, latents, timesteps, context)
        first = store.maps()
        run(unet, latents, timesteps, context + 1.0)
        second = store.maps()
        # classifier-free guidance: a doubled batch is stored as seen
        run(unet, torch.cat([latents] * 2), torch.cat([timesteps] * 2), torch.cat([context, context]))
        doubled = store.maps()
    assert len(second) == len(first) == 4
    assert all(not torch.equal(first[n], second[n]) for n in first)
    assert all(doubled[n].shape == (4, 64, TOKENS) for n in doubled)
    torch.testing.assert_close(doubled[TINY_LOWEST[3]][:2], first[TINY_LOWEST[3]], atol=1e-6, rtol=0)
    store.clear()
    assert store.maps() == {} and len(doubled) == 4  # maps() hands out a copy


def test_lowest_picks_the_tiny_unets_8x8_layers(unet):
    sides = cross_attention_layer_sides(unet)
    assert {sides[n] for n in TINY_LOWEST} == {(8, 8)}
    assert sorted(cross_attention_layer_names(unet, "lowest")) == sorted(TINY_LOWEST)
    assert sorted(cross_attention_layer_names(unet, [8])) == sorted(TINY_LOWEST)
    assert len(cross_attention_layer_names(unet, "all")) == 7
    assert cross_attention_layer_names(unet, [16]) == [
        "down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor",
        "up_blocks.1.attentions.0.transformer_blocks.0.attn2.processor",
        "up_blocks.1.attentions.1.transformer_blocks.0.attn2.processor",
    ]
    # latents of 32 instead of the config's 16 double every side
    assert sorted(cross_attention_layer_names(unet, [16], sample_size=32)) == sorted(TINY_LOWEST)


def test_lowest_on_an_sd15_shaped_unet():
    """SD1.5's block layout (three cross-attention levels, a plain deepest down block) with tiny channels."""
    sd15_shaped = UNet2DConditionModel(
        sample_size=64, block_out_channels=(32, 32, 32, 32), layers_per_block=2, cross_attention_dim=64,
        attention_head_dim=8, norm_num_groups=32,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    )
    sides = cross_attention_layer_sides(sd15_shaped)
    assert sides["down_blocks.0.attentions.1.transformer_blocks.0.attn2.processor"] == (64, 64)
    assert sides["down_blocks.2.attentions.0.transformer_blocks.0.attn2.processor"] == (16, 16)
    assert sides["mid_block.attentions.0.transformer_blocks.0.attn2.processor"] == (8, 8)
    assert sides["up_blocks.1.attentions.2.transformer_blocks.0.attn2.processor"] == (16, 16)
    assert sides["up_blocks.3.attentions.0.transformer_blocks.0.attn2.processor"] == (64, 64)
    lowest = cross_attention_layer_names(sd15_shaped, "lowest")
    assert sorted(lowest) == sorted(
        [f"down_blocks.2.attentions.{i}.transformer_blocks.0.attn2.processor" for i in range(2)]
        + ["mid_block.attentions.0.transformer_blocks.0.attn2.processor"]
        + [f"up_blocks.1.attentions.{i}.transformer_blocks.0.attn2.processor" for i in range(3)]
    )
    assert len(cross_attention_layer_names(sd15_shaped, "all")) == 16
    assert len(cross_attention_layer_names(sd15_shaped, [16, 32])) == 10


def test_bad_selections_name_what_is_available(unet):
    with pytest.raises(ValueError, match=r"\(16, 16\), \(8, 8\)"):
        cross_attention_layer_names(unet, [4])
    with pytest.raises(ValueError, match="'lowest', 'all'"):
        cross_attention_layer_names(unet, "deepest")
    with pytest.raises(ValueError, match="not a cross-attention layer"):
        install_attention_capture(unet, ["mid_block.attentions.0.transformer_blocks.0.attn1.processor"])
    with pytest.raises(ValueError, match="at least one layer"):
        install_attention_capture(unet, [])


def test_names_without_the_processor_suffix_are_accepted(unet):
    store = install_attention_capture(unet, ["mid_block.attentions.0.transformer_blocks.0.attn2"])
    latents, timesteps, context = inputs()
    with torch.no_grad():
        run(unet, latents, timesteps, context)
    assert list(store.maps()) == ["mid_block.attentions.0.transformer_blocks.0.attn2.processor"]


def test_remove_restores_the_fused_processors(unet):
    latents, timesteps, context = inputs()
    with torch.no_grad():
        fused = run(unet, latents, timesteps, context)
    store = install_attention_capture(unet, cross_attention_layer_names(unet, "all"))
    with pytest.raises(RuntimeError, match="already installed"):
        install_attention_capture(unet, cross_attention_layer_names(unet, "lowest"))
    remove_attention_capture(unet)
    assert all(type(p) is AttnProcessor2_0 for p in unet.attn_processors.values())
    assert not unet._forward_pre_hooks  # the clearing hook went with it
    with torch.no_grad():
        torch.testing.assert_close(run(unet, latents, timesteps, context), fused, atol=0, rtol=0)
    assert len(store) == 0
    install_attention_capture(unet, cross_attention_layer_names(unet, "lowest"))  # can be installed again


def test_probabilities_match_sdpa_with_bool_and_additive_masks():
    generator = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(2, 4, 6, 8, generator=generator) for _ in range(3))
    keep = torch.rand(2, 1, 1, 6, generator=generator) > 0.3
    keep[..., 0] = True  # no fully masked row
    additive = torch.zeros(keep.shape).masked_fill(~keep, -10000.0)
    for mask in (None, keep, additive):
        probs = attention_probabilities(query, key, 8**-0.5, mask)
        expected = F.scaled_dot_product_attention(query, key, value, attn_mask=mask)
        torch.testing.assert_close(probs @ value, expected, atol=1e-5, rtol=0)
    assert attention_probabilities(query, key, 8**-0.5, keep).masked_select(~keep).abs().max() == 0


def test_probabilities_are_float32_under_bf16_autocast():
    query, key = torch.randn(1, 2, 5, 8).bfloat16(), torch.randn(1, 2, 7, 8).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        probs = attention_probabilities(query, key, 8**-0.5)
    assert probs.dtype == torch.float32
    torch.testing.assert_close(probs.sum(-1), torch.ones(1, 2, 5), atol=1e-6, rtol=0)


def test_store_records_once_per_forward_and_only_when_enabled():
    store = AttentionStore()
    first, second = torch.rand(1, 4, 3), torch.rand(1, 4, 3)
    store.record("a", first)
    store.record("a", second)
    assert store.maps()["a"] is first
    store.enabled = False
    store.record("b", second)
    assert list(store.maps()) == ["a"]

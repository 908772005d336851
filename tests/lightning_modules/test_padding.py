"""LLM padding carries no attention anywhere: what sits at padded positions, and how many there are, changes no
output of the UNet, in training (online and cached features), in generation, in the exported pipeline, for
every connector kind and both fusions. The release's setting (``use_llm_mask=false``) keeps the authors'
unmasked context, where padding does change the output (so these tests can fail)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from llm4gen.encoders.llm import LLMFeatures
from llm4gen.lightning_modules.attention_split import attention_split
from llm4gen.pipelines import pipeline_from_module
from tests.helpers.modules import fixed_batch, make_module, unet_prediction
from tests.helpers.tolerances import UNET_OUTPUT

SMALL_ELLA = {"adapter.ella": {"num_latents": 8, "num_blocks": 2, "width": 64, "num_heads": 4, "time_channels": 32}}
CONNECTORS = {"cam": {}, "cam_gated": {"adapter.fusion": "gated"}, "mlp": {}, "lavi_bridge": {},
              "ella": SMALL_ELLA}
PROMPTS = ["a red circle and a blue square on a white background", "a green triangle"]


def connector_module(config, name, **overrides):
    torch.manual_seed(0)
    kind = name.split("_gated")[0]
    module = make_module(config, **{"adapter.kind": kind, **CONNECTORS[name], **overrides}).eval()
    if module.fusion is not None:  # open the gates: a closed one would hide the LLM branch altogether
        with torch.no_grad():
            for layer in module.fusion.layers.values():
                layer.gate.fill_(0.7)
    return module


def with_padding(features: LLMFeatures, length: int, value: float) -> LLMFeatures:
    """The same real tokens, padded to ``length`` with ``value`` * noise at every padded position."""
    padded = features.padded_to(length)
    noise = torch.randn(padded.features.shape, generator=torch.Generator().manual_seed(5)) * value
    return LLMFeatures(torch.where(padded.mask[..., None], padded.features, noise), padded.mask)


# the two connectors whose outputs moved most between kernel sets run again in the kernel-set tier (float_sensitive)
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.float_sensitive) if n in ("cam", "cam_gated") else n
                                  for n in CONNECTORS])
def test_what_sits_at_padding_changes_no_training_output(tiny_model_config, name):
    module = connector_module(tiny_model_config, name)
    batch = fixed_batch()
    llm = module.llm(batch.captions)  # (4, max_length): online features, padded to max_length
    online = unet_prediction(module, batch)
    for length, value in ((llm.longest, 0.0), (module.cfg.llm.max_length, 3.0), (module.cfg.llm.max_length, -50.0)):
        cached = with_padding(llm, length, value)  # cached features: another padding length, garbage at it
        other = unet_prediction(module, dataclasses.replace(batch, llm_features=cached.features, llm_mask=cached.mask))
        # float rounding apart (UNET_OUTPUT, 2e-5: features held at another length reach the connector's matmuls in
        # another memory layout, summed in another order); padding left in the softmax moves the output by >= 0.06
        torch.testing.assert_close(other, online, **UNET_OUTPUT.close)
    assert online.abs().max() > 0


@pytest.mark.parametrize("name", ["cam", "cam_gated", "mlp"])
def test_the_release_setting_attends_to_padding(tiny_model_config, name):
    module = connector_module(tiny_model_config, name, **{"adapter.use_llm_mask": False})
    batch = fixed_batch()
    llm = module.llm(batch.captions)
    assert module.conditioning(batch)[0].shape[1] == 77 + module.cfg.llm.max_length  # every position, as published
    garbage = with_padding(llm, module.cfg.llm.max_length, 3.0)
    other = unet_prediction(module, dataclasses.replace(batch, llm_features=garbage.features, llm_mask=garbage.mask))
    assert (other - unet_prediction(module, batch)).abs().max() > 1e-3


def sample(module, **settings):
    return np.asarray(module.generate(PROMPTS, seeds=[0, 1], num_inference_steps=3, guidance_scale=4.0,
                                      output_type="np", **settings))


@pytest.mark.parametrize("name", list(CONNECTORS))
def test_generation_does_not_depend_on_the_padding_length_or_its_values(tiny_model_config, name):
    module = connector_module(tiny_model_config, name)
    expected = sample(module)
    longer = connector_module(tiny_model_config, name, **{"llm.max_length": 64})  # twice the padding
    padded_outputs = connector_module(tiny_model_config, name, **{"llm.zero_padding": False})  # MiniLM's pad outputs
    np.testing.assert_allclose(sample(longer), expected, atol=1e-5, rtol=0)
    np.testing.assert_allclose(sample(padded_outputs), expected, atol=1e-5, rtol=0)
    unmasked = connector_module(tiny_model_config, name, **{"adapter.use_llm_mask": False, "llm.max_length": 64})
    if name != "ella":  # ELLA's queries hold no padding; its resampler's mask is tested with the connector
        assert np.abs(sample(unmasked) - expected).max() > 1e-3


@pytest.mark.parametrize("name", ["cam", "cam_gated", "lavi_bridge", "ella"])
def test_the_exported_pipeline_masks_padding_as_the_module_does(tiny_model_config, name):
    module = connector_module(tiny_model_config, name)
    pipe = pipeline_from_module(module)
    seen = []
    handle = module.unet.register_forward_hook(  # after every pre-hook: what the UNet was called with
        lambda _m, args, kwargs, out: seen.append(kwargs.get("encoder_attention_mask")), with_kwargs=True)
    try:
        generators = [torch.Generator("cpu").manual_seed(s) for s in (0, 1)]
        piped = pipe(PROMPTS, generator=generators, output_type="np", num_inference_steps=3, guidance_scale=4.0).images
    finally:
        handle.remove()
    np.testing.assert_allclose(piped, sample(module), atol=1e-5, rtol=0)
    if name == "ella":
        assert all(mask is None for mask in seen)  # queries: nothing to mask
        return
    mask = seen[0]  # [negative; prompts]: the empty prompt's few tokens, then each prompt's own
    real = module.llm(PROMPTS).mask.sum(1).tolist()
    clip = 77 if module.adapter.layout.starts_with_clip else 0
    assert mask.shape == (4, clip + max(real)) and mask[:, :clip].all()
    assert mask[2:, clip:].sum(1).tolist() == real and mask[:2, clip:].sum(1).tolist() == [module.llm([""]).mask.sum()] * 2
    pipe.register_to_config(llm_max_length=64)  # a folder saved with a longer padding length: the same images
    generators = [torch.Generator("cpu").manual_seed(s) for s in (0, 1)]
    np.testing.assert_allclose(pipe(PROMPTS, generator=generators, output_type="np", num_inference_steps=3,
                                    guidance_scale=4.0).images, piped, atol=1e-5, rtol=0)


def test_the_attention_split_reads_no_padding_when_masked_and_much_without(tiny_model_config):
    masked = attention_split(connector_module(tiny_model_config, "cam"), PROMPTS)
    unmasked = attention_split(connector_module(tiny_model_config, "cam", **{"adapter.use_llm_mask": False}), PROMPTS)
    assert masked.padding == 0 and masked.llm > 0 and masked.clip + masked.llm == pytest.approx(1, abs=1e-5)
    assert unmasked.padding > 0.2 and unmasked.clip < masked.clip  # 32 positions, most of them padding
    assert unmasked.clip + unmasked.llm + unmasked.padding == pytest.approx(1, abs=1e-5)

"""The cost an evaluation prints before it starts: UNet FLOPs counted on the meta twin, calls doubled by
guidance, hours from the device's bf16 peak at the assumed utilisation."""

import pytest

from llm4gen.embedded import full_size
from llm4gen.lightning_modules.generation_cost import ASSUMED_UTILISATION, generation_cost, unet_call_flops


def test_one_sd15_unet_call_at_512_px_is_about_0_8_tflop():
    flops = unet_call_flops(full_size.sd15_unet(), context_tokens=77)  # meta device: no weights
    assert 0.75e12 < flops < 0.85e12
    assert unet_call_flops(full_size.sd15_unet(), context_tokens=77 + 256) > flops  # the CAM's longer context


def test_calls_double_with_guidance_and_hours_follow_the_peak():
    unet = full_size.sd15_unet()
    guided, plain = generation_cost(unet, 77, 100, 30, 7.5), generation_cost(unet, 77, 100, 30, 1.0)
    assert guided.unet_calls == 6000 and plain.unet_calls == 3000
    assert guided.total_flops == pytest.approx(2 * plain.total_flops)
    assert guided.hours("NVIDIA H100 80GB HBM3") == pytest.approx(
        guided.total_flops / (989e12 * ASSUMED_UTILISATION) / 3600)
    assert guided.hours("some unknown accelerator") is None
    assert "A100 ~" in guided.summary() and "H100 ~" in guided.summary(None)

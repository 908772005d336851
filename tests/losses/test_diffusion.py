import pytest
import torch
from diffusers import DDPMScheduler

from llm4gen.losses.diffusion import diffusion_target, min_snr_weights, sample_noise, snr, weighted_mse


def scheduler(kind="epsilon"):
    return DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type=kind)


def test_targets_by_prediction_type():
    latents, noise, t = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3), torch.tensor([10, 900])
    assert torch.equal(diffusion_target(scheduler(), latents, noise, t), noise)
    a = scheduler().alphas_cumprod[t].view(2, 1, 1, 1)
    v = a.sqrt() * noise - (1 - a).sqrt() * latents
    torch.testing.assert_close(diffusion_target(scheduler("v_prediction"), latents, noise, t), v)
    with pytest.raises(ValueError, match="sample"):
        diffusion_target(scheduler("sample"), latents, noise, t)


def test_min_snr_weights():
    s, t = scheduler(), torch.tensor([0, 500, 999])
    ratio = snr(s, t)
    assert ratio[0] > 5 > ratio[2]  # low noise has high SNR
    w = min_snr_weights(s, t, gamma=5.0)
    torch.testing.assert_close(w, torch.clamp(ratio, max=5.0) / ratio)
    assert w[2] == 1.0 and w[0] < 1.0
    wv = min_snr_weights(scheduler("v_prediction"), t, gamma=5.0)
    torch.testing.assert_close(wv, torch.clamp(ratio, max=5.0) / (ratio + 1))


def test_weighted_mse():
    pred, target = torch.zeros(2, 1, 2, 2), torch.tensor([1.0, 2.0]).view(2, 1, 1, 1).expand(2, 1, 2, 2)
    assert weighted_mse(pred, target).item() == pytest.approx((1 + 4) / 2)
    assert weighted_mse(pred, target, torch.tensor([1.0, 0.5])).item() == pytest.approx((1 + 2) / 2)


def test_noise_offset_shifts_channels():
    g = torch.Generator().manual_seed(0)
    base = sample_noise(torch.zeros(2, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    shifted = sample_noise(torch.zeros(2, 4, 8, 8), noise_offset=0.5, generator=g)
    delta = shifted - base
    assert torch.allclose(delta, delta[..., :1, :1].expand_as(delta))  # constant per channel
    assert delta.abs().max() > 0

"""The diffusion objective's pieces as pure functions over tensors (the noise scheduler supplies the
schedule; nothing here holds state)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llm4gen.configs.setup_checks import check_prediction_type


def diffusion_target(noise_scheduler, latents: torch.Tensor, noise: torch.Tensor,
                     timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet is trained to predict, by the base model's prediction type."""
    kind = noise_scheduler.config.prediction_type
    check_prediction_type(kind)  # load_config refuses an unsupported one from the scheduler's config first
    if kind == "epsilon":
        return noise
    return noise_scheduler.get_velocity(latents, noise, timesteps)  # v_prediction


def snr(noise_scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) at each timestep, (batch,)."""
    alphas_cumprod = noise_scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
    return alphas_cumprod / (1 - alphas_cumprod)


def min_snr_weights(noise_scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al., 2023): min(SNR, gamma) / SNR for epsilon targets,
    min(SNR, gamma) / (SNR + 1) for v targets. (batch,)"""
    ratio = snr(noise_scheduler, timesteps)
    clipped = torch.clamp(ratio, max=gamma)
    if noise_scheduler.config.prediction_type == "v_prediction":
        return clipped / (ratio + 1)
    return clipped / ratio


def weighted_mse(prediction: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error per sample, optionally weighted per sample, averaged over the batch."""
    per_sample = F.mse_loss(prediction.float(), target.float(), reduction="none").flatten(1).mean(1)
    if weights is not None:
        per_sample = per_sample * weights
    return per_sample.mean()


def sample_noise(latents: torch.Tensor, noise_offset: float = 0.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """Gaussian noise like ``latents``; ``noise_offset`` adds a per-channel constant (brighter/darker images)."""
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    if noise_offset:
        noise = noise + noise_offset * torch.randn((*latents.shape[:2], 1, 1), generator=generator,
                                                   device=latents.device, dtype=latents.dtype)
    return noise

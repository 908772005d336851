"""The embedded tiny SDXL: a Stable Diffusion XL-shaped model small enough to train on a laptop CPU.

Built like the tiny SD1.5 (``embedded/tiny.py``): random weights from configs (fixed seed), written in
the diffusers SDXL folder layout (``unet/``, ``vae/``, ``text_encoder/``, ``text_encoder_2/``,
``tokenizer/``, ``tokenizer_2/``, ``scheduler/``), so training loads it through the same
``from_pretrained`` path as ``stabilityai/stable-diffusion-xl-base-1.0``. What makes it SDXL-shaped:

- two CLIP text encoders of different widths (32 and 48 here, 768 and 1280 in SDXL), the second a
  ``CLIPTextModelWithProjection`` whose pooled, projected output conditions the UNet; the UNet
  cross-attends to both penultimate hidden states concatenated (80 wide here, 2048 in SDXL);
- the same CLIP BPE for both tokenizers, padded with ``<|endoftext|>`` by the first and ``!`` by the
  second, as SDXL base 1.0 ships them;
- a UNet with ``addition_embed_type="text_time"``: the pooled embedding and six size/crop time ids
  (each embedded in ``addition_time_embed_dim``) are added to the timestep embedding; no cross-attention
  at the highest resolution and several transformer layers per block at the lowest, as in SDXL;
- SDXL's VAE scaling factor (0.13025) and its Euler scheduler config.
"""

from __future__ import annotations

from pathlib import Path

import torch

from embedded.tiny import CLIP_TOKENIZER_DIR, TINY_CLIP, built_once

TINY_SDXL_VERSION = "tiny-sdxl-v1"
ADDITION_TIME_EMBED_DIM = 8
TINY_CLIP_1 = dict(TINY_CLIP, hidden_size=32, intermediate_size=64)
TINY_CLIP_2 = dict(TINY_CLIP, hidden_size=48, intermediate_size=96, projection_dim=48)
TINY_SDXL_UNET = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2), attention_head_dim=(2, 4), use_linear_projection=True,
    cross_attention_dim=TINY_CLIP_1["hidden_size"] + TINY_CLIP_2["hidden_size"],  # 80 (SDXL: 768 + 1280)
    addition_embed_type="text_time", addition_time_embed_dim=ADDITION_TIME_EMBED_DIM,
    projection_class_embeddings_input_dim=6 * ADDITION_TIME_EMBED_DIM + TINY_CLIP_2["projection_dim"],  # 96
    norm_num_groups=32,
)
TINY_SDXL_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64), layers_per_block=1,
    down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    norm_num_groups=32, sample_size=32, scaling_factor=0.13025, force_upcast=True,
)
# SDXL base 1.0's scheduler/scheduler_config.json.
SDXL_SCHEDULER = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    prediction_type="epsilon", steps_offset=1, timestep_spacing="leading", interpolation_type="linear",
    use_karras_sigmas=False,
)


def build_tiny_sdxl(directory, seed: int = 0) -> Path:
    """Writes the tiny SDXL folder (deterministic for a seed) and returns its path."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    with torch.random.fork_rng(devices=[]):  # leave the caller's random stream as it was
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**TINY_SDXL_UNET)
        vae = AutoencoderKL(**TINY_SDXL_VAE)
        text_encoder = CLIPTextModel(CLIPTextConfig(**TINY_CLIP_1))
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**TINY_CLIP_2))
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
        tokenizer=CLIPTokenizer.from_pretrained(CLIP_TOKENIZER_DIR),
        tokenizer_2=CLIPTokenizer.from_pretrained(CLIP_TOKENIZER_DIR, pad_token="!"),
        unet=unet, scheduler=EulerDiscreteScheduler(**SDXL_SCHEDULER))
    pipe.save_pretrained(directory)
    return Path(directory)


def tiny_sdxl_path() -> Path:
    """The tiny SDXL folder in the cache, built on first use."""
    return built_once(TINY_SDXL_VERSION, build_tiny_sdxl)

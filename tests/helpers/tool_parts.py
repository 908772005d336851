"""The tests' tools for the tiny bases: the tiny ControlNet, T2I-Adapter and IP-Adapter of llm4gen.embedded.tools,
control and init images, and community LoRAs in kohya's and diffusers' formats written as files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

from llm4gen.embedded.tools import tiny_controlnet, tiny_t2i_adapter, write_ip_adapter  # noqa: F401 (the tests' parts)


def control_image(seed: int = 0, size: int = 32) -> Image.Image:
    """An edge-map-like control image: a white rectangle outline on black."""
    rng = np.random.default_rng(seed)
    image = np.zeros((size, size, 3), np.uint8)
    top, left = rng.integers(2, size // 3, 2)
    bottom, right = rng.integers(2 * size // 3, size - 2, 2)
    image[top:bottom, [left, right - 1]] = 255
    image[[top, bottom - 1], left:right] = 255
    return Image.fromarray(image)


def scene_image(seed: int = 0, size: int = 32) -> Image.Image:
    """An init image for img2img and inpainting: coloured blocks on grey."""
    rng = np.random.default_rng(seed)
    image = np.full((size, size, 3), 128, np.uint8)
    for _ in range(3):
        top, left = rng.integers(0, size - 8, 2)
        image[top:top + 8, left:left + 8] = rng.integers(0, 256, 3)
    return Image.fromarray(image)


def half_mask(size: int = 32) -> Image.Image:
    """Inpainting's mask: white (repainted) on the right half, black (kept) on the left."""
    mask = np.zeros((size, size), np.uint8)
    mask[:, size // 2:] = 255
    return Image.fromarray(mask)


def lora_targets(model, text_encoder: bool) -> dict[str, torch.nn.Linear]:
    """The linear layers a community SD LoRA trains, by name: the UNet's attention projections, CLIP's
    self-attention's (named as the Hugging Face layout names them, under ``text_model.``)."""
    kinds = (".q_proj", ".k_proj", ".v_proj", ".out_proj") if text_encoder else (".to_q", ".to_k", ".to_v", ".to_out.0")
    layers = {name: module for name, module in model.named_modules()
              if isinstance(module, torch.nn.Linear) and name.endswith(kinds)}
    return {name if name.startswith("text_model.") or not text_encoder else "text_model." + name: module
            for name, module in layers.items()}


def lora_pair(linear: torch.nn.Linear, rank: int, g: torch.Generator, std: float):
    return torch.randn(rank, linear.in_features, generator=g) * std, torch.randn(linear.out_features, rank, generator=g) * std


def write_kohya_lora(unet, text_encoders: list, path: Path, rank: int = 4, seed: int = 0, std: float = 0.2) -> Path:
    """A LoRA in kohya-ss's format (``lora_unet_*``, ``lora_te_*`` or SDXL's ``lora_te1_*`` / ``lora_te2_*``, each with
    ``lora_down`` / ``lora_up`` / ``alpha``), the format most community LoRAs ship in."""
    g = torch.Generator().manual_seed(seed)
    prefixes = ["lora_te_"] if len(text_encoders) == 1 else ["lora_te1_", "lora_te2_"]
    state = {}
    for prefix, model, is_text in [("lora_unet_", unet, False), *[(p, e, True) for p, e in zip(prefixes, text_encoders)]]:
        for name, linear in lora_targets(model, is_text).items():
            key = prefix + name.replace(".", "_")
            state[f"{key}.lora_down.weight"], state[f"{key}.lora_up.weight"] = lora_pair(linear, rank, g, std)
            state[f"{key}.alpha"] = torch.tensor(float(rank))
    save_file(state, str(path))
    return Path(path)


def write_diffusers_lora(unet, text_encoders: list, folder: Path, rank: int = 4, seed: int = 1,
                         std: float = 0.2) -> Path:
    """A LoRA in diffusers' (peft's) format: ``pytorch_lora_weights.safetensors`` with ``unet.*.lora_A/B`` and
    ``text_encoder.*`` (SDXL: and ``text_encoder_2.*``) keys, as ``save_lora_weights`` writes them."""
    g = torch.Generator().manual_seed(seed)
    prefixes = ["text_encoder.", "text_encoder_2."][:len(text_encoders)]
    state = {}
    for prefix, model, is_text in [("unet.", unet, False), *[(p, e, True) for p, e in zip(prefixes, text_encoders)]]:
        for name, linear in lora_targets(model, is_text).items():
            state[f"{prefix}{name}.lora_A.weight"], state[f"{prefix}{name}.lora_B.weight"] = lora_pair(linear, rank,
                                                                                                      g, std)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, str(folder / "pytorch_lora_weights.safetensors"))
    return folder

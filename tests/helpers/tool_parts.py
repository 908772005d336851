"""Tiny versions of the tools Stable Diffusion users stack on a base, built from published configs with random
weights for the tiny bases (32 px images, 16 px latents): a ControlNet made from the base's UNet, a T2I-Adapter, an
IP-Adapter (its image encoder and projection) written as ``load_ip_adapter`` reads it, and community LoRAs in
kohya's and diffusers' formats written as files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file


def randomized(module: torch.nn.Module, seed: int, std: float) -> torch.nn.Module:
    """``module`` with every parameter drawn anew (a zero-initialised output layer would hide a tool's effect)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=g) * std)
    return module


def tiny_controlnet(unet, seed: int = 0):
    """``ControlNetModel.from_unet`` of a tiny base's UNet; its conditioning embedding downsamples the 32 px control
    image once, to the 16 px latents; its zero convolutions drawn small (as a trained ControlNet's are not zero)."""
    from diffusers import ControlNetModel

    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32))
    randomized(controlnet.controlnet_down_blocks, seed, 0.05)
    randomized(controlnet.controlnet_mid_block, seed + 1, 0.05)
    randomized(controlnet.controlnet_cond_embedding.conv_out, seed + 2, 0.05)
    return controlnet.eval()


def tiny_t2i_adapter(unet, seed: int = 0, xl: bool = False):
    """A T2I-Adapter whose features match the tiny UNet's down blocks: SD1.5's adds them inside each block (16 then
    8 px: ``full_adapter``), SDXL's after its first block's downsampler (8 and 8 px: ``full_adapter_xl``)."""
    from diffusers import T2IAdapter

    torch.manual_seed(seed)
    return T2IAdapter(in_channels=3, channels=list(unet.config.block_out_channels), num_res_blocks=1,
                      downscale_factor=4 if xl else 2, adapter_type="full_adapter_xl" if xl else "full_adapter").eval()


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


IMAGE_ENCODER = dict(hidden_size=32, intermediate_size=64, projection_dim=32, num_hidden_layers=2,
                     num_attention_heads=4, image_size=32, patch_size=8)


def write_ip_adapter(unet, folder: Path, seed: int = 0) -> Path:
    """An IP-Adapter for ``unet`` in the layout ``load_ip_adapter(folder, subfolder="", weight_name=...)`` reads: a
    CLIP image encoder with projection (``image_encoder/``) and ``ip_adapter.safetensors`` (the image projection to
    4 context tokens, and a key and value projection for every cross-attention layer, numbered as IP-Adapter's
    release numbers them: 1, 3, 5, ... over the UNet's attention processors)."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    folder = Path(folder)
    CLIPVisionModelWithProjection(CLIPVisionConfig(**IMAGE_ENCODER)).save_pretrained(folder / "image_encoder")
    g = torch.Generator().manual_seed(seed)
    context = unet.config.cross_attention_dim
    state = {"image_proj.proj.weight": torch.randn(4 * context, IMAGE_ENCODER["projection_dim"], generator=g) * 0.2,
             "image_proj.proj.bias": torch.zeros(4 * context),
             "image_proj.norm.weight": torch.ones(context), "image_proj.norm.bias": torch.zeros(context)}
    cross = [name for name in unet.attn_processors if name.endswith("attn2.processor")]
    modules = dict(unet.named_modules())
    for i, name in enumerate(cross):
        inner = modules[name.removesuffix(".processor")].to_k.out_features
        for kind in ("to_k_ip", "to_v_ip"):
            state[f"ip_adapter.{2 * i + 1}.{kind}.weight"] = torch.randn(inner, context, generator=g) * 0.3
    save_file(state, str(folder / "ip_adapter.safetensors"))
    return folder


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

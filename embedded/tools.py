"""Tiny versions of the tools Stable Diffusion users stack on a base, for the tiny bases (32 px images, 16 px
latents), built from published configs with random weights: a ControlNet made from the base's UNet
(``ControlNetModel.from_unet``), a T2I-Adapter whose features fit the UNet's down blocks, and an IP-Adapter (a CLIP
image encoder with projection, the image projection and the decoupled key/value projections) written as
``load_ip_adapter`` reads IP-Adapter's releases. Untrained: they show that a tool's conditioning reaches the image
(the tests, docs/using.md's grid), not what a trained tool draws.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import ControlNetModel, T2IAdapter
from safetensors.torch import save_file
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection


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
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32))
    randomized(controlnet.controlnet_down_blocks, seed, 0.05)
    randomized(controlnet.controlnet_mid_block, seed + 1, 0.05)
    randomized(controlnet.controlnet_cond_embedding.conv_out, seed + 2, 0.05)
    return controlnet.eval()


def tiny_t2i_adapter(unet, seed: int = 0, xl: bool = False):
    """A T2I-Adapter whose features match the tiny UNet's down blocks: SD1.5's adds them inside each block (16 then
    8 px: ``full_adapter``), SDXL's after its first block's downsampler (8 and 8 px: ``full_adapter_xl``)."""
    torch.manual_seed(seed)
    return T2IAdapter(in_channels=3, channels=list(unet.config.block_out_channels), num_res_blocks=1,
                      downscale_factor=4 if xl else 2, adapter_type="full_adapter_xl" if xl else "full_adapter").eval()


IMAGE_ENCODER = dict(hidden_size=32, intermediate_size=64, projection_dim=32, num_hidden_layers=2,
                     num_attention_heads=4, image_size=32, patch_size=8)


def write_ip_adapter(unet, folder: Path, seed: int = 0) -> Path:
    """An IP-Adapter for ``unet`` in the layout ``load_ip_adapter(folder, subfolder="", weight_name=...)`` reads: a
    CLIP image encoder with projection (``image_encoder/``) and ``ip_adapter.safetensors`` (the image projection to
    4 context tokens, and a key and value projection for every cross-attention layer, numbered as IP-Adapter's
    release numbers them: 1, 3, 5, ... over the UNet's attention processors)."""
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

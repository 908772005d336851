"""A diffusers Stable Diffusion (1.5 or XL) written as one checkpoint file in the original (LDM / sgm) layout, as
community checkpoints are distributed: what diffusers' ``from_single_file`` reads (the inverse of its
``convert_ldm_unet_checkpoint``, ``convert_ldm_vae_checkpoint``, ``convert_ldm_clip_checkpoint`` and
``convert_open_clip_checkpoint``, for any number of blocks and layers)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

RESNET = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"), ("conv2", "out_layers.3"),
          ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection"))
UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
            "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
            "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}


def _resnet(rest: str) -> str:
    for diffusers, ldm in RESNET:
        if rest.startswith(diffusers + "."):
            return ldm + rest[len(diffusers):]
    raise KeyError(rest)


def ldm_unet(unet) -> dict[str, torch.Tensor]:
    """``model.diffusion_model.*`` keys of a diffusers UNet2DConditionModel."""
    per_block = unet.config.layers_per_block + 1  # LDM numbers every resnet (+ attention) and the down/upsamplers
    out = {}
    for key, value in unet.state_dict().items():
        parts = key.split(".")
        module = ".".join(parts[:2]) if parts[0] in UNET_TOP or ".".join(parts[:2]) in UNET_TOP else None
        if parts[0] in UNET_TOP:
            name = UNET_TOP[parts[0]] + "." + ".".join(parts[1:])
        elif module in UNET_TOP:
            name = UNET_TOP[module] + "." + ".".join(parts[2:])
        elif parts[0] == "down_blocks":
            block, kind, rest = int(parts[1]), parts[2], ".".join(parts[4:])
            if kind == "downsamplers":  # down_blocks.i.downsamplers.0.conv -> input_blocks.N.0.op
                name = f"input_blocks.{(block + 1) * per_block}.0.op.{rest.split('.', 1)[1]}"
            else:
                index = 1 + block * per_block + int(parts[3])
                name = (f"input_blocks.{index}.0.{_resnet(rest)}" if kind == "resnets"
                        else f"input_blocks.{index}.1.{rest}")
        elif parts[0] == "mid_block":
            kind, layer, rest = parts[1], int(parts[2]), ".".join(parts[3:])
            name = (f"middle_block.{2 * layer}.{_resnet(rest)}" if kind == "resnets" else f"middle_block.1.{rest}")
        elif parts[0] == "up_blocks":
            block, kind, rest = int(parts[1]), parts[2], ".".join(parts[4:])
            if kind == "upsamplers":  # after the block's last resnet (and attention)
                has_attention = hasattr(unet.up_blocks[block], "attentions")
                name = f"output_blocks.{block * per_block + per_block - 1}.{2 if has_attention else 1}.{rest}"
            else:
                index = block * per_block + int(parts[3])
                name = (f"output_blocks.{index}.0.{_resnet(rest)}" if kind == "resnets"
                        else f"output_blocks.{index}.1.{rest}")
        else:
            raise KeyError(key)
        out["model.diffusion_model." + name] = value
    return out


def ldm_vae(vae) -> dict[str, torch.Tensor]:
    """``first_stage_model.*`` keys of a diffusers AutoencoderKL (mid-block attention as 1x1 convolutions)."""
    blocks = len(vae.config.up_block_types)
    attention = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    out = {}
    for key, value in vae.state_dict().items():
        name = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        parts = name.split(".")
        if parts[1] == "down_blocks":
            name = (f"{parts[0]}.down.{parts[2]}.downsample.{'.'.join(parts[5:])}" if parts[3] == "downsamplers"
                    else f"{parts[0]}.down.{parts[2]}.block.{'.'.join(parts[4:])}")
        elif parts[1] == "up_blocks":
            block = blocks - 1 - int(parts[2])
            name = (f"{parts[0]}.up.{block}.upsample.{'.'.join(parts[5:])}" if parts[3] == "upsamplers"
                    else f"{parts[0]}.up.{block}.block.{'.'.join(parts[4:])}")
        elif parts[1] == "mid_block" and parts[2] == "resnets":
            name = f"{parts[0]}.mid.block_{int(parts[3]) + 1}.{'.'.join(parts[4:])}"
        elif parts[1] == "mid_block":
            rest = ".".join(parts[4:])
            for diffusers, ldm in attention.items():
                if rest.startswith(diffusers + "."):
                    rest = ldm + rest[len(diffusers):]
            name = f"{parts[0]}.mid.attn_1.{rest}"
            if value.ndim == 2:
                value = value[:, :, None, None]
        out["first_stage_model." + name] = value
    return out


def ldm_clip(text_encoder, prefix: str) -> dict[str, torch.Tensor]:
    """A CLIP text encoder in the Hugging Face layout (``text_model.*``) under ``prefix``."""
    return {prefix + ("" if key.startswith(("text_model.", "text_projection")) else "text_model.") + key: value
            for key, value in text_encoder.state_dict().items()}


def open_clip(text_encoder, prefix: str) -> dict[str, torch.Tensor]:
    """SDXL's second text encoder in OpenCLIP's layout (fused q/k/v, ``resblocks``, a transposed projection)."""
    state = {key.removeprefix("text_model."): value for key, value in text_encoder.state_dict().items()}
    out = {prefix + "token_embedding.weight": state.pop("embeddings.token_embedding.weight"),
           prefix + "positional_embedding": state.pop("embeddings.position_embedding.weight"),
           prefix + "text_projection": state.pop("text_projection.weight").T.contiguous()}
    for layer in range(text_encoder.config.num_hidden_layers):
        attention = f"encoder.layers.{layer}.self_attn."
        for kind in ("weight", "bias"):
            out[f"{prefix}transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat(
                [state.pop(f"{attention}{p}_proj.{kind}") for p in "qkv"])
    renames = (("final_layer_norm.", "ln_final."), ("encoder.layers.", "transformer.resblocks."),
               ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj"),
               ("self_attn.", "attn."))
    for key, value in state.items():
        for diffusers, original in renames:
            key = key.replace(diffusers, original)
        out[prefix + key] = value
    return out


def write_single_file(pipe, path: Path) -> Path:
    """``pipe`` (a StableDiffusion or StableDiffusionXL pipeline, or an LLM4Gen one: its base) as one ``.safetensors``
    or ``.ckpt`` (``{"state_dict": ...}``, as LDM saved them) file in the original layout."""
    state = {**ldm_unet(pipe.unet), **ldm_vae(pipe.vae)}
    if getattr(pipe, "text_encoder_2", None) is not None:
        state.update(ldm_clip(pipe.text_encoder, "conditioner.embedders.0.transformer."))
        state.update(open_clip(pipe.text_encoder_2, "conditioner.embedders.1.model."))
    else:
        state.update(ldm_clip(pipe.text_encoder, "cond_stage_model.transformer."))
    state = {key: value.detach().contiguous().clone() for key, value in state.items()}
    path = Path(path)
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save({"state_dict": state}, path)
    return path

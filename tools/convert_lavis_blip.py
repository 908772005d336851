"""Convert BLIP's original VQA checkpoint (LAVIS / the BLIP repository's ``model_base_vqa_capfilt_large.pth``,
the model T2I-CompBench's BLIP-VQA score uses) into a transformers ``BlipForQuestionAnswering`` folder at its
native image size: the position embeddings are copied as they are (480 px: 30 x 30 patches + 1), never
interpolated, and the image processor is saved at that size.

    python -m llm4gen.cli.convert_lavis_blip model_base_vqa_capfilt_large.pth --output models/blip-vqa-480
    python evaluate.py ... --blip-model models/blip-vqa-480      # the 480-px model the published scores used

The hub's ``Salesforce/blip-vqa-capfilt-large`` is the same network converted at 384 px (its position
embeddings interpolated 480 -> 384); ``--reference`` (default: that id, or a local copy) provides the
tokenizer, the processor and every config value but the image size. Only the key names change: the vision
tower's timm names (``visual_encoder.blocks.N.attn.qkv``, ``pos_embed``, ``cls_token``, ``norm``) become
transformers' (``vision_model.encoder.layers.N.self_attn.qkv``, ``position_embedding``, ``class_embedding``,
``post_layernorm``); the BERT text encoder and decoder already share transformers' names. The load is
strict: a key that maps nowhere, or a weight the folder would lack, is an error naming it.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Mapping

import torch

from llm4gen.configs.errors import UserError
from llm4gen.encoders.sources import load_pretrained

VISION_RENAMES: tuple[tuple[str, str], ...] = (  # applied in order to keys under visual_encoder.
    (r"^visual_encoder\.cls_token$", "vision_model.embeddings.class_embedding"),
    (r"^visual_encoder\.pos_embed$", "vision_model.embeddings.position_embedding"),
    (r"^visual_encoder\.patch_embed\.proj\.", "vision_model.embeddings.patch_embedding."),
    (r"^visual_encoder\.norm\.", "vision_model.post_layernorm."),
    (r"^visual_encoder\.blocks\.(\d+)\.attn\.proj\.", r"vision_model.encoder.layers.\1.self_attn.projection."),
    (r"^visual_encoder\.blocks\.(\d+)\.attn\.", r"vision_model.encoder.layers.\1.self_attn."),
    (r"^visual_encoder\.blocks\.(\d+)\.norm1\.", r"vision_model.encoder.layers.\1.layer_norm1."),
    (r"^visual_encoder\.blocks\.(\d+)\.norm2\.", r"vision_model.encoder.layers.\1.layer_norm2."),
    (r"^visual_encoder\.blocks\.(\d+)\.mlp\.", r"vision_model.encoder.layers.\1.mlp."),
)
# Momentum copies (BLIP's pretraining distillation), not part of the VQA model: left out, and said so.
MOMENTUM = re.compile(r"(_m\.|_m$|^temp$|queue)")


def transformers_key(key: str) -> str:
    """The transformers name of one LAVIS / BLIP key (text_encoder.* and text_decoder.* keep theirs)."""
    key = key.removeprefix("module.")
    if key.startswith("visual_encoder."):
        for pattern, replacement in VISION_RENAMES:
            renamed = re.sub(pattern, replacement, key)
            if renamed != key:
                return renamed
        raise KeyError(f"visual_encoder key {key!r} has no transformers name (expected timm ViT names)")
    if key.startswith(("text_encoder.", "text_decoder.")):
        return key
    raise KeyError(f"key {key!r} is not part of a BLIP VQA model (visual_encoder, text_encoder, text_decoder)")


def convert_state_dict(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(the state dict under transformers' names, the momentum keys left out)."""
    converted, skipped = {}, []
    for key, value in state.items():
        if MOMENTUM.search(key.removeprefix("module.")):
            skipped.append(key)
            continue
        converted[transformers_key(key)] = value
    # BLIP ties the decoder's output bias to the prediction head's bias; a checkpoint may hold only one
    if "text_decoder.cls.predictions.bias" in converted:
        converted.setdefault("text_decoder.cls.predictions.decoder.bias", converted["text_decoder.cls.predictions.bias"])
    return converted, skipped


def native_image_size(position_embedding: torch.Tensor, patch_size: int) -> int:
    """The image side the position table was trained for: (tokens - 1) = (side / patch)^2."""
    patches = position_embedding.shape[-2] - 1
    side = math.isqrt(patches)
    if side * side != patches:
        raise ValueError(f"position embedding of {patches + 1} tokens is not a square grid plus the class token")
    return side * patch_size


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # the unpickler's and the zip reader's errors share no class
        raise UserError(f"{path} is not a readable torch checkpoint ({str(err).splitlines()[0]})") from None
    state = data.get("model", data) if isinstance(data, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path} holds no state dict of tensors (BLIP's checkpoints keep it under 'model')")
    return state


def convert(checkpoint: str | Path, output: str | Path, reference: str = "Salesforce/blip-vqa-capfilt-large") -> Path:
    """Writes ``output``: the converted model (config at the checkpoint's native size) and the processor."""
    from transformers import BlipConfig, BlipForQuestionAnswering, BlipProcessor

    state, skipped = convert_state_dict(read_checkpoint(Path(checkpoint)))
    config = load_pretrained(BlipConfig.from_pretrained, reference, "--reference (the BLIP config and tokenizer)")
    size = native_image_size(state["vision_model.embeddings.position_embedding"], config.vision_config.patch_size)
    config.vision_config.image_size = size
    model = BlipForQuestionAnswering(config)
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if k != "text_decoder.cls.predictions.decoder.weight"]  # tied
    if missing or result.unexpected_keys:
        raise UserError(f"{checkpoint} does not match BLIP VQA at this config: missing {missing[:5]}, unexpected "
                        f"{result.unexpected_keys[:5]}; is it model_base_vqa_capfilt_large.pth, and --reference a "
                        f"ViT-B BLIP VQA folder?")
    processor = load_pretrained(BlipProcessor.from_pretrained, reference, "--reference (the BLIP processor)")
    processor.image_processor.size = {"height": size, "width": size}
    output = Path(output)
    model.save_pretrained(output)
    processor.save_pretrained(output)
    print(f"{output}: BLIP VQA at {size} px (position embeddings as trained); {len(state)} weights converted"
          f"{f', {len(skipped)} momentum copies left out' if skipped else ''}")
    return output

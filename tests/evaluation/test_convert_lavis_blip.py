"""BLIP's original VQA checkpoint layout (timm ViT names under visual_encoder., BERT under text_encoder. and
text_decoder., a {"model": ...} dict with momentum copies) converts into transformers' BlipForQuestionAnswering
exactly, at the position table's native size, with nothing interpolated."""

import re

import pytest
import torch

from llm4gen.tools.convert_lavis_blip import convert, convert_state_dict, native_image_size, transformers_key

LAVIS_NAMES = (  # transformers -> LAVIS, written from BLIP's vit.py, independently of the converter's table
    (r"^vision_model\.embeddings\.class_embedding$", "visual_encoder.cls_token"),
    (r"^vision_model\.embeddings\.position_embedding$", "visual_encoder.pos_embed"),
    (r"^vision_model\.embeddings\.patch_embedding\.", "visual_encoder.patch_embed.proj."),
    (r"^vision_model\.post_layernorm\.", "visual_encoder.norm."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.self_attn\.projection\.", r"visual_encoder.blocks.\1.attn.proj."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.self_attn\.qkv\.", r"visual_encoder.blocks.\1.attn.qkv."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.layer_norm1\.", r"visual_encoder.blocks.\1.norm1."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.layer_norm2\.", r"visual_encoder.blocks.\1.norm2."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.mlp\.", r"visual_encoder.blocks.\1.mlp."),
)


def lavis_name(key: str) -> str:
    for pattern, replacement in LAVIS_NAMES:
        if re.match(pattern, key):
            return re.sub(pattern, replacement, key)
    assert key.startswith(("text_encoder.", "text_decoder.")), key
    return key


def test_each_vision_key_maps_and_a_foreign_key_is_refused():
    assert transformers_key("visual_encoder.blocks.11.attn.proj.weight") == \
        "vision_model.encoder.layers.11.self_attn.projection.weight"
    assert transformers_key("module.visual_encoder.pos_embed") == "vision_model.embeddings.position_embedding"
    with pytest.raises(KeyError, match="visual_encoder.head.weight"):
        transformers_key("visual_encoder.head.weight")
    with pytest.raises(KeyError, match="vision_proj"):
        transformers_key("vision_proj.weight")
    assert native_image_size(torch.zeros(1, 30 * 30 + 1, 8), 16) == 480


@pytest.mark.slow
def test_a_tiny_lavis_checkpoint_converts_exactly_at_its_native_size(tmp_path):
    from transformers import BlipForQuestionAnswering, BlipProcessor

    from tests.helpers.scorer_models import build_tiny_blip_vqa

    reference = build_tiny_blip_vqa(tmp_path / "reference")  # 32 px, patch 16: 2 x 2 patches
    original = BlipForQuestionAnswering.from_pretrained(reference).state_dict()
    lavis = {lavis_name(k): v.clone() for k, v in original.items() if k != "text_decoder.cls.predictions.decoder.bias"}
    width = lavis["visual_encoder.pos_embed"].shape[-1]
    lavis["visual_encoder.pos_embed"] = torch.randn(1, 3 * 3 + 1, width)  # trained at 48 px, not the reference's 32
    lavis["visual_encoder_m.pos_embed"] = torch.zeros(1)  # a momentum copy: left out
    torch.save({"model": lavis, "config": {}}, tmp_path / "model_base_vqa.pth")

    converted, skipped = convert_state_dict(lavis)
    assert skipped == ["visual_encoder_m.pos_embed"]
    out = convert(tmp_path / "model_base_vqa.pth", tmp_path / "converted", reference=str(reference))
    model = BlipForQuestionAnswering.from_pretrained(out)
    assert model.config.vision_config.image_size == 48
    assert BlipProcessor.from_pretrained(out).image_processor.size == {"height": 48, "width": 48}
    state = model.state_dict()
    assert set(state) == set(original)
    for key, value in state.items():
        expected = lavis["visual_encoder.pos_embed"] if key.endswith("position_embedding") else original[key]
        torch.testing.assert_close(value, expected, rtol=0, atol=0, msg=key)
    pixels = torch.zeros(1, 3, 48, 48)  # runs at 48 px on the table as trained
    assert model.vision_model(pixel_values=pixels).last_hidden_state.shape == (1, 10, width)

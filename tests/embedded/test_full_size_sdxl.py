"""SDXL base 1.0 at full size, from its published configs (embedded/full_size.py), on the meta device: the
parameter counts are the published model's, the CAM fits its 2048-wide context, and one training sample at
1024 px is counted (the figure docs/sdxl.md gives)."""

import pytest
import torch

from llm4gen.adapters.cross_adapter import CrossAdapter
from llm4gen.embedded import full_size


def millions(module) -> int:
    return round(sum(p.numel() for p in module.parameters()) / 1e6)


def test_the_full_size_sdxl_parts_have_the_published_parameter_counts():
    unet, vae = full_size.sdxl_unet(), full_size.sdxl_vae()
    text, text_2 = full_size.clip_l_text(), full_size.openclip_bigg_text()
    assert (millions(unet), millions(text), millions(text_2), millions(vae)) == (2567, 123, 695, 84)
    assert unet.config.cross_attention_dim == text.config.hidden_size + text_2.config.hidden_size == 2048
    # the UNet's added embedding reads the pooled text embedding (1280) and six 256-wide time ids
    assert unet.config.projection_class_embeddings_input_dim == text_2.config.projection_dim + 6 * 256


@pytest.mark.slow
def test_the_cam_on_sdxls_context_and_the_flops_of_one_1024px_sample():
    from llm4gen.lightning_modules.flops import trained_path_flops

    unet = full_size.sdxl_unet().requires_grad_(False)
    with torch.device("meta"):
        cam = CrossAdapter(clip_dim=2048, llm_dim=2048)  # SDXL's context width, T5-XL's features
        context = cam(torch.empty(1, 77, 2048), torch.empty(1, 256, 2048))
    assert context.shape == (1, 77 + 256, 2048) and millions(cam) == 50
    tflops = trained_path_flops(cam, unet, 128, 77, 256) / 1e12  # 1024 px: 128 x 128 latents
    assert 14.0 < tflops < 15.5, tflops  # measured 14.76 (docs/sdxl.md)

"""pipelines/dtypes.py: each part reads its inputs in its own dtype while sampling, the latents stay float32, a
float32 model is untouched, and nothing stays installed after the block."""

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

from llm4gen.embedded.registry import TINY_UNET
from llm4gen.pipelines.dtypes import cast_floats, sampling_dtypes


def tiny_unet(dtype=torch.float32):
    torch.manual_seed(0)
    return UNet2DConditionModel(**TINY_UNET).eval().to(dtype)


def unet_inputs():
    generator = torch.Generator().manual_seed(1)
    return (torch.randn(2, 4, 16, 16, generator=generator), torch.tensor([10, 500]),
            torch.randn(2, 80, 64, generator=generator))  # latents, timesteps, context (batch, tokens, dim)


def test_cast_floats_reaches_into_containers_and_leaves_integers_and_masks():
    value = {"a": torch.ones(2), "b": [torch.ones(1, dtype=torch.float64), torch.arange(3)],
             "c": (torch.ones(1, dtype=torch.bool), "text")}
    cast = cast_floats(value, torch.bfloat16)
    assert cast["a"].dtype == cast["b"][0].dtype == torch.bfloat16
    assert cast["b"][1].dtype == torch.int64 and cast["c"][0].dtype == torch.bool and cast["c"][1] == "text"


def test_a_bf16_unet_reads_float32_inputs_and_returns_float32_and_the_hooks_leave_with_the_block():
    unet = tiny_unet(torch.bfloat16)
    latents, timesteps, context = unet_inputs()
    expected = unet(latents.bfloat16(), timesteps, context.bfloat16(), return_dict=False)[0]
    with torch.no_grad(), sampling_dtypes(unet):
        out = unet(latents, timesteps, encoder_hidden_states=context).sample   # float32 in, as the pipelines give it
        tuple_out = unet(latents, timesteps, context, return_dict=False)[0]
    assert out.dtype == tuple_out.dtype == torch.float32
    assert torch.equal(out, expected.float()) and torch.equal(tuple_out, out)  # the bf16 computation, widened
    assert not unet._forward_pre_hooks and not unet._forward_hooks


def test_a_float32_model_is_bitwise_untouched():
    unet = tiny_unet()
    latents, timesteps, context = unet_inputs()
    with torch.no_grad():
        before = unet(latents, timesteps, context).sample
        with sampling_dtypes(unet):
            assert torch.equal(unet(latents, timesteps, context).sample, before)


def test_the_vae_decodes_latents_of_another_dtype_in_its_own():
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=8, latent_channels=4).eval()
    latents = torch.randn(1, 4, 8, 8, dtype=torch.bfloat16)
    with torch.no_grad():
        expected = vae.decode(latents.float()).sample
        with sampling_dtypes(None, vae):
            decoded = vae.decode(latents).sample  # a bf16 UNet's latents meet the fp32 VAE: no dtype error
            encoded = vae.encode(expected.bfloat16()).latent_dist.mean
    assert decoded.dtype == torch.float32 and torch.equal(decoded, expected)
    assert encoded.dtype == torch.float32
    assert not any(m._forward_pre_hooks for m in vae.modules())

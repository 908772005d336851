"""Frozen LLM token features: T5-style encoder-decoders (encoder only), BERT-style encoders and
decoder-only LLMs (Llama family), behind one interface.

The release runs the T5-XL encoder of RankGen on ``"pre " + prompt``, padded to 256 tokens, and feeds
all 256 token features (padding included) to the CAM; the encoder itself sees the attention mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import transformers
from torch import nn
from transformers import AutoConfig, AutoModel, AutoTokenizer, MT5EncoderModel, T5Config, T5EncoderModel, UMT5EncoderModel

from configs.choices import LLM_KINDS
from encoders.sources import TORCH_DTYPES, ModelSourceError, load_pretrained
from encoders.strict_loading import RANKGEN_HEAD_KEYS, RANKGEN_KEY_MAPPING, load_strict

KINDS = LLM_KINDS
# Encoder-only classes of encoder-decoder families: only the encoder's weights are read into memory
# (T5-XL's encoder is 1.2B of its 2.8B parameters) and the decoder's are dropped by design.
ENCODER_CLASSES = {"t5": T5EncoderModel, "mt5": MT5EncoderModel, "umt5": UMT5EncoderModel}
STRICT_HINT = ("if it is a custom architecture, read its code and set model.llm.trust_remote_code=true; "
               "check model.llm.kind (encoder | encoder-decoder | decoder) against the checkpoint")


@dataclass
class LLMFeatures:
    features: torch.Tensor  # (batch, tokens, llm_dim)
    mask: torch.Tensor      # (batch, tokens) bool, True at real tokens


def detect_kind(config) -> str:
    if getattr(config, "is_encoder_decoder", False):
        return "encoder-decoder"
    architectures = getattr(config, "architectures", None) or []
    if getattr(config, "is_decoder", False) or any(a.endswith("ForCausalLM") for a in architectures):
        return "decoder"
    return "encoder"


class LLMEncoder(nn.Module):
    """Tokenizes prompts and returns one hidden layer's token features of a frozen language model.

    Args:
        pretrained: hub id, local folder or ``embedded:`` name of the model.
        tokenizer: tokenizer source when it differs from the model's (RankGen uses t5-v1_1-xl's).
        kind: ``auto`` (from the model config), ``encoder``, ``encoder-decoder`` or ``decoder``.
        layer: which hidden state (-1: the last, after the final norm).
        max_length: tokens per prompt; shorter prompts are padded to it, longer ones truncated.
        prefix: string prepended to every prompt (the release: ``"pre "``).
        zero_padding: zero the features at padding positions (the release keeps the encoder's outputs
            there; zeros make unpadded caches exact).
    """

    def __init__(self, pretrained: str, tokenizer: str | None = None, kind: str = "auto", layer: int = -1,
                 max_length: int = 256, prefix: str = "", zero_padding: bool = True, dtype: torch.dtype = torch.float32,
                 revision: str | None = None, trust_remote_code: bool = False):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"llm kind {kind!r} is not one of {KINDS}")
        common = dict(revision=revision, trust_remote_code=trust_remote_code)
        config = load_llm_config(pretrained, revision, trust_remote_code)
        self.kind = detect_kind(config) if kind == "auto" else kind
        self.tokenizer = load_pretrained(AutoTokenizer.from_pretrained, tokenizer or pretrained,
                                         "model.llm.tokenizer", **common)
        if self.tokenizer.pad_token is None:  # Llama-family tokenizers ship without one
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.padding_side = "right"  # real tokens first: causal features do not see the padding
        self.model = load_llm_model(pretrained, config, self.kind, dtype, revision, trust_remote_code)
        self.layer, self.max_length, self.prefix, self.zero_padding = layer, max_length, prefix, zero_padding
        self.requires_grad_(False).eval()

    @classmethod
    def from_config(cls, cfg) -> "LLMEncoder":
        """From the ``model.llm`` config section."""
        return cls(cfg.pretrained, tokenizer=cfg.tokenizer, kind=cfg.kind, layer=cfg.layer, max_length=cfg.max_length,
                   prefix=cfg.prefix, zero_padding=cfg.zero_padding, dtype=TORCH_DTYPES[cfg.dtype],
                   revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)

    @property
    def hidden_size(self) -> int:
        config = self.model.config
        return getattr(config, "d_model", None) or config.hidden_size

    def tokenize(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        return self.tokenizer([self.prefix + p for p in prompts], max_length=self.max_length,
                              padding="max_length", truncation=True, return_tensors="pt")

    @torch.no_grad()
    def forward(self, prompts: list[str]) -> LLMFeatures:
        tokens = self.tokenize(prompts).to(self.model.device)
        kwargs = dict(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        if self.kind == "decoder":
            kwargs["use_cache"] = False
        if self.layer == -1:
            hidden = self.model(**kwargs).last_hidden_state
        else:
            hidden = self.model(**kwargs, output_hidden_states=True).hidden_states[self.layer]
        mask = tokens["attention_mask"].bool()
        if self.zero_padding:
            hidden = hidden * mask[..., None].to(hidden.dtype)
        return LLMFeatures(features=hidden, mask=mask)  # (batch, max_length, llm_dim)


def load_llm_config(pretrained: str, revision: str | None = None, trust_remote_code: bool = False):
    """The model config; a T5-shaped config of a custom ``model_type`` (RankGen's remote-code config) is
    read as a T5Config when remote code is not trusted."""
    common = dict(revision=revision, trust_remote_code=trust_remote_code)
    try:
        return load_pretrained(AutoConfig.from_pretrained, pretrained, "model.llm.pretrained", **common)
    except (ValueError, KeyError) as err:
        if trust_remote_code or isinstance(err, ModelSourceError):
            raise
        raw, _ = load_pretrained(T5Config.get_config_dict, pretrained, "model.llm.pretrained", revision=revision)
        if not {"d_model", "num_heads", "num_layers", "d_kv"} <= set(raw):
            raise ValueError(f"model.llm.pretrained={pretrained!r}: its config.json has model_type "
                             f"{raw.get('model_type')!r}, which transformers does not know and which is not T5-shaped. "
                             f"Read its code and set model.llm.trust_remote_code=true, or point at a standard "
                             f"checkpoint.") from err
        return T5Config.from_dict({k: v for k, v in raw.items() if k not in ("model_type", "auto_map", "architectures")})


def load_llm_model(pretrained: str, config, kind: str, dtype: torch.dtype, revision: str | None = None,
                   trust_remote_code: bool = False) -> nn.Module:
    """The frozen LLM (for encoder-decoders, its encoder), loaded strictly (encoders/strict_loading.py)."""
    what = "model.llm.pretrained"
    common = dict(dtype=dtype, revision=revision, trust_remote_code=trust_remote_code)
    encoder_class = ENCODER_CLASSES.get(getattr(config, "model_type", None))
    if kind == "encoder-decoder" and encoder_class is not None and not trust_remote_code:
        # Plain T5 (encoder-decoder) and RankGen (t5_encoder. prefix + projection head) both map here.
        return load_strict(encoder_class.from_pretrained, pretrained, what, allowed_unexpected=RANKGEN_HEAD_KEYS,
                           hint=STRICT_HINT, config=config, key_mapping=RANKGEN_KEY_MAPPING, **common).get_encoder()
    # The checkpoint's own architecture (LlamaForCausalLM, BertModel, ...), so that every saved weight,
    # task heads included, has a place; the backbone is taken from it after the strict load.
    architectures = getattr(config, "architectures", None) or []
    model_class = getattr(transformers, architectures[0], None) if architectures and not trust_remote_code else None
    model = load_strict((model_class or AutoModel).from_pretrained, pretrained, what, hint=STRICT_HINT,
                        **({"config": config} if not trust_remote_code else {}), **common)
    return model.get_encoder() if kind == "encoder-decoder" else model.base_model

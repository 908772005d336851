"""Frozen LLM token features: T5-style encoder-decoders (encoder only), BERT-style encoders and
decoder-only LLMs (Llama family), behind one interface.

The release runs the T5-XL encoder of RankGen on ``"pre " + prompt``, padded to 256 tokens, and feeds
all 256 token features (padding included) to the CAM; the encoder itself sees the attention mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoTokenizer

from configs.choices import LLM_KINDS
from encoders.sources import TORCH_DTYPES, load_pretrained

KINDS = LLM_KINDS


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
        config = load_pretrained(AutoConfig.from_pretrained, pretrained, "model.llm.pretrained", **common)
        self.kind = detect_kind(config) if kind == "auto" else kind
        self.tokenizer = load_pretrained(AutoTokenizer.from_pretrained, tokenizer or pretrained,
                                         "model.llm.tokenizer", **common)
        if self.tokenizer.pad_token is None:  # Llama-family tokenizers ship without one
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.padding_side = "right"  # real tokens first: causal features do not see the padding
        model = load_pretrained(AutoModel.from_pretrained, pretrained, "model.llm.pretrained", dtype=dtype, **common)
        self.model = model.get_encoder() if self.kind == "encoder-decoder" else model
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

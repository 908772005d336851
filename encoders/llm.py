"""Frozen LLM token features: T5-style encoder-decoders (encoder only), BERT-style encoders and
decoder-only LLMs (Llama family), behind one interface.

The release runs the T5-XL encoder of RankGen on ``"pre " + prompt``, padded to 256 tokens, and feeds
all 256 token features (padding included) to the CAM; the encoder itself sees the attention mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoTokenizer,
    MT5EncoderModel,
    T5Config,
    T5EncoderModel,
    UMT5EncoderModel,
)

from llm4gen.configs.choices import LLM_KINDS
from llm4gen.configs.errors import ConfigError
from llm4gen.configs.model_files import llm_layer_count
from llm4gen.configs.schema import default_llm_prefix
from llm4gen.configs.setup_checks import is_t5_shaped, lora_targets_of, unknown_llm_type_message
from llm4gen.encoders.sources import TORCH_DTYPES, ModelSourceError, load_pretrained
from llm4gen.encoders.strict_loading import (
    RANKGEN_HEAD_KEYS,
    RANKGEN_KEY_MAPPING,
    load_strict,
)

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

    @property
    def longest(self) -> int:
        """Real tokens of the longest prompt (at least 1: a context never has an empty LLM part)."""
        return max(1, int(self.mask.sum(dim=1).max())) if self.mask.numel() else 1

    def padded_to(self, length: int) -> "LLMFeatures":
        """The token axis padded (zeros, mask False) or cut to ``length``; cutting a real token is refused."""
        batch, tokens, dim = self.features.shape
        if tokens > length:
            if self.mask[:, length:].any():
                raise ValueError(f"LLM features have {self.longest} real tokens, more than the {length} asked for "
                                 f"(model.llm.max_length?)")
            return LLMFeatures(self.features[:, :length], self.mask[:, :length])
        if tokens == length:
            return self
        pad = length - tokens
        return LLMFeatures(features=torch.cat([self.features, self.features.new_zeros(batch, pad, dim)], dim=1),
                           mask=torch.cat([self.mask, self.mask.new_zeros(batch, pad)], dim=1))

    def trimmed(self) -> "LLMFeatures":
        """Cut to the longest prompt's real tokens: what a masked context needs (the rest is padding)."""
        return self.padded_to(self.longest)

    def where(self, keep: torch.Tensor, other: "LLMFeatures") -> "LLMFeatures":
        """Row i from ``self`` where ``keep[i]``, else from ``other`` (one row, or as many as ``self``), padded
        to a common length (caption dropout's empty prompt, guidance's negative half)."""
        length = max(self.features.shape[1], other.features.shape[1])
        mine, theirs = self.padded_to(length), other.padded_to(length)
        keep = keep.view(-1, 1)
        return LLMFeatures(torch.where(keep[..., None], mine.features, theirs.features.to(mine.features.dtype)),
                           torch.where(keep, mine.mask, theirs.mask))


def common_length(*features: LLMFeatures) -> list[LLMFeatures]:
    """The features padded to one token count (the longest of them): halves of one guided UNet batch."""
    length = max(f.features.shape[1] for f in features)
    return [f.padded_to(length) for f in features]


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
        layer: which hidden states: an index into the model's hidden states (0: the embeddings, -1: the last
            layer, after any final norm), ``"penultimate"``, or ``"mean"``: the mean of every layer's output,
            each normalised by a parameter-free LayerNorm (as the CVPR 2025 study of decoder LLMs as
            diffusion text encoders reads them).
        layer_norm: ``"auto"`` | ``"true"`` | ``"false"``: a parameter-free LayerNorm over the width of the
            features read. ``auto`` turns it on for a non-final layer of a pre-norm model (decoders, T5),
            whose middle layers are unnormalised and carry outlier activations, and off for post-norm
            encoders (BERT-style), whose every layer ends in a LayerNorm.
        max_length: tokens per prompt; shorter prompts are padded to it, longer ones truncated.
        prefix: string prepended to every prompt (the release: ``"pre "``).
        zero_padding: zero the features at padding positions (the release keeps the encoder's outputs
            there; zeros make unpadded caches exact).
    """

    def __init__(self, pretrained: str, tokenizer: str | None = None, kind: str = "auto", layer: int | str = -1,
                 max_length: int = 256, prefix: str = "", zero_padding: bool = True, dtype: torch.dtype = torch.float32,
                 revision: str | None = None, trust_remote_code: bool = False, layer_norm: str = "auto"):
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
        self._read_with(load_llm_model(pretrained, config, self.kind, dtype, revision, trust_remote_code), layer,
                        layer_norm, max_length, prefix, zero_padding)
        self.requires_grad_(False).eval()

    def _read_with(self, model: nn.Module, layer: int | str, layer_norm: str, max_length: int, prefix: str,
                   zero_padding: bool) -> None:
        self.model = model
        layers = num_hidden_layers(model.config)
        self.layer = hidden_state_index(layer, layers)
        self.normalize = normalizes(self.layer, layer_norm, self.kind, layers)
        self.last_layer_run = last_layer_needed(model, self.layer, layers)
        self.max_length, self.prefix, self.zero_padding = max_length, prefix, zero_padding

    @classmethod
    def from_model(cls, model: nn.Module, tokenizer, kind: str, layer: int | str = -1, layer_norm: str = "auto",
                   max_length: int = 256, prefix: str = "", zero_padding: bool = True) -> "LLMEncoder":
        """A reader over an LLM and tokenizer already loaded (a pipeline's components, shared, not copied), by
        the same rules as a loaded one: what a saved pipeline reads is what training read."""
        if kind not in KINDS or kind == "auto":
            raise ValueError(f"llm kind {kind!r}: a loaded model needs its kind, one of {KINDS[1:]}")
        encoder = cls.__new__(cls)
        nn.Module.__init__(encoder)
        if tokenizer.pad_token is None:  # as a loaded reader sets them
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "right"
        encoder.kind, encoder.tokenizer = kind, tokenizer
        encoder._read_with(model, layer, layer_norm, max_length, prefix, zero_padding)
        return encoder

    @classmethod
    def from_config(cls, cfg) -> "LLMEncoder":
        """From the ``model.llm`` config section (with its LoRA when ``lora_rank`` > 0)."""
        prefix = cfg.prefix if cfg.prefix is not None else default_llm_prefix(cfg.pretrained)
        encoder = cls(cfg.pretrained, tokenizer=cfg.tokenizer, kind=cfg.kind, layer=cfg.layer,
                      max_length=cfg.max_length, prefix=prefix, zero_padding=cfg.zero_padding,
                      dtype=TORCH_DTYPES[cfg.dtype], revision=cfg.revision, trust_remote_code=cfg.trust_remote_code,
                      layer_norm=str(cfg.layer_norm))
        if cfg.lora_rank > 0:
            encoder.add_lora(cfg.lora_rank, cfg.lora_alpha, list(cfg.lora_target_modules))
        return encoder

    @property
    def hidden_size(self) -> int:
        config = self.model.config
        return getattr(config, "d_model", None) or config.hidden_size

    def tokenize(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        return self.tokenizer([self.prefix + p for p in prompts], max_length=self.max_length,
                              padding="max_length", truncation=True, return_tensors="pt")

    @property
    def trains(self) -> bool:
        """True once :meth:`add_lora` gave the LLM trainable weights."""
        return any(p.requires_grad for p in self.model.parameters())

    def add_lora(self, rank: int, alpha: float | None = None, target_modules: list[str] | None = None) -> None:
        """LoRA of ``rank`` in the LLM's attention (query and value projections by default), the only
        trainable weights of the LLM (LaVi-Bridge's option)."""
        from peft import LoraConfig, inject_adapter_in_model  # peft: only LoRA runs need it

        targets = list(target_modules or ()) or default_lora_targets(self.model.config)
        inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=targets,
                                           init_lora_weights=True), self.model)
        for name, parameter in self.model.named_parameters():
            parameter.requires_grad_("lora_" in name)

    def forward(self, prompts: list[str], device: torch.device | str | None = None) -> LLMFeatures:
        """(batch, max_length, llm_dim) features of ``prompts`` and their mask; the tokens go to ``device`` (default:
        the model's; a pipeline with offloading gives its execution device)."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.trains):  # frozen: never a graph
            return self._features(prompts, device)

    def _features(self, prompts: list[str], device=None) -> LLMFeatures:
        tokens = self.tokenize(prompts).to(device if device is not None else self.model.device)
        kwargs = dict(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        if self.kind == "decoder":
            kwargs["use_cache"] = False
        if self.layer == -1 and not self.normalize:
            hidden = self.model(**kwargs).last_hidden_state
        elif self.last_layer_run is not None:  # a middle layer: the layers above it never run
            hidden = read_hidden_states((run_until(self.model, kwargs, self.last_layer_run),), 0, self.normalize)
        else:
            hidden = read_hidden_states(self.model(**kwargs, output_hidden_states=True).hidden_states,
                                        self.layer, self.normalize)
        mask = tokens["attention_mask"].bool()
        if self.zero_padding:
            hidden = hidden * mask[..., None].to(hidden.dtype)
        return LLMFeatures(features=hidden, mask=mask)  # (batch, max_length, llm_dim)


def default_lora_targets(config) -> list[str]:
    """The attention's query and value projections of an LLM family, for its LoRA (the preflight refuses a
    family without them first; this guards an encoder used without a config)."""
    return lora_targets_of(getattr(config, "model_type", None))


def num_hidden_layers(config) -> int:
    """Transformer layers of a model config (T5: ``num_layers``; the encoder's for encoder-decoders)."""
    layers = llm_layer_count(config.to_dict())
    if layers is None:
        raise ValueError(f"cannot tell how many layers {type(config).__name__} has (no num_hidden_layers / num_layers)")
    return layers


def hidden_state_index(layer: int | str, layers: int) -> int | str:
    """``model.llm.layer`` as an index into the ``layers + 1`` hidden states (embeddings first), or "mean".

    Raises ValueError naming the valid range for an index the model does not have."""
    if layer == "mean":
        return "mean"
    if layer == "penultimate":
        return -2
    if isinstance(layer, str):
        try:
            layer = int(layer)
        except ValueError:
            raise ValueError(f"model.llm.layer is {layer!r}: expected an index, 'penultimate' or 'mean'") from None
    if not -(layers + 1) <= layer <= layers:
        raise ValueError(f"model.llm.layer is {layer}, but the LLM has {layers} layers ({layers + 1} hidden states, "
                         f"the embeddings first): use an index in [{-(layers + 1)}, {layers}], 'penultimate' or 'mean'")
    return layer


def normalizes(layer: int | str, layer_norm: str, kind: str, layers: int) -> bool:
    """Whether the features read get a parameter-free LayerNorm (see ``LLMEncoder``'s ``layer_norm``)."""
    if layer == "mean":
        return True  # each layer is normalised before the mean, whatever layer_norm says
    setting = str(layer_norm).strip().lower()
    if setting in ("true", "false"):
        return setting == "true"
    if setting != "auto":
        raise ValueError(f"model.llm.layer_norm is {layer_norm!r}: expected auto, true or false")
    final = layer == -1 or layer == layers
    return not final and kind in ("decoder", "encoder-decoder")


LAYER_STACKS = ("layers", "encoder.layer", "block", "h", "transformer.h", "model.layers")  # Llama, BERT, T5, GPT-2


def last_layer_needed(model: nn.Module, layer: int | str, layers: int) -> nn.Module | None:
    """The transformer layer whose output is hidden state ``layer`` when that is a middle one (neither the
    embeddings nor the last, which may be final-normed), so that a read can stop there: reading layer 15
    of 30 then costs half a forward pass. None when the whole model must run ("mean", the ends, or a model
    whose layer list is not at one of ``LAYER_STACKS``)."""
    if not isinstance(layer, int):
        return None
    index = layer if layer >= 0 else layers + 1 + layer
    if not 1 <= index < layers:
        return None
    for path in LAYER_STACKS:
        try:
            stack = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(stack, nn.ModuleList) and len(stack) == layers:
            return stack[index - 1]
    return None


class _Reached(Exception):
    """Carries the output of the last layer a read needs out of the forward pass."""

    def __init__(self, hidden: torch.Tensor):
        super().__init__()
        self.hidden = hidden


def run_until(model: nn.Module, kwargs: dict, last: nn.Module) -> torch.Tensor:
    """``model(**kwargs)`` stopped as ``last`` (one of its layers) returns: that layer's hidden states
    (batch, tokens, dim), the same tensor the full pass reports at that index; the autograd graph up to
    it is kept (LoRA inside the LLM trains through it)."""
    def stop(module, args, output):
        raise _Reached(output[0] if isinstance(output, tuple) else output)

    handle = last.register_forward_hook(stop)
    try:
        model(**kwargs)
    except _Reached as reached:
        return reached.hidden
    finally:
        handle.remove()
    raise RuntimeError(f"the LLM's forward pass never ran its layer {type(last).__name__}: cannot read it")


def read_hidden_states(hidden_states: tuple[torch.Tensor, ...], layer: int | str, normalize: bool) -> torch.Tensor:
    """The features at ``layer`` (an index, or "mean" over every layer's output) of a model's hidden states
    (embeddings first, each (batch, tokens, dim)), LayerNorm-ed without parameters when ``normalize``."""
    def norm(h: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(h.float(), h.shape[-1:]).to(h.dtype)

    if layer == "mean":
        return torch.stack([norm(h) for h in hidden_states[1:]]).mean(0)
    hidden = hidden_states[layer]
    return norm(hidden) if normalize else hidden


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
        if not is_t5_shaped(raw):  # the preflight refuses it from config.json first
            raise ConfigError(unknown_llm_type_message(pretrained, raw.get("model_type"))) from err
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

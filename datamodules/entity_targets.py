"""The entity loss's targets, built with the batch in the data worker, never in the training step.

For each caption: the words of its parsed entity groups, each aligned to its token positions in the fused
context [CLIP's 77 tokens, the LLM's max_length tokens] (losses/token_alignment.py), and its (attribute,
entity) pairs; collated into one ``EntityTargets`` (losses/entity.py). Aligning needs both tokenizers;
a feature cache stores the positions instead (member ``entity_positions.json``, field ``entity_positions``),
and a batch of cached positions is built without tokenizing anything.

The builder is what a DataLoader worker holds: it pickles without its tokenizers and loads them on first use
in each process.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

from transformers import AutoTokenizer, CLIPTokenizer

from llm4gen.configs.schema import default_llm_prefix
from llm4gen.encoders.sources import load_pretrained
from llm4gen.losses.entity import EntityTargets, build_entity_targets, entity_words
from llm4gen.losses.entity_parser import groups_from_json
from llm4gen.losses.token_alignment import fused_word_token_positions


@dataclass(frozen=True)
class TokenizerSources:
    """Where the two tokenizers come from and how the LLM reads a caption (the ``model`` config's values)."""
    clip: str                       # model.base.pretrained (its tokenizer/ subfolder)
    llm: str                        # model.llm.tokenizer, else model.llm.pretrained
    llm_max_length: int
    llm_prefix: str
    clip_revision: Optional[str] = None
    llm_revision: Optional[str] = None
    trust_remote_code: bool = False

    @classmethod
    def from_model_config(cls, model) -> "TokenizerSources":
        llm = model.llm
        prefix = llm.prefix if llm.prefix is not None else default_llm_prefix(llm.pretrained)
        return cls(clip=model.base.pretrained, llm=llm.tokenizer or llm.pretrained, llm_max_length=llm.max_length,
                   llm_prefix=prefix, clip_revision=model.base.revision, llm_revision=llm.revision,
                   trust_remote_code=llm.trust_remote_code)

    def load(self) -> tuple[Any, Any]:
        """(CLIP tokenizer, LLM tokenizer) as the encoders load them (encoders/stable_diffusion.py, encoders/llm.py)."""
        clip = load_pretrained(CLIPTokenizer.from_pretrained, self.clip, "model.base.pretrained (tokenizer)",
                               subfolder="tokenizer", revision=self.clip_revision)
        llm = load_pretrained(AutoTokenizer.from_pretrained, self.llm, "model.llm.tokenizer",
                              revision=self.llm_revision, trust_remote_code=self.trust_remote_code)
        if llm.pad_token is None:
            llm.pad_token = llm.eos_token
        llm.padding_side = "right"
        return clip, llm


def parsed_groups(captions: Sequence[str], entities: Sequence[Any]) -> list:
    if len(captions) != len(entities):
        raise ValueError(f"{len(captions)} captions but {len(entities)} entity parses")
    return [groups_from_json(parsed, caption) for parsed, caption in zip(entities, captions)]


class EntityTargetBuilder:
    """``builder(captions, entities_json[, positions]) -> EntityTargets`` over the fused context."""

    def __init__(self, sources: Optional[TokenizerSources] = None, tokenizers: Optional[tuple[Any, Any]] = None,
                 llm_max_length: Optional[int] = None, llm_prefix: Optional[str] = None):
        if sources is None and (tokenizers is None or llm_max_length is None or llm_prefix is None):
            raise ValueError("give the tokenizer sources, or the tokenizers with llm_max_length and llm_prefix")
        self.sources = sources
        self._tokenizers = tokenizers
        self.llm_max_length = sources.llm_max_length if sources else llm_max_length
        self.llm_prefix = sources.llm_prefix if sources else llm_prefix

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        if self.sources is not None:
            state["_tokenizers"] = None  # reloaded in the worker that uses it
        return state

    @property
    def tokenizers(self) -> tuple[Any, Any]:
        if self._tokenizers is None:
            self._tokenizers = self.sources.load()
        return self._tokenizers

    @property
    def clip_max_length(self) -> int:
        return self.tokenizers[0].model_max_length

    @property
    def num_tokens(self) -> int:
        return self.clip_max_length + self.llm_max_length

    def positions(self, captions: Sequence[str], entities: Sequence[Any]) -> list[list[list[int]]]:
        """Each caption's words' positions in the fused context, in ``entity_words`` order."""
        return self._positions(captions, parsed_groups(captions, entities))

    def _positions(self, captions, groups) -> list[list[list[int]]]:
        clip, llm = self.tokenizers
        return fused_word_token_positions(captions, [entity_words(g) for g in groups], clip, llm,
                                          clip_max_length=clip.model_max_length, llm_max_length=self.llm_max_length,
                                          llm_prefix=self.llm_prefix)

    def __call__(self, captions: Sequence[str], entities: Sequence[Any],
                 positions: Optional[Sequence[Sequence[Sequence[int]]]] = None,
                 num_tokens: Optional[int] = None) -> EntityTargets:
        """The batch's targets; with cached ``positions`` (and their ``num_tokens``) no tokenizer runs."""
        groups = parsed_groups(captions, entities)
        if positions is None:
            positions, num_tokens = self._positions(captions, groups), self.num_tokens
        elif num_tokens is None:
            raise ValueError("cached positions need the fused length they index into (num_tokens)")
        return build_entity_targets(groups, positions, num_tokens)

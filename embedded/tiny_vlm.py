"""Tiny vision-language models for the recaptioning tests: LLaVA-1.5's and Florence-2's architectures shrunk,
random weights.

LLaVA-1.5 is a CLIP vision tower whose penultimate patch features go through a two-layer MLP into a Llama
decoder, in the place of an ``<image>`` token of the prompt. Here the tower is a 2-layer CLIP ViT on 32 px images
(16 patches of 8 px), the decoder a 2-layer Llama of width 64, and the tokenizer a word-level vocabulary holding
the image token. :func:`build_tiny_llava` writes the folder with ``save_pretrained`` (model, processor, chat
template), so recaption.py loads it through ``AutoModelForImageTextToText`` / ``AutoProcessor`` exactly as it
loads ``llava-hf/llava-1.5-7b-hf``. Its captions are noise: random weights, words drawn from a tiny vocabulary.

Florence-2 (:func:`build_tiny_florence2`) is the other kind: an encoder-decoder (a DaViT image encoder feeding a
BART) prompted by a task token (``<MORE_DETAILED_CAPTION>``) rather than a chat, whose processor places the image
itself. Here a 4-stage DaViT of width 16-32 on 64 px images (5 image tokens) and a 1-layer BART of width 32.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    BartConfig,
    CLIPImageProcessor,
    CLIPVisionConfig,
    Florence2Config,
    Florence2ForConditionalGeneration,
    Florence2Processor,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)
from transformers.models.florence2.configuration_florence2 import Florence2VisionConfig

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>", "<image>")  # ids 0..4
WORDS = ("a an the of and on in with to is are it its this that there image picture photo detail describe "
         "main objects object their they how each other words more than at least name say where left right top "
         "bottom middle front behind next beside above below large small big tiny red green blue yellow white "
         "black purple orange brown pink gray circle square triangle cross shape shapes background plain colored "
         "dog cat person table tree sky grass water car house").split()
# LLaVA-1.5's conversation format ("USER: <image>\n... ASSISTANT:"), as a processor chat template.
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: {% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>\n{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% else %} ASSISTANT: {% for item in message['content'] %}{{ item['text'] }}{% endfor %}</s>"
    "{% endif %}{% endfor %}{% if add_generation_prompt %} ASSISTANT:{% endif %}"
)
IMAGE_SIZE, PATCH_SIZE = 32, 8
TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                   image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, projection_dim=32)
TINY_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer (whitespace split, BOS first) whose vocabulary holds LLaVA's ``<image>`` token."""
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for word in WORDS + ["USER:", "ASSISTANT:", ".", ","]:
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", extra_special_tokens={"image_token": "<image>"})


def build_tiny_llava(directory: str | os.PathLike, seed: int = 0) -> Path:
    """Writes the tiny LLaVA folder (model, processor and chat template; deterministic for a seed)."""
    tokenizer = tiny_tokenizer()
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE},
                                           crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}),
        tokenizer=tokenizer, patch_size=PATCH_SIZE, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE)  # the CLS token, dropped by "default"
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**TINY_VISION),
        text_config=LlamaConfig(vocab_size=len(tokenizer), **TINY_TEXT),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_layer=-2,
        vision_feature_select_strategy="default", projector_hidden_act="gelu", pad_token_id=0)
    with torch.random.fork_rng(devices=[]):  # leave the caller's random stream as it was
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = 0
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return Path(directory)


TINY_DAVIT = dict(depths=(1, 1, 1, 1), embed_dim=(16, 16, 32, 32), num_heads=(2, 2, 2, 2), num_groups=(2, 2, 2, 2),
                  window_size=2, projection_dim=32, drop_path_rate=0.0)
# BART as Florence-2 uses it, but with its own output layer: a tied one makes a random decoder repeat its start token
TINY_BART = dict(d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
                 encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=128, bos_token_id=1, eos_token_id=2,
                 pad_token_id=0, decoder_start_token_id=2, forced_bos_token_id=None, forced_eos_token_id=None,
                 tie_word_embeddings=False)
FLORENCE_IMAGE_SIZE, FLORENCE_IMAGE_TOKENS = 64, 5  # 64 px / 32 = 2 x 2 patches, and the pooled one


def build_tiny_florence2(directory: str | os.PathLike, seed: int = 0) -> Path:
    """Writes the tiny Florence-2 folder (model and processor, no chat template; deterministic for a seed)."""
    tokenizer = tiny_tokenizer()
    processor = Florence2Processor(
        image_processor=CLIPImageProcessor(size={"height": FLORENCE_IMAGE_SIZE, "width": FLORENCE_IMAGE_SIZE},
                                           do_center_crop=False, image_seq_length=FLORENCE_IMAGE_TOKENS),
        tokenizer=tokenizer)
    config = Florence2Config(vision_config=Florence2VisionConfig(**TINY_DAVIT),
                             text_config=BartConfig(vocab_size=len(tokenizer), **TINY_BART),
                             image_token_id=tokenizer.convert_tokens_to_ids("<image>"))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Florence2ForConditionalGeneration(config)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return Path(directory)

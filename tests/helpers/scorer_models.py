"""Tiny scorer models with random weights, built from configs and saved like real ones, so tests load
them through the same ``from_pretrained`` calls a user's hub id or folder goes through."""

from __future__ import annotations

from pathlib import Path

import torch

from llm4gen.embedded.registry import CLIP_TOKENIZER_DIR


def build_tiny_blip_vqa(directory: Path, seed: int = 0) -> Path:
    """BLIP VQA (ViT 32 px, 1-layer BERT text tower) with BERT's uncased vocabulary taken from the
    MiniLM package, plus BLIP's [DEC] (decoder start) and [ENC] tokens, as BLIP's tokenizer adds them."""
    from transformers import (
        BertTokenizerFast,
        BlipConfig,
        BlipForQuestionAnswering,
        BlipImageProcessor,
        BlipProcessor,
    )

    from llm4gen.embedded.tiny import minilm_path

    tokenizer = BertTokenizerFast.from_pretrained(minilm_path())
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    vocab = len(tokenizer)
    config = BlipConfig(
        text_config=dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, encoder_hidden_size=32, max_position_embeddings=64,
                         bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id,
                         sep_token_id=tokenizer.sep_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=16),
        projection_dim=32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BlipForQuestionAnswering(config)
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tokenizer)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return Path(directory)


def build_tiny_clip(directory: Path, seed: int = 0, projection_dim: int = 16) -> Path:
    """CLIP (text and vision towers of width 32) with CLIP's real BPE tokenizer; ``projection_dim`` 768 makes
    embeddings as wide as ViT-L/14's (what the aesthetic MLP reads)."""
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        CLIPTokenizer,
    )

    config = CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=16),
        projection_dim=projection_dim)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(config)
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                 crop_size={"height": 32, "width": 32}),
                              tokenizer=CLIPTokenizer.from_pretrained(CLIP_TOKENIZER_DIR))
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return Path(directory)


def build_tiny_vit_features(directory: Path, seed: int = 0) -> Path:
    """A ViT image encoder (width 16) with its image processor: FID's feature extractor."""
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ViTModel(ViTConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                   image_size=32, patch_size=8))
    model.save_pretrained(directory)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(directory)
    return Path(directory)


def build_tiny_mask2former(directory: Path, seed: int = 0) -> Path:
    """A Mask2Former instance segmenter (Swin of width 16, 8 queries) over GenEval's 80 COCO classes, random
    weights, with its image processor at 64 px: GenEval's detector path on tiny weights."""
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, SwinConfig
    from transformers import Mask2FormerImageProcessorPil as Processor

    from llm4gen.evaluation.geneval import object_names

    names = object_names()
    backbone = SwinConfig(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], window_size=4, image_size=64,
                          out_features=["stage1", "stage2", "stage3", "stage4"])
    config = Mask2FormerConfig(backbone_config=backbone, hidden_dim=32, mask_feature_size=32, feature_size=32,
                               encoder_feedforward_dim=64, dim_feedforward=64, encoder_layers=1, decoder_layers=2,
                               num_attention_heads=2, num_queries=8, id2label=dict(enumerate(names)),
                               label2id={n: i for i, n in enumerate(names)})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Mask2FormerForUniversalSegmentation(config)
    model.save_pretrained(directory)
    Processor(size={"height": 64, "width": 64}).save_pretrained(directory)
    return Path(directory)


def build_aesthetic_weights(path: Path, seed: int = 0) -> Path:
    """The LAION aesthetic predictor's MLP with random weights, saved as its published state dict is."""
    from llm4gen.evaluation.aesthetic import AestheticMLP

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.save(AestheticMLP().state_dict(), path)
    return Path(path)

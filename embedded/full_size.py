"""The paper-scale architectures, from their published configs, with random weights and no download.

Used to count FLOPs and parameters exactly (built on the ``meta`` device: shapes only, no memory), to
estimate memory (``bench/memory_table.py``), and to time the real thing on a lent GPU
(``bench/gpu_bench.py`` writes random-weight folders that load through the ordinary ``from_pretrained``
path). The values are copied from the released config files:

- SD1.5 ``unet/``, ``vae/`` and ``text_encoder/`` (CLIP ViT-L/14's text tower) of
  stable-diffusion-v1-5/stable-diffusion-v1-5;
- T5-XL of google/t5-v1_1-xl, the architecture of RankGen's ``rankgen-t5-xl-all`` encoder
  (width 2048, 24 layers, gated-GELU FFN of 5120; the encoder alone holds 1.22B parameters);
- SDXL's ``unet/``, ``vae/``, ``text_encoder/`` (CLIP ViT-L) and ``text_encoder_2/`` (OpenCLIP ViT-bigG, with
  projection) of stabilityai/stable-diffusion-xl-base-1.0: 2,567M, 84M, 123M and 695M parameters.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors

from llm4gen.embedded.registry import CLIP_TOKENIZER_DIR, SD15_SCHEDULER

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32, norm_eps=1e-5, act_fn="silu",
    center_input_sample=False, downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, mid_block_scale_factor=1,
)
SD15_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    norm_num_groups=32, act_fn="silu", sample_size=512, scaling_factor=0.18215,
)
CLIP_L_TEXT = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768, layer_norm_eps=1e-5,
    bos_token_id=0, eos_token_id=2, pad_token_id=1,
)
T5_XL = dict(
    vocab_size=32128, d_model=2048, d_kv=64, d_ff=5120, num_layers=24, num_decoder_layers=24, num_heads=32,
    relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
    layer_norm_epsilon=1e-6, dropout_rate=0.1, tie_word_embeddings=False, is_encoder_decoder=True,
    decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
)
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, norm_num_groups=32, norm_eps=1e-5, act_fn="silu",
    center_input_sample=False, downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, mid_block_scale_factor=1,
)
SDXL_VAE = {**SD15_VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True}
OPENCLIP_BIGG_TEXT = dict(
    vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
    max_position_embeddings=77, hidden_act="gelu", projection_dim=1280, layer_norm_eps=1e-5,
    bos_token_id=0, eos_token_id=2, pad_token_id=1,
)
SDXL_SCHEDULER = dict(
    _class_name="EulerDiscreteScheduler", num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
    beta_schedule="scaled_linear", prediction_type="epsilon", interpolation_type="linear", use_karras_sigmas=False,
    timestep_spacing="leading", steps_offset=1, sample_max_value=1.0, clip_sample=False, set_alpha_to_one=False,
    skip_prk_steps=True,
)
# Hub ids whose architecture is T5-XL (what the memory table and FLOP counts build for them).
T5_XL_SOURCES = ("kalpeshk2011/rankgen-t5-xl-all", "google/t5-v1_1-xl", "google/flan-t5-xl")
# meta-llama/Llama-2-7b-hf's config.json (LaVi-Bridge's LLM): 6.74B parameters with the LM head, 6.61B without
LLAMA2_7B = dict(
    vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0, hidden_act="silu",
    tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
)
LLAMA2_7B_SOURCES = ("meta-llama/Llama-2-7b-hf",)
# llava-hf/llava-1.5-7b-hf's config.json (the recaptioner of the paper's LAION-refined): CLIP ViT-L/14 at 336 px
# (576 patches; the penultimate layer's, CLS dropped), a two-layer GELU projector, Vicuna-7B v1.5 (Llama-2-7B's
# shape, 32064 tokens with the image and pad tokens): 7.06B parameters
LLAVA_15_VISION = dict(
    hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=336,
    patch_size=14, projection_dim=768, hidden_act="quick_gelu", layer_norm_eps=1e-5,
)
LLAVA_15_7B = dict(
    image_token_index=32000, pad_token_id=32001, projector_hidden_act="gelu", vision_feature_layer=-2,
    vision_feature_select_strategy="default", image_seq_length=576, tie_word_embeddings=False,
)
LLAVA_15_TEXT = {**LLAMA2_7B, "vocab_size": 32064, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 32001}


def sd15_unet(device: str | torch.device = "meta"):
    from diffusers import UNet2DConditionModel

    with torch.device(device):
        return UNet2DConditionModel(**SD15_UNET)


def sd15_vae(device: str | torch.device = "meta"):
    from diffusers import AutoencoderKL

    with torch.device(device):
        return AutoencoderKL(**SD15_VAE)


def clip_l_text(device: str | torch.device = "meta"):
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device(device):
        return CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT))


def llama2_7b(device: str | torch.device = "meta"):
    """Llama-2-7B's decoder stack (what the LLM encoder reads: ``base_model``, no LM head)."""
    from transformers import LlamaConfig, LlamaModel

    with torch.device(device):
        return LlamaModel(LlamaConfig(**LLAMA2_7B))


def llava_15_7b(device: str | torch.device = "meta"):
    """LLaVA-1.5-7B (``LlavaForConditionalGeneration``), from its published config."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    config = LlavaConfig(vision_config=CLIPVisionConfig(**LLAVA_15_VISION), text_config=LlamaConfig(**LLAVA_15_TEXT),
                         **LLAVA_15_7B)
    with torch.device(device):
        return LlavaForConditionalGeneration(config)


def llm_architecture(source: str, trust_remote_code: bool = False, device: str | torch.device = "meta"):
    """A ``model.llm.pretrained`` source's architecture, as the LLM encoder reads it: T5-XL's encoder for its
    known sources, Llama-2-7B's stack, else a local folder's config. Raises ValueError for a hub id not known."""
    if source in T5_XL_SOURCES:
        return t5_xl_encoder(device)
    if source in LLAMA2_7B_SOURCES:
        return llama2_7b(device)
    if Path(source).expanduser().is_dir():
        from transformers import AutoConfig, AutoModel

        config = AutoConfig.from_pretrained(Path(source).expanduser(), trust_remote_code=trust_remote_code)
        with torch.device(device):
            model = AutoModel.from_config(config, trust_remote_code=trust_remote_code)
        return model.get_encoder() if getattr(config, "is_encoder_decoder", False) else model
    raise ValueError(f"model.llm.pretrained={source!r}: no architecture known offline; known: "
                     f"{', '.join(T5_XL_SOURCES + LLAMA2_7B_SOURCES)} or a local model folder")


def t5_xl_encoder(device: str | torch.device = "meta"):
    from transformers import T5Config, T5EncoderModel

    with torch.device(device):
        return T5EncoderModel(T5Config(**T5_XL))


def sdxl_unet(device: str | torch.device = "meta"):
    from diffusers import UNet2DConditionModel

    with torch.device(device):
        return UNet2DConditionModel(**SDXL_UNET)


def sdxl_vae(device: str | torch.device = "meta"):
    from diffusers import AutoencoderKL

    with torch.device(device):
        return AutoencoderKL(**SDXL_VAE)


def openclip_bigg_text(device: str | torch.device = "meta"):
    """SDXL's second text encoder: OpenCLIP ViT-bigG's text tower with its projection (the pooled embedding)."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    with torch.device(device):
        return CLIPTextModelWithProjection(CLIPTextConfig(**OPENCLIP_BIGG_TEXT))


def write_random_sdxl(directory: str | os.PathLike, seed: int = 0, device: str = "cpu",
                      dtype: torch.dtype = torch.bfloat16) -> Path:
    """A full-size SDXL base folder (diffusers layout, about 7 GB in bf16) with random weights, for
    ``model.base.pretrained`` with ``model.base.family=sdxl``. Both tokenizers are CLIP's real BPE; the
    second pads with ``!``, as SDXL base 1.0's ``tokenizer_2`` does."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTokenizer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet, vae = sdxl_unet(device), sdxl_vae(device)
        text, text_2 = clip_l_text(device), openclip_bigg_text(device)
    pipe = StableDiffusionXLPipeline(
        vae=vae.to(dtype), text_encoder=text.to(dtype), text_encoder_2=text_2.to(dtype),
        tokenizer=CLIPTokenizer.from_pretrained(CLIP_TOKENIZER_DIR),
        tokenizer_2=CLIPTokenizer.from_pretrained(CLIP_TOKENIZER_DIR, pad_token="!"), unet=unet.to(dtype),
        scheduler=EulerDiscreteScheduler.from_config(SDXL_SCHEDULER), add_watermarker=False)
    pipe.save_pretrained(directory)
    return Path(directory)


def write_random_sd15(directory: str | os.PathLike, seed: int = 0, device: str = "cpu",
                      dtype: torch.dtype = torch.bfloat16) -> Path:
    """A full-size SD1.5 folder (diffusers layout) with random weights: what ``model.base.pretrained``
    reads. Weights are initialised on ``device`` (a GPU makes it seconds) and stored in ``dtype``.
    The tokenizer is CLIP's real BPE shipped in ``embedded/clip_tokenizer``."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer


    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet, vae, text = sd15_unet(device), sd15_vae(device), clip_l_text(device)
    pipe = StableDiffusionPipeline(
        vae=vae.to(dtype), text_encoder=text.to(dtype), tokenizer=CLIPTokenizer.from_pretrained(CLIP_TOKENIZER_DIR),
        unet=unet.to(dtype), scheduler=PNDMScheduler.from_config(SD15_SCHEDULER), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.save_pretrained(directory)
    return Path(directory)


def word_level_tokenizer(vocab_size: int, words: list[str] | None = None):
    """A whitespace word-level fast tokenizer for random-weight LLMs (no real vocabulary is shipped
    offline). Ids stay below ``vocab_size``; pad 0, eos 1, unk 2, like T5. Features are padded to
    ``max_length``, so the token ids change no FLOP or memory figure."""
    from transformers import PreTrainedTokenizerFast

    words = words or sorted({w for w in ("a an the of and on in with to red green blue yellow white black purple "
                                         "orange brown pink circle square triangle cube sphere cat dog book vase "
                                         "table apple mug sofa lamp bottle fox forest scarf pre").split()})
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for word in words:
        if len(vocab) >= vocab_size:
            break
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def write_random_t5_xl(directory: str | os.PathLike, seed: int = 0, device: str = "cpu",
                       dtype: torch.dtype = torch.bfloat16) -> Path:
    """A T5-XL folder with random weights for ``model.llm.pretrained`` (kind ``encoder-decoder``).

    The encoder is full size; the decoder has one layer, because only the encoder is ever run and a
    24-layer decoder would add 1.6B parameters to write and load. A word-level tokenizer goes beside it."""
    from transformers import T5Config, T5Model

    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        model = T5Model(T5Config(**{**T5_XL, "num_decoder_layers": 1}))
    model.to(dtype).save_pretrained(directory)
    word_level_tokenizer(T5_XL["vocab_size"]).save_pretrained(directory)
    return Path(directory)

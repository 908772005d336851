"""The vision-language model of recaption.py: found, checked and asked, never downloaded.

A model is a local folder written by ``save_pretrained`` or a hub id already in the user's Hugging Face cache
(every ``from_pretrained`` here passes ``local_files_only=True``). Whatever transformers loads through
``AutoModelForImageTextToText`` and ``AutoProcessor`` works: LLaVA-1.5 (``llava-hf/llava-1.5-7b-hf``), LLaVA-NeXT,
Qwen2-VL, Florence-2 (``florence-community/Florence-2-large``), and the other architectures transformers lists
for image-text-to-text.

Everything a bad request gets wrong is found before the weights load, from the config and the processor alone
(:func:`check_model_source`, :func:`load_processor`, :func:`check_prompt`): a folder that is not a
vision-language model, a hub id missing from the cache, a prompt the processor cannot place the image in, a
prompt that leaves no room in the context for the image's tokens and the caption.

The prompt reaches the model in one of two forms. ``chat``: the instruction inside the processor's own chat
template (a user turn holding the image and the text, then the assistant's turn), which places the image token
where the model was trained to see it: the form for LLaVA, LLaVA-NeXT and Qwen2-VL. ``raw``: the text as given,
for models without a chat template (Florence-2 takes a task token such as ``<MORE_DETAILED_CAPTION>`` and adds
the image itself; a raw LLaVA prompt must hold ``<image>``). ``auto`` is chat when the processor has a template.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from PIL import Image
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

from llm4gen.configs.errors import UserError
from llm4gen.encoders.sources import TORCH_DTYPES, is_local

# The instruction LLM4GEN's authors gave LLaVA for LAION-refined (paper v1, Fig. 4b), in our words: more than 50
# words, the main objects and how they relate.
DEFAULT_PROMPT = ("Describe this image in more than 50 words. Name each main object with its color, size and other "
                  "attributes, say where it is in the picture, and say how the objects relate to each other.")
PROMPT_FORMATS = ("auto", "chat", "raw")
EXAMPLES = "llava-hf/llava-1.5-7b-hf, llava-hf/llava-v1.6-mistral-7b-hf, Qwen/Qwen2-VL-7B-Instruct"


class RecaptionError(UserError, ValueError):
    """A recaptioning request that cannot run as asked; the message says what to change."""


@dataclass(frozen=True)
class GenerationSettings:
    """How captions are decoded: greedy by default (the same image gives the same caption on the same hardware);
    with ``do_sample`` each batch draws from its own seed (``seed``, shard, batch), so a rerun draws the same."""

    max_new_tokens: int = 256
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int = 0

    def check(self) -> None:
        if self.max_new_tokens < 1:
            raise RecaptionError(f"--max-new-tokens {self.max_new_tokens}: expected a positive number of tokens "
                                 f"(256 leaves room for about 150 words)")
        if self.do_sample and not self.temperature > 0:
            raise RecaptionError(f"--temperature {self.temperature}: sampling needs a temperature above 0 (e.g. 0.7)")
        if not 0 < self.top_p <= 1:
            raise RecaptionError(f"--top-p {self.top_p}: expected a probability mass in (0, 1]")
        if not self.repetition_penalty > 0:
            raise RecaptionError(f"--repetition-penalty {self.repetition_penalty}: expected a number above 0 (1: none)")

    def generate_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "do_sample": self.do_sample, "num_beams": 1,
                                  "repetition_penalty": self.repetition_penalty}
        if self.do_sample:
            kwargs.update(temperature=self.temperature, top_p=self.top_p)
        return kwargs

    def record(self) -> dict[str, Any]:
        """What a caption's json record and the job's settings hold (sampling settings only when sampling)."""
        record = asdict(self)
        if not self.do_sample:
            for name in ("temperature", "top_p", "seed"):
                record.pop(name)
        return record


# ---------------------------------------------------------------- before the weights


def resolve_model(source: str) -> str:
    """The path or hub id ``from_pretrained`` gets."""
    return str(Path(source).expanduser()) if is_local(source) else source


def check_model_source(source: str, revision: Optional[str] = None, trust_remote_code: bool = False) -> Any:
    """The model's config, read without its weights; refuses a missing folder, a hub id not in the cache and a
    model that is not a vision-language model."""
    resolved = resolve_model(source)
    if is_local(source):
        if not Path(resolved).is_dir():
            raise RecaptionError(f"--model {source!r} is not a folder and not a hub id of the form org/name; point "
                                 f"it at a vision-language model's folder (as save_pretrained writes it) or a hub id "
                                 f"such as {EXAMPLES}.")
        if not (Path(resolved) / "config.json").is_file():
            raise RecaptionError(f"--model {source!r} holds no config.json, so it is not a transformers model folder; "
                                 f"point it at the folder save_pretrained wrote (config.json beside the weights).")
    try:
        config = AutoConfig.from_pretrained(resolved, revision=revision, local_files_only=True,
                                            trust_remote_code=trust_remote_code)
    except OSError as error:
        where = os.environ.get("HF_HUB_CACHE") or os.environ.get("HF_HOME") or "~/.cache/huggingface"
        raise RecaptionError(
            f"--model {source!r} is not in this machine's Hugging Face cache ({where}) and recaption.py never "
            f"downloads: fetch it where the hub is reachable (hf download {source}) and set HF_HOME to that cache, "
            f"or pass the downloaded folder ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})."
        ) from None
    except ValueError as error:  # an unknown model_type, or remote code not trusted
        raise RecaptionError(f"--model {source!r}: transformers cannot read its config ({str(error).splitlines()[0]}); "
                             f"if the model ships its own code, add --trust-remote-code.") from None
    model_type = getattr(config, "model_type", None)
    remote = getattr(config, "auto_map", {}) or {}
    if model_type not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES and not (
            trust_remote_code and "AutoModelForImageTextToText" in remote):
        architectures = ", ".join(getattr(config, "architectures", None) or []) or "none named"
        raise RecaptionError(
            f"--model {source!r} is a {model_type!r} model ({architectures}), not a vision-language model: "
            f"recaption.py needs a model that reads an image and writes text (AutoModelForImageTextToText), "
            f"such as {EXAMPLES} or a Florence-2.")
    return config


def load_processor(source: str, revision: Optional[str] = None, trust_remote_code: bool = False) -> Any:
    """The model's processor (image preprocessing and tokenizer), with left padding for batched decoding."""
    try:
        processor = AutoProcessor.from_pretrained(resolve_model(source), revision=revision, local_files_only=True,
                                                  trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise RecaptionError(f"--model {source!r}: its processor cannot be loaded ({type(error).__name__}: "
                             f"{str(error).splitlines()[0] if str(error) else ''}); the folder must hold the "
                             f"processor's files (processor_config.json or preprocessor_config.json and the "
                             f"tokenizer), as processor.save_pretrained writes them.") from None
    if getattr(processor, "image_processor", None) is None or getattr(processor, "tokenizer", None) is None:
        raise RecaptionError(f"--model {source!r}: AutoProcessor gives a {type(processor).__name__}, which has no "
                             f"image processor and tokenizer; a vision-language model's folder holds both.")
    processor.tokenizer.padding_side = "left"  # decoder-only generation continues every row from its last token
    return processor


def prompt_text(processor: Any, prompt: str, prompt_format: str) -> tuple[str, str]:
    """(the text the processor gets, the format used: chat or raw); see the module doc."""
    if prompt_format not in PROMPT_FORMATS:
        raise RecaptionError(f"--prompt-format {prompt_format!r}: expected one of {', '.join(PROMPT_FORMATS)}")
    has_template = getattr(processor, "chat_template", None) is not None
    used = ("chat" if has_template else "raw") if prompt_format == "auto" else prompt_format
    if used == "raw":
        return prompt, used
    if not has_template:
        raise RecaptionError("--prompt-format chat: this model's processor has no chat template; give the whole "
                             "prompt with --prompt-format raw (with the image token where the model expects it).")
    image_token = getattr(processor, "image_token", None)
    if image_token and image_token in prompt:
        raise RecaptionError(f"--prompt holds the image token {image_token!r}, which the chat template adds itself; "
                             f"leave it out, or pass the whole prompt with --prompt-format raw.")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False), used


def check_prompt(processor: Any, config: Any, text: str, max_new_tokens: int, prompt_format: str) -> int:
    """Runs the processor on the prompt and a blank image, as the job will; refuses a prompt with no place for
    the image and one that leaves no room for the caption. Returns the prompt's length in tokens."""
    image_token = getattr(processor, "image_token", None)
    try:
        inputs = processor(images=[Image.new("RGB", (336, 336), "gray")], text=[text], return_tensors="pt")
    except ValueError as error:
        raise RecaptionError(
            f"--prompt {text!r} has no room for the image: the processor refused it ({str(error).splitlines()[0]}). "
            + (f"A raw prompt for this model holds {image_token!r} where the image goes (e.g. 'USER: {image_token}\\n"
               f"Describe this image. ASSISTANT:'), or use --prompt-format chat." if image_token and prompt_format == "raw"
               else "Check the prompt against the model's card.")) from None
    ids = inputs["input_ids"][0]
    image_token_id = getattr(processor, "image_token_id", None)
    if image_token_id is not None and not bool((ids == image_token_id).any()):
        raise RecaptionError(f"--prompt {text!r} leaves the image out: the processor's text holds no {image_token!r} "
                             f"token, so the model would caption without seeing the image.")
    limit = getattr(config.get_text_config(), "max_position_embeddings", None)
    if limit is not None and not getattr(config, "is_encoder_decoder", False) and len(ids) + max_new_tokens > limit:
        raise RecaptionError(f"--prompt with the image takes {len(ids)} tokens and --max-new-tokens {max_new_tokens} "
                             f"more, past the model's context of {limit}: shorten the prompt or lower --max-new-tokens "
                             f"to at most {limit - len(ids)}.")
    return len(ids)


def resolve_dtype(dtype: str, device: str) -> str:
    """``auto``: bfloat16 on a GPU, float32 on the CPU (bf16 matmuls are slow there)."""
    if dtype == "auto":
        return "bfloat16" if str(device).startswith("cuda") else "float32"
    if dtype not in TORCH_DTYPES:
        raise RecaptionError(f"--dtype {dtype!r}: expected auto, {', '.join(TORCH_DTYPES)}")
    return dtype


# ---------------------------------------------------------------- captioning


@dataclass(frozen=True)
class Generated:
    """One caption as the model wrote it: its text, and whether it ended (an end token) or ran out of tokens."""

    text: str
    finished: bool


class Captioner:
    """The loaded model and processor: ``caption(images)`` -> one :class:`Generated` per image."""

    def __init__(self, source: str, prompt: str, *, revision: Optional[str] = None, trust_remote_code: bool = False,
                 dtype: str = "float32", device: str = "cpu", generation: GenerationSettings = GenerationSettings()):
        self.processor = load_processor(source, revision, trust_remote_code)
        self.prompt = prompt  # the processor's text (prompt_text's result)
        self.device, self.dtype, self.generation = torch.device(device), TORCH_DTYPES[dtype], generation
        # Straight onto the GPU: eight processes of a node staging a 7B model in host memory first would need 8 x 14 GB.
        placement = {"device_map": {"": str(self.device)}} if self.device.type == "cuda" else {}
        self.model = AutoModelForImageTextToText.from_pretrained(
            resolve_model(source), revision=revision, local_files_only=True, trust_remote_code=trust_remote_code,
            dtype=self.dtype, **placement).to(self.device).eval()
        self.decoder_only = not getattr(self.model.config, "is_encoder_decoder", False)
        eos = self.model.generation_config.eos_token_id
        self.end_tokens = set([eos] if isinstance(eos, int) else (eos or []))
        self.pad_token_id = self.model.generation_config.pad_token_id
        if self.pad_token_id is None:
            self.pad_token_id = self.processor.tokenizer.pad_token_id
        if self.pad_token_id is None:
            self.pad_token_id = next(iter(self.end_tokens), None)

    @torch.inference_mode()
    def caption(self, images: Sequence[Image.Image], seed: Optional[int] = None) -> list[Generated]:
        """Captions of a batch of RGB images; ``seed`` fixes the draw when sampling."""
        inputs = self.processor(images=list(images), text=[self.prompt] * len(images), return_tensors="pt",
                                padding=True)
        inputs = {name: (value.to(self.device, self.dtype) if value.is_floating_point() else value.to(self.device))
                  for name, value in inputs.items()}
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            if seed is not None:
                torch.manual_seed(seed)
            out = self.model.generate(**inputs, **self.generation.generate_kwargs(), pad_token_id=self.pad_token_id)
        new = out[:, inputs["input_ids"].shape[1]:] if self.decoder_only else out  # (batch, new tokens)
        texts = self.processor.batch_decode(new, skip_special_tokens=True)
        return [Generated(" ".join(text.split()), any(int(t) in self.end_tokens for t in row.tolist()))
                for text, row in zip(texts, new)]

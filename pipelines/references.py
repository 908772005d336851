"""The frozen parts an exported pipeline names instead of copying, and the dtypes a run sampled them in.

An export holds what trained (megabytes); its VAE, CLIP, LLM and a frozen UNet are recorded in
``model_index.json`` as ``frozen_sources`` references (``{"library", "class", "source", "subfolder"}``) and
loaded from there when the folder is loaded, in the dtype the caller asked ``from_pretrained`` for, as diffusers
loads the parts a folder does hold. The run's own dtypes (``trained_dtypes``: the frozen parts in
``model.base.dtype`` / ``vae_dtype`` / ``model.llm.dtype``, the connector in float32) are recorded beside them,
so ``load_pipeline`` (pipelines/llm4gen_pipeline.py) samples an export exactly as ``generate.py`` samples its checkpoint.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
from pathlib import Path
from typing import Optional, Union

import torch

from llm4gen.encoders.llm import load_llm_config, load_llm_model
from llm4gen.encoders.sources import TORCH_DTYPES, resolve_source
from llm4gen.pipelines.single_file import load_single_file_base

FROZEN = ("vae", "text_encoder", "unet", "llm")  # the big frozen parts an export may name instead of copying
DtypeRequest = Union[torch.dtype, dict, None]  # diffusers' ``dtype=``: one dtype, or {component: dtype, "default": ...}

# The dtype a pipeline's from_pretrained was asked for, while it runs: its __init__ loads the referenced parts
# (diffusers hands __init__ no dtype for a component the folder does not hold).
_requested_dtype: contextvars.ContextVar[DtypeRequest] = contextvars.ContextVar("requested_dtype", default=None)


@contextlib.contextmanager
def loading_dtype(dtype: DtypeRequest):
    token = _requested_dtype.set(dtype)
    try:
        yield
    finally:
        _requested_dtype.reset(token)


def component_dtype(request: DtypeRequest, name: str) -> torch.dtype:
    """The dtype of component ``name`` under a ``dtype=`` request (float32 when nothing was asked)."""
    if isinstance(request, dict):
        chosen = request.get(name, request.get("default", torch.float32))
    else:
        chosen = request or torch.float32
    return TORCH_DTYPES[chosen] if isinstance(chosen, str) else chosen


def load_reference(name: str, reference: dict, dtype: torch.dtype = torch.float32, single_files: dict | None = None):
    """The frozen component ``name`` from its reference, in ``dtype``; ``embedded:`` sources resolve on any machine
    with llm4gen; the LLM goes through llm4gen's strict loader (RankGen's layout included); a single-file base
    (``config``: the local diffusers folder of its family) loads once per file into ``single_files``."""
    source = resolve_source(reference["source"])
    if reference.get("config"):
        single_files = {} if single_files is None else single_files
        if source not in single_files:
            single_files[source] = load_single_file_base(source, resolve_source(reference["config"]),
                                                         reference["family"])
        return torch.nn.Module.to(getattr(single_files[source], name), dtype)
    if reference["library"] == "llm4gen":  # the LLM, read as training read it
        config = load_llm_config(source, None, False)
        return saveable_llm(load_llm_model(source, config, reference.get("kind", "encoder"), dtype))
    if reference["library"] not in ("diffusers", "transformers"):  # the folder names what is imported: no other
        raise ValueError(f"frozen_sources names library {reference['library']!r}; an export names diffusers, "
                         f"transformers or llm4gen")
    loader = getattr(importlib.import_module(reference["library"]), reference["class"])
    subfolder = {"subfolder": reference["subfolder"]} if reference.get("subfolder") else {}
    dtype_argument = "dtype" if reference["library"] == "transformers" else "torch_dtype"  # each library's own name
    return loader.from_pretrained(source, **{dtype_argument: dtype}, **subfolder)


def resolve_frozen(components: dict, frozen_sources: Optional[dict]) -> dict:
    """``components`` with each one that is None and named in ``frozen_sources`` loaded from its reference, in the
    dtype the running ``from_pretrained`` was asked for."""
    single_files = {}
    for name, reference in (frozen_sources or {}).items():
        if components.get(name) is None:
            components[name] = load_reference(name, reference, component_dtype(_requested_dtype.get(), name),
                                              single_files)
    return components


def frozen_references(module) -> dict[str, dict]:
    """Where a trained module's frozen parts come from (the VAE, CLIP, the LLM, and the UNet when it did not
    train), as ``frozen_sources`` references: what an export names instead of copying."""
    cfg = module.cfg

    def source(path: str) -> str:
        local = Path(path).expanduser()
        return str(local.resolve()) if not path.startswith("embedded:") and local.exists() else path

    base = source(cfg.base.pretrained)
    references = {"vae": {"library": "diffusers", "class": "AutoencoderKL", "source": base, "subfolder": "vae"},
                  "text_encoder": {"library": "transformers", "class": "CLIPTextModel", "source": base,
                                   "subfolder": "text_encoder"},
                  "llm": {"library": "llm4gen", "class": "LLMEncoder", "source": source(cfg.llm.pretrained),
                          "kind": module.llm.kind}}
    if cfg.llm.lora_rank > 0:
        del references["llm"]  # its LoRA trained: the pipeline carries the merged LLM
    if cfg.base.family == "sdxl":
        references["text_encoder_2"] = {"library": "transformers", "class": "CLIPTextModelWithProjection",
                                        "source": base, "subfolder": "text_encoder_2"}
    if cfg.unet_training == "frozen":
        references["unet"] = {"library": "diffusers", "class": "UNet2DConditionModel",
                              "source": source(cfg.base.unet) if cfg.base.unet else base,
                              "subfolder": None if cfg.base.unet else "unet"}
    return references


def trained_dtypes(module) -> dict[str, str]:
    """The dtype each component of a training module's pipeline computed in (``model.base.dtype`` for the UNet and
    CLIP, ``vae_dtype``, ``model.llm.dtype``; what trains in float32), as diffusers' ``dtype=`` dict of names."""
    def name(component) -> str:
        return str(next(component.parameters()).dtype).removeprefix("torch.")

    parts = {"vae": module.vae, "unet": module.unet, "text_encoder": module.clip.text_encoder, "llm": module.llm.model,
             "adapter": module.adapter}
    if module.fusion is not None:
        parts["fusion"] = module.fusion
    if getattr(module.clip, "text_encoder_2", None) is not None:
        parts["text_encoder_2"] = module.clip.text_encoder_2
    return {key: name(part) for key, part in parts.items()}


def save_by_reference(pipe, directory, frozen_sources: dict[str, dict]) -> Path:
    """Saves ``pipe`` with the components named in ``frozen_sources`` recorded, not copied: null in
    ``model_index.json``, loaded from their sources when the folder is loaded (``from_pretrained(folder,
    vae=...)`` still replaces any of them)."""
    kept = {name: getattr(pipe, name) for name in frozen_sources}
    try:
        pipe.register_modules(**{name: None for name in frozen_sources})
        pipe.register_to_config(frozen_sources=frozen_sources)
        pipe.save_pretrained(directory, safe_serialization=True)
    finally:
        pipe.register_modules(**kept)
        pipe.register_to_config(frozen_sources=None)
    return Path(directory)


def saveable_llm(model):
    """The LLM as a transformers model that saves and loads by itself: a T5 encoder stack (what the training
    module reads) goes into a ``T5EncoderModel`` sharing its weights."""
    from transformers import PreTrainedModel, T5EncoderModel

    if type(model).__name__ == "T5Stack":  # a PreTrainedModel too, but not one from_pretrained can name
        encoder = T5EncoderModel(model.config)
        encoder.encoder, encoder.shared = model, model.embed_tokens
        return encoder.to(next(model.parameters()).dtype)
    if isinstance(model, PreTrainedModel):
        return model
    raise TypeError(f"cannot save an LLM of type {type(model).__name__} in a pipeline")

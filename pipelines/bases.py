"""A trained connector on another base of its family: a community SD1.5 or SDXL checkpoint, as a diffusers folder or
as one ``.safetensors`` / ``.ckpt`` file (pipelines/single_file.py).

The connector reads CLIP's hidden states and hands the UNet a context of the UNet's cross-attention width; a gated
fusion adds its own keys and values to every named cross-attention layer; SDXL's UNet also reads the pooled
embedding and the size/crop ids. So a base fits a connector when these shapes are the ones it was trained on:
:class:`BaseShapes`, read from configs and checkpoint headers only. A base that does not fit is refused, in one
paragraph naming both sides, before any of its weights load (:func:`check_base`); one that fits replaces the
pipeline's VAE, CLIP encoders, tokenizers and UNet (:func:`load_pipeline_on_base`, :func:`pipeline_on_base`).

    pipe = load_pipeline_on_base("runs/tiny/pipeline", "/models/dreamshaper_8.safetensors",
                                 config="/models/stable-diffusion-v1-5")   # the family's configs, local
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from huggingface_hub import snapshot_download

from llm4gen.adapters.gated_fusion import cross_attention_layers
from llm4gen.encoders.sources import resolve_source
from llm4gen.pipelines.dtypes import module_dtype
from llm4gen.pipelines.llm4gen_pipeline import install_fusion, load_pipeline
from llm4gen.pipelines.single_file import (
    is_single_file,
    load_single_file_base,
    single_file_family,
    tensor_shapes,
)

FAMILY_NAMES = {"sd15": "SD1.5", "sdxl": "SDXL"}
BASE_PARTS = ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "unet")


class BaseMismatch(ValueError):
    """A base the connector cannot condition (the message names both sides)."""


@dataclass(frozen=True)
class BaseShapes:
    """What a connector needs of the base it conditions."""

    family: str                            # sd15 | sdxl
    context_width: int                     # the UNet's cross-attention width
    clip_widths: tuple[int, ...]           # each CLIP text encoder's hidden width (SDXL: two)
    clip_vocab: tuple[int, ...]            # each one's token embeddings
    clip_positions: tuple[int, ...]        # each one's positions (77)
    tokenizer: tuple[int, int]             # the CLIP tokenizer's vocabulary and length
    pooled_width: Optional[int]            # SDXL: the second encoder's pooled projection
    time_ids_width: Optional[int]          # SDXL: the size/crop ids' embedding width in the added conditioning
    layers: tuple[tuple[str, int], ...]    # (name, inner width) of each UNet cross-attention layer

    def describe(self) -> str:
        clip = " + ".join(map(str, self.clip_widths))
        text = (f"an {FAMILY_NAMES[self.family]}-family base (cross-attention width {self.context_width}, CLIP {clip} "
                f"wide with {'/'.join(map(str, self.clip_vocab))} token embeddings and "
                f"{'/'.join(map(str, self.clip_positions))} positions, a tokenizer of {self.tokenizer[0]} tokens")
        if self.family == "sdxl":
            text += f", pooled embedding {self.pooled_width} wide, time ids {self.time_ids_width} wide"
        return text + f", {len(self.layers)} cross-attention layers)"


CHECKED = (("family", "family"), ("context_width", "cross-attention width"), ("clip_widths", "CLIP widths"),
           ("clip_vocab", "CLIP token embeddings"), ("clip_positions", "CLIP positions"),
           ("tokenizer", "CLIP tokenizer (vocabulary, length)"), ("pooled_width", "pooled embedding width"),
           ("time_ids_width", "time ids width"))


def check_base(trained: BaseShapes, candidate: BaseShapes, trained_name: str, candidate_name: str,
               fusion: bool = False, what: str = "the base") -> None:
    """Raises :class:`BaseMismatch` where ``candidate`` differs from the base the connector was trained on in a
    shape the connector (or, with ``fusion``, its gated layers, one per named cross-attention layer) reads."""
    differ = [f"{label} {getattr(trained, field)} vs {getattr(candidate, field)}" for field, label in CHECKED
              if getattr(trained, field) != getattr(candidate, field)]
    if fusion and trained.layers != candidate.layers:  # the fusion has one gated layer per named UNet layer
        ours, theirs = dict(trained.layers), dict(candidate.layers)
        name = next(n for n in sorted({*ours, *theirs}) if ours.get(n) != theirs.get(n))
        differ.append(f"the width of cross-attention layer {name}, which the gated fusion reads: "
                      f"{ours.get(name, 'absent')} vs {theirs.get(name, 'absent')}")
    if differ:
        raise BaseMismatch(
            f"{what} {candidate_name!r} is not a base this connector can condition: the connector was trained on "
            f"{trained_name!r}, {trained.describe()}; {candidate_name!r} is {candidate.describe()}. They differ in "
            f"{'; '.join(differ)} (trained vs given). Give a checkpoint of the connector's family with the same "
            f"shapes: an {FAMILY_NAMES[trained.family]} diffusers folder or single .safetensors/.ckpt file.")


# ------------------------------------------------------------------------------------------------ reading the shapes

def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def meta_unet(unet_config: dict):
    """A UNet of this config on the meta device: its structure, no memory, no weights."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel.from_config(unet_config)


def unet_layers(unet_config: dict) -> tuple[tuple[str, int], ...]:
    """The cross-attention layers of a UNet of this config."""
    layers = cross_attention_layers(meta_unet(unet_config))
    return tuple(sorted((name, layer.to_k.out_features) for name, layer in layers.items()))


def tokenizer_shape(folder: Path) -> tuple[int, int]:
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(str(folder))
    return len(tokenizer), int(tokenizer.model_max_length)


def shapes_from_folders(folders: dict[str, Path]) -> BaseShapes:
    """The shapes of a base whose parts' configs lie in ``folders`` (``unet``, ``text_encoder``, ``tokenizer``, and
    SDXL's ``text_encoder_2``): a diffusers folder's subfolders, or an export's references."""
    unet = read_json(folders["unet"] / "config.json")
    encoders = [read_json(folders[name] / "config.json") for name in ("text_encoder", "text_encoder_2")
                if name in folders]
    sdxl = unet.get("addition_embed_type") == "text_time"
    pooled = encoders[-1].get("projection_dim") if sdxl else None
    return BaseShapes(family="sdxl" if sdxl else "sd15", context_width=int(unet["cross_attention_dim"]),
                      clip_widths=tuple(int(e["hidden_size"]) for e in encoders),
                      clip_vocab=tuple(int(e["vocab_size"]) for e in encoders),
                      clip_positions=tuple(int(e["max_position_embeddings"]) for e in encoders),
                      tokenizer=tokenizer_shape(folders["tokenizer"]), pooled_width=pooled,
                      time_ids_width=int(unet["projection_class_embeddings_input_dim"]) - pooled if sdxl else None,
                      layers=unet_layers(unet))


def diffusers_folders(folder: Path) -> dict[str, Path]:
    index = read_json(folder / "model_index.json")
    return {name: folder / name for name in ("unet", "text_encoder", "text_encoder_2", "tokenizer")
            if isinstance(index.get(name), list) and index[name][0] is not None}


def single_file_shapes(path: Path, config: Path) -> BaseShapes:
    """The shapes of a single-file checkpoint, from its tensors' shapes (its layers' names through diffusers' own
    key conversion, with the UNet config of ``config``, the family's local diffusers folder)."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    shapes = tensor_shapes(path)
    family = single_file_family(shapes)
    if family is None:
        raise BaseMismatch(f"{str(path)!r} holds no Stable Diffusion text encoder under the original layout's names "
                           f"(cond_stage_model.transformer.* for SD1.5, conditioner.embedders.* for SDXL): not an "
                           f"SD1.5 or SDXL checkpoint in one file")
    unet_config = read_json(config / "unet" / "config.json")
    unet = convert_ldm_unet_checkpoint(shapes, unet_config)  # diffusers' names -> the file's shapes
    expected = {key: tuple(value.shape) for key, value in meta_unet(unet_config).state_dict().items()}
    strange = [key for key in expected if unet.get(key) is not None and tuple(unet[key]) != expected[key]]
    if strange or not set(expected) & set(unet):
        key = strange[0] if strange else next(iter(expected))
        raise BaseMismatch(f"the single file {str(path)!r} does not hold a UNet of the architecture of the configs it "
                           f"is read with ({str(config)!r}): {key} is {unet.get(key)} in the file, {expected[key]} in "
                           f"the configs. Give --base-config a local diffusers folder of the file's own architecture")
    layers = tuple(sorted((key.removesuffix(".to_k.weight"), shape[0]) for key, shape in unet.items()
                          if key.endswith("attn2.to_k.weight")))
    width = next(shape[1] for key, shape in unet.items() if key.endswith("attn2.to_k.weight"))
    clip = "conditioner.embedders.0.transformer.text_model." if family == "sdxl" else \
        "cond_stage_model.transformer.text_model."
    embeddings = [shapes[clip + "embeddings.token_embedding.weight"]]
    positions = [shapes[clip + "embeddings.position_embedding.weight"][0]]
    pooled = time_ids = None
    if family == "sdxl":
        open_clip = "conditioner.embedders.1.model."
        embeddings.append(shapes[open_clip + "token_embedding.weight"])
        positions.append(shapes[open_clip + "positional_embedding"][0])
        pooled = shapes[open_clip + "text_projection"][1]
        time_ids = unet["add_embedding.linear_1.weight"][1] - pooled
    return BaseShapes(family=family, context_width=int(width), clip_widths=tuple(e[1] for e in embeddings),
                      clip_vocab=tuple(e[0] for e in embeddings), clip_positions=tuple(positions),
                      tokenizer=tokenizer_shape(config / "tokenizer"), pooled_width=pooled, time_ids_width=time_ids,
                      layers=layers)


def local_folder(source: str, what: str) -> Path:
    """A diffusers folder on this machine for ``source`` (a path, an ``embedded:`` name, or a hub id already in the
    Hugging Face cache); never downloads."""
    resolved = resolve_source(source)
    if Path(resolved).is_dir():
        return Path(resolved)
    try:
        return Path(snapshot_download(resolved, local_files_only=True))
    except Exception as err:  # not a folder and not in the cache
        raise FileNotFoundError(f"{what} {source!r} is neither a local folder nor in the Hugging Face cache "
                                f"({type(err).__name__}); nothing is downloaded: give a local diffusers folder") from None


def base_shapes(base: str, config: Optional[str] = None) -> BaseShapes:
    """A candidate base's shapes: a diffusers folder (or cached hub id), or a single file read with the configs of
    ``config`` (the family's local diffusers folder)."""
    if is_single_file(base):
        if not Path(base).is_file():
            raise FileNotFoundError(f"the base {base!r} is not a file")
        if config is None:
            raise ValueError(f"the single-file base {base!r} needs the configs of a diffusers folder of its family "
                             f"(--base-config, e.g. the base the connector was trained on)")
        return single_file_shapes(Path(base), local_folder(config, "--base-config"))
    return shapes_from_folders(diffusers_folders(local_folder(base, "the base")))


def export_base(folder: Path) -> tuple[str, Optional[str], BaseShapes]:
    """The base an exported pipeline folder was made for: its name, the local diffusers folder of its family (for
    reading a single file), and its shapes, from the folder's own parts or the sources its ``frozen_sources``
    name (a diffusers folder's subfolders, or a single file with its configs)."""
    references = read_json(folder / "model_index.json").get("frozen_sources") or {}
    reference = references.get("text_encoder") or references.get("unet")
    if reference and reference.get("config"):  # exported for a single file
        config = reference["config"]
        return reference["source"], config, single_file_shapes(Path(reference["source"]),
                                                               local_folder(config, "the export's base configs"))
    folders = {}
    for name in ("unet", "text_encoder", "text_encoder_2", "tokenizer"):
        if name in references:
            source = Path(resolve_source(references[name]["source"]))
            subfolder = references[name].get("subfolder")
            folders[name] = source / subfolder if subfolder else source
        elif (folder / name).is_dir():
            folders[name] = folder / name
    name = reference["source"] if reference else str(folder)
    return name, reference["source"] if reference else None, shapes_from_folders(folders)


def pipeline_shapes(pipe) -> BaseShapes:
    """The shapes of the base a live pipeline holds."""
    encoders = [e for e in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if e is not None]
    unet = pipe.unet.config
    sdxl = unet.get("addition_embed_type") == "text_time"
    pooled = encoders[-1].config.projection_dim if sdxl else None
    layers = tuple(sorted((name, layer.to_k.out_features) for name, layer in cross_attention_layers(pipe.unet).items()))
    return BaseShapes(family="sdxl" if sdxl else "sd15", context_width=int(unet.cross_attention_dim),
                      clip_widths=tuple(e.config.hidden_size for e in encoders),
                      clip_vocab=tuple(e.config.vocab_size for e in encoders),
                      clip_positions=tuple(e.config.max_position_embeddings for e in encoders),
                      tokenizer=(len(pipe.tokenizer), int(pipe.tokenizer.model_max_length)), pooled_width=pooled,
                      time_ids_width=int(unet.projection_class_embeddings_input_dim) - pooled if sdxl else None,
                      layers=layers)


# --------------------------------------------------------------------------------------------------- loading a base

def load_base(base: str, family: str, config: Optional[str] = None):
    """The base as diffusers' StableDiffusion(XL)Pipeline (float32), from a folder or a single file."""
    if is_single_file(base):
        return load_single_file_base(base, local_folder(config, "--base-config"), family)
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    folder = local_folder(base, "the base")
    if family == "sdxl":
        return StableDiffusionXLPipeline.from_pretrained(folder, add_watermarker=False)
    return StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)


def base_parts(loaded) -> dict:
    return {name: getattr(loaded, name) for name in BASE_PARTS if getattr(loaded, name, None) is not None}


def check_export_base(folder, base: str, config: Optional[str] = None, what: str = "--base") -> BaseShapes:
    """Checks ``base`` against what the export in ``folder`` was trained on, reading configs and headers only;
    a single file's configs default to the export's own base. A UNet that trained with the connector is refused
    (another base would drop it; a full export, which names no source, cannot say, and is let through); a UNet
    LoRA is kept (it goes onto the new base's UNet)."""
    folder = Path(folder)
    index = read_json(folder / "model_index.json")
    references = index.get("frozen_sources") or {}
    trained_name, family_folder, trained = export_base(folder)
    if references and "unet" not in references and not (folder / "unet_lora").is_dir():
        raise BaseMismatch(f"{what} {base!r}: the pipeline in {str(folder)!r} carries a UNet that trained with its "
                           f"connector (model.unet_training=full); another base would replace what it learned. "
                           f"Only a connector trained over a frozen UNet (or with a UNet LoRA) moves to another base")
    fusion = isinstance(index.get("fusion"), list) and index["fusion"][0] is not None
    candidate = base_shapes(base, config or family_folder)
    check_base(trained, candidate, trained_name, base, fusion=fusion, what=what)
    return candidate


def check_model_base(model: dict, base: str, config: Optional[str] = None, what: str = "--base",
                     unet_moves: bool = True) -> BaseShapes:
    """Checks ``base`` against what a training run's connector (its resolved ``model`` config: a checkpoint's, an
    export's ``model_config.yaml``) was trained on, reading configs and headers only. Where the base's UNet would
    replace the run's (``unet_moves``), a run whose UNet trained (fully, or with a LoRA) is refused: export it
    (export.py) and give the pipeline folder instead."""
    if unet_moves and model.get("unet_training", "frozen") != "frozen":
        raise BaseMismatch(f"{what} {base!r}: this run trained its UNet with the connector (model.unet_training="
                           f"{model['unet_training']}); another base would replace what it learned. A connector "
                           f"trained over a frozen UNet moves to another base; a UNet LoRA moves with an exported "
                           f"pipeline (export.py, then --pipeline with --base)")
    trained_name = model["base"]["pretrained"]
    folders = diffusers_folders(local_folder(trained_name, "the run's model.base.pretrained"))
    if model["base"].get("unet"):  # a UNet folder of its own (the release's)
        folders["unet"] = local_folder(model["base"]["unet"], "the run's model.base.unet")
    candidate = base_shapes(base, config or trained_name)
    check_base(shapes_from_folders(folders), candidate, trained_name, base,
               fusion=model["adapter"].get("fusion") == "gated", what=what)
    return candidate


def load_pipeline_on_base(folder, base: str, config: Optional[str] = None, dtype=None, **kwargs):
    """The exported pipeline in ``folder`` (pipelines/llm4gen_pipeline.py ``load_pipeline``) over another base:
    checked first (:func:`check_export_base`), then the base's parts load and take the place of the export's, in
    the dtypes the export records; a UNet LoRA the run trained goes onto the new UNet."""
    folder = Path(folder)
    candidate = check_export_base(folder, base, config)
    loaded = load_base(base, candidate.family, config or export_base(folder)[1])
    pipe = load_pipeline(folder, dtype, **base_parts(loaded), **kwargs)
    if (folder / "unet_lora").is_dir():
        pipe.load_lora_weights(str(folder / "unet_lora"))
    return pipe


def pipeline_on_base(pipe, base: str, config: Optional[str] = None, trained_name: str = "its base"):
    """``pipe`` (an LLM4Gen pipeline whose UNet did not train) with another base's VAE, CLIP, tokenizers and UNet in
    place of its own, checked first; each new part in the dtype of the part it replaces."""
    candidate = base_shapes(base, config)
    check_base(pipeline_shapes(pipe), candidate, trained_name, base, fusion=pipe.fusion is not None)
    parts = base_parts(load_base(base, candidate.family, config))
    for name, part in parts.items():
        if isinstance(part, torch.nn.Module):
            torch.nn.Module.to(part, module_dtype(getattr(pipe, name)))
    pipe.register_modules(**parts)
    install_fusion(pipe.fusion, pipe.unet)
    return pipe


def base_references(references: dict[str, dict], base: str, family: str, config: Optional[str] = None) -> dict:
    """An export's ``frozen_sources`` with the base's parts (VAE, CLIP, a frozen UNet) named from ``base`` instead:
    a diffusers folder's subfolders, or a single file with the family folder whose configs it is read with."""
    single = is_single_file(base)
    source = str(Path(base).resolve()) if single or Path(base).exists() else base
    moved = {}
    for name, reference in references.items():
        if name in BASE_PARTS:
            reference = {"library": reference["library"], "class": reference["class"], "source": source,
                         "subfolder": name}
            if single:  # an embedded: name stays one (it resolves on any machine with llm4gen)
                folder = config if config.startswith("embedded:") else str(local_folder(config, "--base-config"))
                reference.update(config=folder, family=family)
        moved[name] = reference
    return moved

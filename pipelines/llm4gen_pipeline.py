"""``LLM4GenPipeline``: Stable Diffusion 1.5 conditioned on CLIP and a frozen LLM through a trained connector,
as a diffusers pipeline a recipient loads with ``DiffusionPipeline.from_pretrained(folder)``.

It is ``StableDiffusionPipeline`` with three more components, ``llm`` (a transformers model), ``llm_tokenizer``
and ``adapter`` (any connector of ``llm4gen.adapters.connectors``), and the LLM's reading rules in its config
(``llm_max_length``, ``llm_prefix``, ``llm_layer``, ``llm_layer_norm``, ``llm_zero_padding``, ``llm_kind``), so a
saved pipeline conditions exactly as training did. ``encode_prompt`` returns the connector's context instead of
CLIP's alone; everything else (schedulers, guidance, ``num_images_per_prompt``, ``callback_on_step_end``,
offloading, dtype moves, the output class) is the parent's. A timestep-aware connector (ELLA) is run inside each
UNet call at that call's timestep, for both halves of classifier-free guidance.

    pipe = LLM4GenPipeline.from_pretrained("runs/tiny/export/pipeline")
    image = pipe("a red circle and a blue square", generator=torch.Generator().manual_seed(0)).images[0]

Build one from a training module with :func:`pipeline_from_module`. The same mixin sits in front of diffusers'
ControlNet, T2I-Adapter, img2img and inpainting pipelines (pipelines/tools.py); another base of the family
replaces the base's parts after a check of its shapes (pipelines/bases.py).
"""

from __future__ import annotations

import contextlib
import copy
import json
from pathlib import Path
from typing import Any, Optional, Union

import diffusers
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.schedulers import KarrasDiffusionSchedulers
from transformers import (
    AutoTokenizer,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionModelWithProjection,
    PreTrainedModel,
)

# diffusers loads a component only from a module already imported: every connector's module, here
from llm4gen.adapters.connectors import CONNECTORS
from llm4gen.adapters.cross_adapter import CrossAdapter
from llm4gen.adapters.gated_fusion import GatedFusion
from llm4gen.adapters.release import RELEASED_PROJECTOR, RELEASED_UNET
from llm4gen.encoders.llm import LLMEncoder, LLMFeatures, common_length
from llm4gen.encoders.sources import resolve_source
from llm4gen.pipelines.conditioning import (  # noqa: F401 (guided_context_mask: the training module's too)
    context_conditioning,
    guided_context_mask,
    masks_padding,
    processors_kept,
    tool_parts,
)
from llm4gen.pipelines.dtypes import module_dtype, sampling_dtypes
from llm4gen.pipelines.references import (
    FROZEN,
    DtypeRequest,
    component_dtype,
    loading_dtype,
    resolve_frozen,
    saveable_llm,
    trained_dtypes,
)


SHIM_FILE = "pipeline"  # <folder>/pipeline.py: the class for DiffusionPipeline.from_pretrained(..., trust_remote_code=True)
SHIM = """# The pipeline class of this folder, for diffusers' custom-pipeline loading:
#     DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
# It is defined by the llm4gen package (pip install llm4gen); this file only names it.
from llm4gen.pipelines.llm4gen_pipeline import {name}  # noqa: F401
"""


def install_fusion(fusion: Optional[GatedFusion], unet) -> None:
    """A gated fusion's layers into the UNet's cross-attention (none: the UNet reads the context as it is)."""
    if fusion is not None and unet is not None:
        fusion.install(unet)


class LLMConditioning:
    """What both pipelines add to their parent: the LLM's features, the connector, and per-step conditioning
    for a timestep-aware connector. ``self.config`` holds the LLM's reading rules.

    Saved folders name their class as the hub's custom pipelines do (``"_class_name": ["pipeline",
    "LLM4GenPipeline"]`` beside a ``pipeline.py`` that imports it), so a bare
    ``DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`` finds it; this class's own
    ``from_pretrained`` reads the same folder without running any of its code."""

    _guided_text = None  # (clip, llm, clip_negative, llm_negative) while a pipeline call runs
    _given_texts = None  # encodings to read the prompts from (texts_given)
    connector_component = "adapter"  # the T2I-Adapter pipelines name theirs "adapter": there the connector is "connector"

    def connector_model(self):
        """The trained connector (``adapter``, or ``connector`` beside a T2I-Adapter)."""
        return getattr(self, self.connector_component)

    def register_llm(self, llm, llm_tokenizer, connector, fusion: Optional[GatedFusion], **reading_rules) -> None:
        """What every LLM4Gen pipeline's ``__init__`` adds to its parent's: the LLM, its tokenizer, the connector,
        the gated fusion (installed in the UNet) and the LLM's reading rules (config)."""
        self.register_modules(llm=llm, llm_tokenizer=llm_tokenizer, fusion=fusion,
                              **{self.connector_component: connector})
        install_fusion(fusion, self.unet)
        self.register_to_config(**reading_rules)

    @classmethod
    def from_pipe(cls, pipeline, **kwargs):
        """diffusers' ``from_pipe`` (``LLM4GenControlNetPipeline.from_pipe(pipe, controlnet=...)``): the same
        components, shared; each keeps the dtype it has (diffusers' own casts every part to one dtype, float32
        unless ``torch_dtype`` is given: a bf16 UNet beside an fp32 VAE would not stay so)."""
        if isinstance(pipeline, LLMConditioning):
            kwargs.setdefault(cls.connector_component, pipeline.connector_model())
        if {"dtype", "torch_dtype"} & set(kwargs):
            return super().from_pipe(pipeline, **kwargs)
        kept = {id(part): module_dtype(part) for part in tool_parts({**pipeline.components, **kwargs}.values())}
        verbosity = diffusers.utils.logging.get_verbosity()
        diffusers.utils.logging.set_verbosity_error()  # its cast's notice on every model: undone right below
        try:
            made = super().from_pipe(pipeline, **kwargs)
        finally:
            diffusers.utils.logging.set_verbosity(verbosity)
        for part in tool_parts(made.components.values()):
            if id(part) in kept:
                torch.nn.Module.to(part, kept[id(part)])
        return made

    def load_ip_adapter(self, *args, **kwargs):
        """diffusers' ``load_ip_adapter``; under a gated fusion, each cross-attention layer then runs one processor
        doing both (adapters/gated_fusion.py ``GatedIPAdapterProcessor``), not IP-Adapter's alone."""
        super().load_ip_adapter(*args, **kwargs)
        install_fusion(self.fusion, self.unet)

    def unload_ip_adapter(self):
        super().unload_ip_adapter()  # every cross-attention layer back to diffusers' default processor
        install_fusion(self.fusion, self.unet)

    def text_readers(self) -> list:
        """The models besides the UNet that read the context (a pipeline's ControlNets)."""
        return []

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """diffusers' ``from_pretrained``; the frozen parts the folder references (``frozen_sources``) load in the dtype
        asked for (``dtype=`` / ``torch_dtype=``, one or a dict by component) as the parts it holds do."""
        with loading_dtype(kwargs.get("dtype", kwargs.get("torch_dtype"))):
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    @classmethod
    def load_config(cls, *args, **kwargs):
        loaded = super().load_config(*args, **kwargs)
        config = loaded[0] if isinstance(loaded, tuple) else loaded
        if isinstance(config, dict) and isinstance(config.get("_class_name"), (list, tuple)):
            config["_class_name"] = config["_class_name"][1]  # this class is the one the folder names
        return loaded

    def save_pretrained(self, save_directory, *args, **kwargs):
        super().save_pretrained(save_directory, *args, **kwargs)
        index = Path(save_directory) / "model_index.json"
        config = json.loads(index.read_text())
        config["_class_name"] = [SHIM_FILE, type(self).__name__]
        index.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        (Path(save_directory) / f"{SHIM_FILE}.py").write_text(SHIM.format(name=type(self).__name__))

    # ---- the LLM's features, read as training read them: by encoders/llm.py's reader over this pipeline's LLM

    def llm_reader(self) -> LLMEncoder:
        """An :class:`~llm4gen.encoders.llm.LLMEncoder` over ``self.llm`` and ``self.llm_tokenizer`` (shared) with the
        reading rules this pipeline was saved with."""
        c = self.config
        return LLMEncoder.from_model(self.llm, self.llm_tokenizer, c.llm_kind, layer=c.llm_layer,
                                     layer_norm=c.llm_layer_norm, max_length=c.llm_max_length, prefix=c.llm_prefix,
                                     zero_padding=c.llm_zero_padding)

    @torch.no_grad()
    def encode_llm(self, prompts: list[str], device) -> LLMFeatures:
        """(batch, llm_max_length, llm_dim) features and their mask."""
        return self.llm_reader()(prompts, device)

    def connect(self, clip_hidden: torch.Tensor, llm: LLMFeatures, timestep=None) -> torch.Tensor:
        connector = self.connector_model()
        dtype = next(connector.parameters()).dtype
        return connector(clip_hidden.to(dtype), llm.features.to(dtype), llm.mask, timestep=timestep)

    def connector_context(self, clip, clip_negative, llm: LLMFeatures, llm_negative: LLMFeatures,
                          num_images_per_prompt: int, guided: bool):
        """The connector's context for prompts and negatives from their CLIP hidden states (batch, 77, clip_dim)
        and LLM features, each repeated ``num_images_per_prompt`` times; kept for the per-step calls (padding
        masks, ELLA's timestep). Every LLM4GEN image is sampled through here: a pipeline's own prompts, and a
        training module's texts (:meth:`texts_given`)."""
        if masks_padding(self.connector_model()):  # padding leaves the context: each half cut to its longest, then one length
            llm, llm_negative = llm.trimmed(), llm_negative.trimmed()
        llm, llm_negative = common_length(llm, llm_negative)

        def repeat(x: torch.Tensor) -> torch.Tensor:
            return x.repeat_interleave(num_images_per_prompt, dim=0)

        clip, clip_negative = repeat(clip), repeat(clip_negative)
        llm = LLMFeatures(repeat(llm.features), repeat(llm.mask))
        llm_negative = LLMFeatures(repeat(llm_negative.features), repeat(llm_negative.mask))
        first = self.scheduler.config.num_train_timesteps - 1 if self.connector_model().timestep_aware else None
        self._guided_text = (clip, llm, clip_negative, llm_negative)
        # float32: the latents take the context's dtype and stay float32; the UNet reads it in its own (dtypes.py)
        context = self.connect(clip, llm, first).float()
        negative = self.connect(clip_negative, llm_negative, first).float() if guided else None
        return context, negative

    @contextlib.contextmanager
    def texts_given(self, clip, clip_negative, llm: LLMFeatures, llm_negative: LLMFeatures, pooled=None,
                    pooled_negative=None):
        """While active, a call's prompts are read from these encodings (a training module's own encoders: its
        CLIP windows, its LLM reader) instead of this pipeline's encoders; the rest of the call is the same."""
        self._given_texts = (clip, clip_negative, llm, llm_negative, pooled, pooled_negative)
        try:
            yield self
        finally:
            self._given_texts = None

    def prompt_texts(self, prompts: list[str], negatives: list[str], device, clip_texts):
        """(clip, clip_negative, llm, llm_negative, *clip's extras): the given encodings, else ``clip_texts()``
        (this pipeline's CLIP encoding) and its LLM reader's features."""
        if self._given_texts is not None:
            clip, clip_negative, llm, llm_negative, *extras = self._given_texts
            if clip.shape[0] != len(prompts):
                raise ValueError(f"{clip.shape[0]} encoded texts were given for {len(prompts)} prompts")
            return (clip, clip_negative, llm, llm_negative, *extras)
        clip, clip_negative, *extras = clip_texts()
        return (clip, clip_negative, self.encode_llm(prompts, device), self.encode_llm(negatives, device), *extras)

    @staticmethod
    def prompt_lists(prompt, negative_prompt) -> tuple[list[str], list[str]]:
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        negatives = ([""] * len(prompts) if negative_prompt is None else
                     [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt))
        return prompts, negatives

    def per_step_context(self):
        """While active, every call of the UNet (and of a ControlNet) gets the padding mask of its context and, from
        a timestep-aware connector, its context at that call's timestep (from the texts ``encode_prompt`` kept; none
        kept: the call is left as it is, e.g. for ``prompt_embeds`` given by the caller); a gated fusion's layers
        sit in the ControlNets' cross-attention too (pipelines/conditioning.py)."""
        stack = contextlib.ExitStack()
        stack.enter_context(context_conditioning(self.unet, self.connector_model(), self.connect,
                                                 lambda: self._guided_text, self.text_readers()))
        for reader in self.text_readers() if self.fusion is not None else ():
            stack.enter_context(processors_kept(reader))
            self.fusion.install_in_controlnet(reader)
        return stack

    @torch.no_grad()
    def __call__(self, *args, **kwargs):
        try:  # the dtype casts innermost: they see the context the per-step hook hands the UNet
            with self.per_step_context(), sampling_dtypes(self.unet, self.vae, others=self.text_readers()):
                return super().__call__(*args, **kwargs)
        finally:
            self._guided_text = None


class SDPrompts(LLMConditioning):
    """Stable Diffusion 1.5's ``encode_prompt`` (one signature across diffusers' SD1.5 pipelines: text-to-image,
    img2img, inpainting, ControlNet, T2I-Adapter) giving the connector's context."""

    def encode_prompt(self, prompt, device, num_images_per_prompt, do_classifier_free_guidance, negative_prompt=None,
                      prompt_embeds: Optional[torch.Tensor] = None, negative_prompt_embeds: Optional[torch.Tensor] = None,
                      lora_scale: Optional[float] = None, clip_skip: Optional[int] = None):
        """The connector's context for the prompts and the negative prompts (``prompt_embeds`` given: used as
        they are, already a connector's context)."""
        if prompt_embeds is not None:
            return super().encode_prompt(prompt, device, num_images_per_prompt, do_classifier_free_guidance,
                                         negative_prompt, prompt_embeds, negative_prompt_embeds, lora_scale, clip_skip)
        prompts, negatives = self.prompt_lists(prompt, negative_prompt)
        clip, clip_negative, llm, llm_negative, *_ = self.prompt_texts(
            prompts, negatives, device, lambda: super(SDPrompts, self).encode_prompt(
                prompts, device, 1, True, negatives, lora_scale=lora_scale, clip_skip=clip_skip))  # (batch, 77, clip_dim)
        return self.connector_context(clip, clip_negative, llm, llm_negative, num_images_per_prompt,
                                      do_classifier_free_guidance)


class XLPrompts(LLMConditioning):
    """SDXL's ``encode_prompt`` (one signature across diffusers' SDXL pipelines): both CLIP encoders'
    penultimate states through the connector; the pooled embedding stays SDXL's own. The negative prompt goes
    through the connector like the prompt (never zeros), as in training's caption dropout."""

    def encode_prompt(self, prompt, prompt_2=None, device=None, num_images_per_prompt: int = 1,
                      do_classifier_free_guidance: bool = True, negative_prompt=None, negative_prompt_2=None,
                      prompt_embeds=None, negative_prompt_embeds=None, pooled_prompt_embeds=None,
                      negative_pooled_prompt_embeds=None, lora_scale=None, clip_skip=None):
        """(context, negative context, pooled, negative pooled); given ``prompt_embeds`` are used as they are."""
        if prompt_embeds is not None:
            return super().encode_prompt(prompt, prompt_2, device, num_images_per_prompt, do_classifier_free_guidance,
                                         negative_prompt, negative_prompt_2, prompt_embeds, negative_prompt_embeds,
                                         pooled_prompt_embeds, negative_pooled_prompt_embeds, lora_scale, clip_skip)
        prompts, negatives = self.prompt_lists(prompt, negative_prompt)
        clip, clip_negative, llm, llm_negative, pooled, pooled_negative = self.prompt_texts(
            prompts, negatives, device, lambda: super(XLPrompts, self).encode_prompt(
                prompts, None, device, 1, True, negatives, None, lora_scale=lora_scale, clip_skip=clip_skip))
        context, negative = self.connector_context(clip, clip_negative, llm, llm_negative, num_images_per_prompt,
                                                   do_classifier_free_guidance)
        pooled = pooled.repeat_interleave(num_images_per_prompt, dim=0)
        pooled_negative = pooled_negative.repeat_interleave(num_images_per_prompt, dim=0)
        return context, negative, pooled, pooled_negative


# The components' types, as diffusers' from_pipe reads them off __init__ (a model is handed over only where its
# type is among its parameter's annotation).
Connector = Union[tuple(CONNECTORS.values())]
READING_RULES = ("llm_max_length", "llm_prefix", "llm_layer", "llm_layer_norm", "llm_zero_padding", "llm_kind",
                 "frozen_sources", "trained_dtypes")


def reading_rules(arguments: dict) -> dict:
    """The LLM's reading rules among an ``__init__``'s arguments (its ``locals()``)."""
    return {name: arguments[name] for name in READING_RULES}


class LLM4GenPipeline(SDPrompts, StableDiffusionPipeline):
    model_cpu_offload_seq = "llm->text_encoder->adapter->unet->vae"
    # the frozen parts may be saved by reference (``frozen_sources``): null in model_index.json, loaded from there
    _optional_components = [*StableDiffusionPipeline._optional_components, *FROZEN, "fusion"]

    def __init__(self, vae: AutoencoderKL, text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer,
                 unet: UNet2DConditionModel, scheduler: KarrasDiffusionSchedulers, llm: PreTrainedModel, llm_tokenizer,
                 adapter: Connector, safety_checker=None, feature_extractor=None,
                 image_encoder: Optional[CLIPVisionModelWithProjection] = None, requires_safety_checker: bool = False,
                 llm_max_length: int = 32, llm_prefix: str = "", llm_layer: Any = -1, llm_layer_norm: str = "auto",
                 llm_zero_padding: bool = True, llm_kind: str = "encoder", frozen_sources: Optional[dict] = None,
                 fusion: Optional[GatedFusion] = None, trained_dtypes: Optional[dict] = None):
        frozen = resolve_frozen(dict(vae=vae, text_encoder=text_encoder, unet=unet, llm=llm), frozen_sources)
        super().__init__(vae=frozen["vae"], text_encoder=frozen["text_encoder"], tokenizer=tokenizer,
                         unet=frozen["unet"], scheduler=scheduler, safety_checker=safety_checker,
                         feature_extractor=feature_extractor, image_encoder=image_encoder,
                         requires_safety_checker=requires_safety_checker)
        self.register_llm(frozen["llm"], llm_tokenizer, adapter, fusion, **reading_rules(locals()))

    @classmethod
    def from_release(cls, folder, base: str, llm: str, llm_tokenizer: Optional[str] = None, llm_max_length: int = 256,
                     llm_prefix: str = "pre ", llm_zero_padding: bool = False, num_heads: int = 8,
                     scheduler: str = "DDIMScheduler", torch_dtype: torch.dtype = torch.float32,
                     vae_dtype: torch.dtype = torch.float32, mask_padding: bool = True) -> "LLM4GenPipeline":
        """The authors' release (``projector.pth`` + optionally ``unet/``, adapters/release.py) over the base SD1.5
        folder or hub id ``base`` and the T5 encoder ``llm`` (the release's RankGen T5-XL; its tokenizer
        ``llm_tokenizer`` when elsewhere). The defaults are the release's: 256 tokens, "pre ", pad-token outputs
        kept, except that LLM padding is masked out of every attention; ``mask_padding=False`` runs the release
        exactly as published (all 256 positions attended). ``torch_dtype``: the UNet, CLIP and T5's (bfloat16 on a
        GPU); the VAE takes ``vae_dtype`` and the CAM stays float32, as training keeps them (pipelines/dtypes.py).
        ``generate.py --release`` samples the same images."""
        folder, base = Path(folder), resolve_source(base)
        unet_source = folder if (folder / RELEASED_UNET / "config.json").is_file() else base  # the release's own UNet
        unet = diffusers.UNet2DConditionModel.from_pretrained(unet_source, subfolder="unet", torch_dtype=torch_dtype)
        encoder = LLMEncoder(llm, tokenizer=llm_tokenizer, kind="encoder-decoder", max_length=llm_max_length,
                             prefix=llm_prefix, zero_padding=llm_zero_padding, dtype=torch_dtype)
        tokenizer = AutoTokenizer.from_pretrained(resolve_source(llm_tokenizer or llm))
        tokenizer.padding_side = "right"
        return cls(vae=diffusers.AutoencoderKL.from_pretrained(base, subfolder="vae", torch_dtype=vae_dtype),
                   text_encoder=CLIPTextModel.from_pretrained(base, subfolder="text_encoder", dtype=torch_dtype),
                   tokenizer=CLIPTokenizer.from_pretrained(base, subfolder="tokenizer"), unet=unet,
                   scheduler=getattr(diffusers, scheduler).from_pretrained(base, subfolder="scheduler", clip_sample=False),
                   llm=saveable_llm(encoder.model), llm_tokenizer=tokenizer,
                   adapter=CrossAdapter.from_released(folder / RELEASED_PROJECTOR, num_heads=num_heads,
                                                      use_llm_mask=mask_padding),
                   llm_max_length=llm_max_length, llm_prefix=llm_prefix, llm_layer=-1, llm_layer_norm="auto",
                   llm_zero_padding=llm_zero_padding, llm_kind="encoder-decoder")



class LLM4GenXLPipeline(XLPrompts, StableDiffusionXLPipeline):
    """``LLM4GenPipeline`` for SDXL: both CLIP encoders' penultimate states through the connector; the pooled
    embedding and the size/crop ids stay SDXL's own."""

    model_cpu_offload_seq = "llm->text_encoder->text_encoder_2->adapter->unet->vae"
    _optional_components = [*StableDiffusionXLPipeline._optional_components, *FROZEN, "text_encoder_2", "fusion"]

    def __init__(self, vae: AutoencoderKL, text_encoder: CLIPTextModel, text_encoder_2: CLIPTextModelWithProjection,
                 tokenizer: CLIPTokenizer, tokenizer_2: CLIPTokenizer, unet: UNet2DConditionModel,
                 scheduler: KarrasDiffusionSchedulers, llm: PreTrainedModel, llm_tokenizer, adapter: Connector,
                 image_encoder: Optional[CLIPVisionModelWithProjection] = None, feature_extractor=None,
                 force_zeros_for_empty_prompt: bool = False, add_watermarker: Optional[bool] = False,
                 llm_max_length: int = 32, llm_prefix: str = "", llm_layer: Any = -1, llm_layer_norm: str = "auto",
                 llm_zero_padding: bool = True, llm_kind: str = "encoder", frozen_sources: Optional[dict] = None,
                 fusion: Optional[GatedFusion] = None, trained_dtypes: Optional[dict] = None):
        frozen = resolve_frozen(dict(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, unet=unet,
                                     llm=llm), frozen_sources)
        super().__init__(vae=frozen["vae"], text_encoder=frozen["text_encoder"],
                         text_encoder_2=frozen["text_encoder_2"], tokenizer=tokenizer, tokenizer_2=tokenizer_2,
                         unet=frozen["unet"], scheduler=scheduler, image_encoder=image_encoder,
                         feature_extractor=feature_extractor, force_zeros_for_empty_prompt=force_zeros_for_empty_prompt,
                         add_watermarker=add_watermarker)
        self.register_llm(frozen["llm"], llm_tokenizer, adapter, fusion, **reading_rules(locals()))


def pipeline_from_module(module, scheduler: str = "DDIMScheduler", for_saving: bool = True):
    """An ``LLM4GenPipeline`` (SD1.5) or ``LLM4GenXLPipeline`` (SDXL) over a trained ``LLM4GenModule``'s
    components (shared, not copied): save it with ``save_pretrained`` (one CLIP window only, a trained LLM LoRA
    merged into a copy). ``for_saving=False``: the module's own sampling pipeline, which the module hands its
    texts (``texts_given``): any number of CLIP windows, the LLM as it is."""
    if for_saving and module.clip.context_length != module.clip.tokenizer.model_max_length:
        raise ValueError(f"a pipeline reads one 77-token CLIP window; this module has model.base.clip_chunks="
                         f"{module.cfg.base.clip_chunks}")
    if not module.uses_cam:
        raise ValueError("this module trains no connector (model.adapter.enabled=false): use StableDiffusionPipeline")
    llm, text = module.llm, module.clip
    llm_model = merged_lora_copy(llm.model) if llm.trains and for_saving else llm.model  # a trained LLM LoRA, merged
    common = dict(vae=module.vae, unet=module.unet,
                  scheduler=getattr(diffusers, scheduler).from_config(module.noise_scheduler.config),
                  text_encoder=text.text_encoder, tokenizer=text.tokenizer, llm=saveable_llm(llm_model),
                  llm_tokenizer=llm.tokenizer, adapter=module.adapter, llm_max_length=module.cfg.llm.max_length,
                  llm_prefix=llm.prefix, llm_layer=module.cfg.llm.layer,
                  llm_layer_norm=str(module.cfg.llm.layer_norm), llm_zero_padding=llm.zero_padding,
                  llm_kind=llm.kind, fusion=module.fusion, trained_dtypes=trained_dtypes(module))
    if module.cfg.base.family == "sdxl":
        return LLM4GenXLPipeline(text_encoder_2=text.text_encoder_2, tokenizer_2=text.tokenizer_2, **common)
    return LLM4GenPipeline(**common)


def merged_lora_copy(model):
    """A copy of a model with its injected LoRA layers merged into the base weights and removed."""
    from diffusers.utils.peft_utils import recurse_remove_peft_layers
    from peft.tuners.tuners_utils import BaseTunerLayer  # peft: only LoRA runs need it

    merged = copy.deepcopy(model)
    for layer in merged.modules():
        if isinstance(layer, BaseTunerLayer):
            layer.merge()
    recurse_remove_peft_layers(merged)
    return merged.requires_grad_(False)


PIPELINES = {"LLM4GenPipeline": LLM4GenPipeline, "LLM4GenXLPipeline": LLM4GenXLPipeline}


def pipeline_class(folder) -> type:
    """The LLM4GenPipeline or LLM4GenXLPipeline a folder's ``model_index.json`` names (read without weights)."""
    index = Path(folder) / "model_index.json"
    if not index.is_file():
        raise FileNotFoundError(f"{str(folder)!r} is not a pipeline folder: it has no model_index.json "
                                f"(export.py --format diffusers writes one)")
    try:
        name = json.loads(index.read_text()).get("_class_name")
    except ValueError as err:
        raise ValueError(f"{index} is not valid JSON ({err})") from None
    name = name[1] if isinstance(name, list) and len(name) == 2 else name
    if name not in PIPELINES:
        raise ValueError(f"{index} names {name!r}, not one of {', '.join(PIPELINES)}")
    return PIPELINES[name]


def load_pipeline(folder, dtype: DtypeRequest = None, **kwargs):
    """The LLM4GenPipeline or LLM4GenXLPipeline a folder's ``model_index.json`` names, each component in the dtype
    the run sampled it in (its recorded ``trained_dtypes``: e.g. a bf16 UNet and CLIP, an fp32 VAE and connector),
    so that it samples what ``generate.py`` samples from the run's checkpoint; ``dtype`` (one, or a dict by
    component) replaces them. A folder without the record loads in float32, as diffusers loads it. Weights are read
    from safetensors files only (export.py writes no other kind)."""
    pipe = pipeline_class(folder).from_pretrained(folder, **{"use_safetensors": True, **kwargs})
    if dtype is None and not {"dtype", "torch_dtype"} & set(kwargs):
        dtype = json.loads((Path(folder) / "model_index.json").read_text()).get("trained_dtypes")
    # Cast after loading: the values from_pretrained(dtype=) gives, on every diffusers since the floor (a dict of
    # dtypes needs 0.32). nn.Module's own .to: diffusers' override warns of fp32-kept modules where a model has none.
    for name, component in pipe.components.items() if dtype else ():
        if isinstance(component, torch.nn.Module):
            torch.nn.Module.to(component, component_dtype(dtype, name))
    return pipe

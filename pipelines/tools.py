"""A trained connector with the tools Stable Diffusion users already use: ControlNet (one or several),
T2I-Adapter, img2img and inpainting, for SD1.5 and SDXL, as thin subclasses of diffusers' own pipelines.

Each is its diffusers pipeline with the LLM4Gen mixin in front (pipelines/llm4gen_pipeline.py): the same
``__call__`` and sampling loop, ``encode_prompt`` giving the connector's context, and, while a call runs, hooks
that hand every model reading the text (the UNet and each ControlNet) the mask of the context's LLM padding and
ELLA's per-step context (pipelines/conditioning.py), and cast at each part's door (pipelines/dtypes.py). A gated
fusion sits in the ControlNets' cross-attention as in the UNet's. IP-Adapter and LoRAs need no class of their
own: ``load_ip_adapter`` and ``load_lora_weights`` work on every pipeline here and on ``LLM4GenPipeline``.

    pipe = load_pipeline("runs/tiny/pipeline")                                   # the export
    controlled = LLM4GenControlNetPipeline.from_pipe(pipe, controlnet=controlnet)  # shares every part
    image = controlled("a red circle", image=edges, controlnet_conditioning_scale=0.8).images[0]

In the T2I-Adapter pipelines diffusers' ``adapter`` is the T2I-Adapter, so the connector is ``connector`` there
(``from_pipe`` hands it over by itself).
"""

from __future__ import annotations

from typing import Any, Optional, Union

from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    MultiAdapter,
    StableDiffusionAdapterPipeline,
    StableDiffusionControlNetPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionXLAdapterPipeline,
    StableDiffusionXLControlNetPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    T2IAdapter,
    UNet2DConditionModel,
)
from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel
from diffusers.schedulers import KarrasDiffusionSchedulers
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer, CLIPVisionModelWithProjection
from transformers import PreTrainedModel

from llm4gen.adapters.gated_fusion import GatedFusion
from llm4gen.pipelines.llm4gen_pipeline import Connector, SDPrompts, XLPrompts, reading_rules
from llm4gen.pipelines.references import FROZEN, resolve_frozen

ControlNets = Union[ControlNetModel, list, tuple, MultiControlNetModel]
T2IAdapters = Union[T2IAdapter, MultiAdapter, list]
SD_FROZEN = ("vae", "text_encoder", "unet", "llm")
XL_FROZEN = ("vae", "text_encoder", "text_encoder_2", "unet", "llm")


def frozen_parts(names, arguments: dict) -> dict:
    """The frozen parts among an ``__init__``'s arguments, those a folder names by reference loaded."""
    return resolve_frozen({name: arguments[name] for name in names}, arguments["frozen_sources"])


class ControlNetReaders:
    """A ControlNet pipeline's ControlNets read the context too."""

    def text_readers(self) -> list:
        nets = self.controlnet.nets if isinstance(self.controlnet, MultiControlNetModel) else [self.controlnet]
        return [net for net in nets if net is not None]


# ---------------------------------------------------------------------------------------------- Stable Diffusion 1.5

class LLM4GenImg2ImgPipeline(SDPrompts, StableDiffusionImg2ImgPipeline):
    model_cpu_offload_seq = "llm->text_encoder->adapter->image_encoder->unet->vae"
    _optional_components = [*StableDiffusionImg2ImgPipeline._optional_components, *FROZEN, "fusion"]

    def __init__(self, vae: AutoencoderKL, text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer,
                 unet: UNet2DConditionModel, scheduler: KarrasDiffusionSchedulers, llm: PreTrainedModel, llm_tokenizer,
                 adapter: Connector, safety_checker=None, feature_extractor=None,
                 image_encoder: Optional[CLIPVisionModelWithProjection] = None, requires_safety_checker: bool = False,
                 llm_max_length: int = 32, llm_prefix: str = "", llm_layer: Any = -1, llm_layer_norm: str = "auto",
                 llm_zero_padding: bool = True, llm_kind: str = "encoder", frozen_sources: Optional[dict] = None,
                 fusion: Optional[GatedFusion] = None, trained_dtypes: Optional[dict] = None):
        parts = frozen_parts(SD_FROZEN, locals())
        super().__init__(vae=parts["vae"], text_encoder=parts["text_encoder"], tokenizer=tokenizer, unet=parts["unet"],
                         scheduler=scheduler, safety_checker=safety_checker, feature_extractor=feature_extractor,
                         image_encoder=image_encoder, requires_safety_checker=requires_safety_checker)
        self.register_llm(parts["llm"], llm_tokenizer, adapter, fusion, **reading_rules(locals()))


class LLM4GenInpaintPipeline(SDPrompts, StableDiffusionInpaintPipeline):
    model_cpu_offload_seq = "llm->text_encoder->adapter->image_encoder->unet->vae"
    _optional_components = [*StableDiffusionInpaintPipeline._optional_components, *FROZEN, "fusion"]

    def __init__(self, vae: AutoencoderKL, text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer,
                 unet: UNet2DConditionModel, scheduler: KarrasDiffusionSchedulers, llm: PreTrainedModel, llm_tokenizer,
                 adapter: Connector, safety_checker=None, feature_extractor=None,
                 image_encoder: Optional[CLIPVisionModelWithProjection] = None, requires_safety_checker: bool = False,
                 llm_max_length: int = 32, llm_prefix: str = "", llm_layer: Any = -1, llm_layer_norm: str = "auto",
                 llm_zero_padding: bool = True, llm_kind: str = "encoder", frozen_sources: Optional[dict] = None,
                 fusion: Optional[GatedFusion] = None, trained_dtypes: Optional[dict] = None):
        parts = frozen_parts(SD_FROZEN, locals())
        super().__init__(vae=parts["vae"], text_encoder=parts["text_encoder"], tokenizer=tokenizer, unet=parts["unet"],
                         scheduler=scheduler, safety_checker=safety_checker, feature_extractor=feature_extractor,
                         image_encoder=image_encoder, requires_safety_checker=requires_safety_checker)
        self.register_llm(parts["llm"], llm_tokenizer, adapter, fusion, **reading_rules(locals()))


class LLM4GenControlNetPipeline(ControlNetReaders, SDPrompts, StableDiffusionControlNetPipeline):
    """One ControlNet, or several (a list: diffusers' ``MultiControlNetModel``), each reading the connector's
    context with its padding masked."""

    model_cpu_offload_seq = "llm->text_encoder->adapter->image_encoder->unet->vae"
    _optional_components = [*StableDiffusionControlNetPipeline._optional_components, *FROZEN, "fusion"]

    def __init__(self, vae: AutoencoderKL, text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer,
                 unet: UNet2DConditionModel, controlnet: ControlNets, scheduler: KarrasDiffusionSchedulers,
                 llm: PreTrainedModel, llm_tokenizer, adapter: Connector, safety_checker=None, feature_extractor=None,
                 image_encoder: Optional[CLIPVisionModelWithProjection] = None, requires_safety_checker: bool = False,
                 llm_max_length: int = 32, llm_prefix: str = "", llm_layer: Any = -1, llm_layer_norm: str = "auto",
                 llm_zero_padding: bool = True, llm_kind: str = "encoder", frozen_sources: Optional[dict] = None,
                 fusion: Optional[GatedFusion] = None, trained_dtypes: Optional[dict] = None):
        parts = frozen_parts(SD_FROZEN, locals())
        super().__init__(vae=parts["vae"], text_encoder=parts["text_encoder"], tokenizer=tokenizer, unet=parts["unet"],
                         controlnet=controlnet, scheduler=scheduler, safety_checker=safety_checker,
                         feature_extractor=feature_extractor, image_encoder=image_encoder,
                         requires_safety_checker=requires_safety_checker)
        self.register_llm(parts["llm"], llm_tokenizer, adapter, fusion, **reading_rules(locals()))


class LLM4GenAdapterPipeline(SDPrompts, StableDiffusionAdapterPipeline):
    """A T2I-Adapter (``adapter``, as diffusers names it) beside the connector (``connector``)."""

    connector_component = "connector"
    model_cpu_offload_seq = "llm->text_encoder->connector->adapter->unet->vae"
    _optional_components = [*StableDiffusionAdapterPipeline._optional_components, *FROZEN, "fusion"]

    def __init__(self, vae: AutoencoderKL, text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer,
                 unet: UNet2DConditionModel, adapter: T2IAdapters, scheduler: KarrasDiffusionSchedulers,
                 llm: PreTrainedModel, llm_tokenizer, connector: Connector, safety_checker=None, feature_extractor=None,
                 requires_safety_checker: bool = False, llm_max_length: int = 32, llm_prefix: str = "",
                 llm_layer: Any = -1, llm_layer_norm: str = "auto", llm_zero_padding: bool = True,
                 llm_kind: str = "encoder", frozen_sources: Optional[dict] = None, fusion: Optional[GatedFusion] = None,
                 trained_dtypes: Optional[dict] = None):
        parts = frozen_parts(SD_FROZEN, locals())
        super().__init__(vae=parts["vae"], text_encoder=parts["text_encoder"], tokenizer=tokenizer, unet=parts["unet"],
                         adapter=adapter, scheduler=scheduler, safety_checker=safety_checker,
                         feature_extractor=feature_extractor, requires_safety_checker=requires_safety_checker)
        self.register_llm(parts["llm"], llm_tokenizer, connector, fusion, **reading_rules(locals()))


# --------------------------------------------------------------------------------------------------------------- SDXL

class LLM4GenXLImg2ImgPipeline(XLPrompts, StableDiffusionXLImg2ImgPipeline):
    model_cpu_offload_seq = "llm->text_encoder->text_encoder_2->adapter->image_encoder->unet->vae"
    _optional_components = [*StableDiffusionXLImg2ImgPipeline._optional_components, *FROZEN, "text_encoder_2",
                            "fusion"]

    def __init__(self, vae: AutoencoderKL, text_encoder: CLIPTextModel, text_encoder_2: CLIPTextModelWithProjection,
                 tokenizer: CLIPTokenizer, tokenizer_2: CLIPTokenizer, unet: UNet2DConditionModel,
                 scheduler: KarrasDiffusionSchedulers, llm: PreTrainedModel, llm_tokenizer, adapter: Connector,
                 image_encoder: Optional[CLIPVisionModelWithProjection] = None, feature_extractor=None,
                 requires_aesthetics_score: bool = False, force_zeros_for_empty_prompt: bool = False,
                 add_watermarker: Optional[bool] = False, llm_max_length: int = 32, llm_prefix: str = "",
                 llm_layer: Any = -1, llm_layer_norm: str = "auto", llm_zero_padding: bool = True,
                 llm_kind: str = "encoder", frozen_sources: Optional[dict] = None, fusion: Optional[GatedFusion] = None,
                 trained_dtypes: Optional[dict] = None):
        parts = frozen_parts(XL_FROZEN, locals())
        super().__init__(vae=parts["vae"], text_encoder=parts["text_encoder"], text_encoder_2=parts["text_encoder_2"],
                         tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=parts["unet"], scheduler=scheduler,
                         image_encoder=image_encoder, feature_extractor=feature_extractor,
                         requires_aesthetics_score=requires_aesthetics_score,
                         force_zeros_for_empty_prompt=force_zeros_for_empty_prompt, add_watermarker=add_watermarker)
        self.register_llm(parts["llm"], llm_tokenizer, adapter, fusion, **reading_rules(locals()))


class LLM4GenXLInpaintPipeline(XLPrompts, StableDiffusionXLInpaintPipeline):
    model_cpu_offload_seq = "llm->text_encoder->text_encoder_2->adapter->image_encoder->unet->vae"
    _optional_components = [*StableDiffusionXLInpaintPipeline._optional_components, *FROZEN, "text_encoder_2",
                            "fusion"]

    def __init__(self, vae: AutoencoderKL, text_encoder: CLIPTextModel, text_encoder_2: CLIPTextModelWithProjection,
                 tokenizer: CLIPTokenizer, tokenizer_2: CLIPTokenizer, unet: UNet2DConditionModel,
                 scheduler: KarrasDiffusionSchedulers, llm: PreTrainedModel, llm_tokenizer, adapter: Connector,
                 image_encoder: Optional[CLIPVisionModelWithProjection] = None, feature_extractor=None,
                 requires_aesthetics_score: bool = False, force_zeros_for_empty_prompt: bool = False,
                 add_watermarker: Optional[bool] = False, llm_max_length: int = 32, llm_prefix: str = "",
                 llm_layer: Any = -1, llm_layer_norm: str = "auto", llm_zero_padding: bool = True,
                 llm_kind: str = "encoder", frozen_sources: Optional[dict] = None, fusion: Optional[GatedFusion] = None,
                 trained_dtypes: Optional[dict] = None):
        parts = frozen_parts(XL_FROZEN, locals())
        super().__init__(vae=parts["vae"], text_encoder=parts["text_encoder"], text_encoder_2=parts["text_encoder_2"],
                         tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=parts["unet"], scheduler=scheduler,
                         image_encoder=image_encoder, feature_extractor=feature_extractor,
                         requires_aesthetics_score=requires_aesthetics_score,
                         force_zeros_for_empty_prompt=force_zeros_for_empty_prompt, add_watermarker=add_watermarker)
        self.register_llm(parts["llm"], llm_tokenizer, adapter, fusion, **reading_rules(locals()))


class LLM4GenXLControlNetPipeline(ControlNetReaders, XLPrompts, StableDiffusionXLControlNetPipeline):
    model_cpu_offload_seq = "llm->text_encoder->text_encoder_2->adapter->image_encoder->unet->vae"
    _optional_components = [*StableDiffusionXLControlNetPipeline._optional_components, *FROZEN, "text_encoder_2",
                            "fusion"]

    def __init__(self, vae: AutoencoderKL, text_encoder: CLIPTextModel, text_encoder_2: CLIPTextModelWithProjection,
                 tokenizer: CLIPTokenizer, tokenizer_2: CLIPTokenizer, unet: UNet2DConditionModel,
                 controlnet: ControlNets, scheduler: KarrasDiffusionSchedulers, llm: PreTrainedModel, llm_tokenizer,
                 adapter: Connector, force_zeros_for_empty_prompt: bool = False, add_watermarker: Optional[bool] = False,
                 feature_extractor=None, image_encoder: Optional[CLIPVisionModelWithProjection] = None,
                 llm_max_length: int = 32, llm_prefix: str = "", llm_layer: Any = -1, llm_layer_norm: str = "auto",
                 llm_zero_padding: bool = True, llm_kind: str = "encoder", frozen_sources: Optional[dict] = None,
                 fusion: Optional[GatedFusion] = None, trained_dtypes: Optional[dict] = None):
        parts = frozen_parts(XL_FROZEN, locals())
        super().__init__(vae=parts["vae"], text_encoder=parts["text_encoder"], text_encoder_2=parts["text_encoder_2"],
                         tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=parts["unet"], controlnet=controlnet,
                         scheduler=scheduler, force_zeros_for_empty_prompt=force_zeros_for_empty_prompt,
                         add_watermarker=add_watermarker, feature_extractor=feature_extractor,
                         image_encoder=image_encoder)
        self.register_llm(parts["llm"], llm_tokenizer, adapter, fusion, **reading_rules(locals()))


class LLM4GenXLAdapterPipeline(XLPrompts, StableDiffusionXLAdapterPipeline):
    connector_component = "connector"
    model_cpu_offload_seq = "llm->text_encoder->text_encoder_2->connector->adapter->image_encoder->unet->vae"
    _optional_components = [*StableDiffusionXLAdapterPipeline._optional_components, *FROZEN, "text_encoder_2",
                            "fusion"]

    def __init__(self, vae: AutoencoderKL, text_encoder: CLIPTextModel, text_encoder_2: CLIPTextModelWithProjection,
                 tokenizer: CLIPTokenizer, tokenizer_2: CLIPTokenizer, unet: UNet2DConditionModel,
                 adapter: T2IAdapters, scheduler: KarrasDiffusionSchedulers, llm: PreTrainedModel, llm_tokenizer,
                 connector: Connector, force_zeros_for_empty_prompt: bool = False, feature_extractor=None,
                 image_encoder: Optional[CLIPVisionModelWithProjection] = None, llm_max_length: int = 32,
                 llm_prefix: str = "", llm_layer: Any = -1, llm_layer_norm: str = "auto", llm_zero_padding: bool = True,
                 llm_kind: str = "encoder", frozen_sources: Optional[dict] = None, fusion: Optional[GatedFusion] = None,
                 trained_dtypes: Optional[dict] = None):
        parts = frozen_parts(XL_FROZEN, locals())
        super().__init__(vae=parts["vae"], text_encoder=parts["text_encoder"], text_encoder_2=parts["text_encoder_2"],
                         tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=parts["unet"], adapter=adapter,
                         scheduler=scheduler, force_zeros_for_empty_prompt=force_zeros_for_empty_prompt,
                         feature_extractor=feature_extractor, image_encoder=image_encoder)
        self.register_llm(parts["llm"], llm_tokenizer, connector, fusion, **reading_rules(locals()))


TOOL_PIPELINES = {cls.__name__: cls for cls in (
    LLM4GenImg2ImgPipeline, LLM4GenInpaintPipeline, LLM4GenControlNetPipeline, LLM4GenAdapterPipeline,
    LLM4GenXLImg2ImgPipeline, LLM4GenXLInpaintPipeline, LLM4GenXLControlNetPipeline, LLM4GenXLAdapterPipeline)}

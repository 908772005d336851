"""What every model call that reads the text gets while an LLM4Gen pipeline samples: the connector's context
(ELLA's, at the call's own timestep) and the mask of its LLM padding.

diffusers' pipelines hand the UNet, and a ControlNet, the context alone (``prompt_embeds``): none of them passes
an ``encoder_attention_mask``, and a zero token at a padded position still scores 0 in every softmax (~180 of
them took 60% of the cross-attention; adapters/layout.py). So the calls are conditioned from outside, by hooks
that live while the pipeline's ``__call__`` runs, and diffusers' sampling loops run unchanged:

- the **UNet** gets ``encoder_attention_mask`` (its forward turns it into the bias every ``attn2`` reads);
- a **ControlNet** has no such argument (its ``attention_mask`` goes to the self-attention), so each of its
  cross-attention layers gets the same bias, as the UNet's would, as ``attention_mask``;
- both get ELLA's context at their call's timestep, for both halves of classifier-free guidance.

A call's batch is either the prompts or ``[negatives; prompts]`` (guidance's doubled batch, in the order
diffusers' Stable Diffusion pipelines concatenate them; a ControlNet in guess mode sees the prompts alone).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterable

import torch
from diffusers.models.attention_processor import Attention

from llm4gen.encoders.llm import LLMFeatures

UNET_MASK_BIAS = -10000.0  # what UNet2DConditionModel makes of a 0 in encoder_attention_mask


def masks_padding(connector) -> bool:
    """Whether LLM padding leaves the UNet's attention under this connector (its ``use_llm_mask``, saved with it)."""
    return bool(getattr(connector.config, "use_llm_mask", False)) and connector.layout.has_word_positions


def guided_context_mask(connector, clip: torch.Tensor, llm: LLMFeatures) -> torch.Tensor | None:
    """(batch, context tokens) bool: the UNet's ``encoder_attention_mask`` for a context made of ``clip``
    (batch, 77, dim) and ``llm``; None where nothing is masked."""
    return connector.layout.context_mask(clip.shape[1], llm.mask) if masks_padding(connector) else None


def needs_per_call_conditioning(connector) -> bool:
    return connector.timestep_aware or masks_padding(connector)


def mask_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(batch, 1, tokens): a (batch, tokens) bool mask as the additive bias the UNet gives its ``attn2`` layers."""
    return ((1 - mask.to(dtype)) * UNET_MASK_BIAS)[:, None]


def cross_attentions(model) -> list[Attention]:
    return [module for module in model.modules() if isinstance(module, Attention) and module.is_cross_attention]


@contextlib.contextmanager
def context_conditioning(unet, connector, connect: Callable, texts: Callable, controlnets: Iterable = ()):
    """While active, every call of ``unet`` and of each ControlNet is conditioned as training conditions the UNet.

    ``connect(clip_hidden, llm, timestep)`` is the connector; ``texts()`` gives ``(clip_hidden, llm,
    negative_clip_hidden, negative_llm)``, the two LLM halves padded to one length, or None to leave the call as
    it is (e.g. ``prompt_embeds`` given by the caller)."""
    controlnets = list(controlnets)
    if not needs_per_call_conditioning(connector):
        yield
        return

    def condition(args, kwargs):
        """(args, kwargs, mask) of one call, its context replaced for a timestep-aware connector."""
        held = texts()
        if held is None:
            return args, kwargs, None
        clip, llm, clip_negative, llm_negative = held
        sample = args[0] if args else kwargs["sample"]
        if sample.shape[0] == 2 * clip.shape[0]:
            clip = torch.cat([clip_negative, clip])
            llm = LLMFeatures(torch.cat([llm_negative.features, llm.features]), torch.cat([llm_negative.mask, llm.mask]))
        elif sample.shape[0] != clip.shape[0]:
            raise ValueError(f"a model was called on {sample.shape[0]} latents for {clip.shape[0]} prompts")
        if connector.timestep_aware:
            timestep = args[1] if len(args) > 1 else kwargs["timestep"]
            context = connect(clip, llm, timestep).float()  # the model's door casts it (dtypes.py)
            if len(args) > 2:
                args = (*args[:2], context, *args[3:])
            else:
                kwargs["encoder_hidden_states"] = context
        return args, kwargs, guided_context_mask(connector, clip, llm)

    def unet_hook(module, args, kwargs):
        args, kwargs, mask = condition(args, kwargs)
        if mask is not None:
            kwargs["encoder_attention_mask"] = mask
        return args, kwargs

    masks: dict[int, torch.Tensor | None] = {}  # by ControlNet: the mask of its call in progress

    def controlnet_hook(module, args, kwargs):
        args, kwargs, masks[id(module)] = condition(args, kwargs)
        return args, kwargs

    def attention_hook(owner: int):
        def hook(attn, args, kwargs):
            mask = masks.get(owner)
            context = args[1] if len(args) > 1 else kwargs.get("encoder_hidden_states")
            if mask is None or kwargs.get("attention_mask") is not None or context is None:
                return args, kwargs
            if isinstance(context, tuple):  # IP-Adapter's (text, image tokens): the mask is the text's
                context = context[0]
            if context.shape[1] != mask.shape[1]:
                raise ValueError(f"a ControlNet's cross-attention read {context.shape[1]} context tokens; the "
                                 f"connector's mask has {mask.shape[1]}")
            hidden = args[0] if args else kwargs["hidden_states"]
            kwargs["attention_mask"] = mask_bias(mask, hidden.dtype)
            return args, kwargs
        return hook

    handles = [unet.register_forward_pre_hook(unet_hook, with_kwargs=True)]
    for controlnet in controlnets:
        handles.append(controlnet.register_forward_pre_hook(controlnet_hook, with_kwargs=True))
        handles += [attn.register_forward_pre_hook(attention_hook(id(controlnet)), with_kwargs=True)
                    for attn in cross_attentions(controlnet)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        masks.clear()


@contextlib.contextmanager
def processors_kept(model):
    """The attention processors of ``model`` as they are now, restored on leaving."""
    kept = model.attn_processors
    try:
        yield
    finally:
        model.set_attn_processor(kept)


def tool_parts(components) -> list[torch.nn.Module]:
    """The modules among a pipeline's components, several ControlNets or T2I-Adapters each on its own."""
    parts = []
    for component in components:
        if isinstance(component, (list, tuple)):
            parts += tool_parts(component)
        elif isinstance(component, torch.nn.Module):
            nested = getattr(component, "nets", None) or getattr(component, "adapters", None)  # Multi*Model
            parts += tool_parts(nested) if isinstance(nested, torch.nn.ModuleList) else [component]
    return parts

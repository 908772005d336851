"""The gated fusion: the LLM tokens get their own attention inside every UNet cross-attention layer, added to
the base's attention over CLIP through a learnable gate that starts at zero, so that at step 0 the UNet is
exactly the base (bitwise), whatever the connector outputs.

In each cross-attention layer (``attn2`` of SD's transformer blocks), for pixel queries ``q = to_q(x)``:

    h_clip = softmax(q K_clip^T / sqrt(d)) V_clip            # the base's own attention, its own to_k / to_v, on CLIP
    h_llm  = softmax(q K_llm^T / sqrt(d) + mask) V_llm       # K_llm = W_k' p, V_llm = W_v' p over the LLM tokens p
    out    = to_out(h_clip + tanh(g) h_llm)                  # g = 0 at the start

The context handed to the UNet stays ``[CLIP's tokens, the connector's tokens]`` (the CAM's layout), so caching,
the entity loss's word positions, guidance and the pipelines are unchanged; only the processors of the
cross-attention layers read it in two parts. ``W_k'`` and ``W_v'`` start as copies of the layer's own key and
value projections (IP-Adapter's decoupled cross-attention, Ye et al. 2023, starts its image projections so),
and the tanh gate at zero is Flamingo's (Alayrac et al. 2022): the new branch joins only as fast as the
diffusion loss pulls the gate open. Concatenation instead puts the LLM tokens into CLIP's softmax, where even
near-zero tokens take a share of the attention from the first step (docs/pitfalls: 0.875 -> 0.729 on the
shapes base with 14 of them).

The layers live in :class:`GatedFusion`, a diffusers ``ModelMixin`` of their own (``save_pretrained`` /
``from_pretrained``); :meth:`GatedFusion.install` points the UNet's cross-attention processors at them. The
processors are plain objects, not modules, so the UNet's own state dict and parameters never hold the fusion's.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.image_processor import IPAdapterMaskProcessor
from diffusers.models.attention_processor import Attention, AttnProcessor2_0, IPAdapterAttnProcessor2_0
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from llm4gen.adapters.attention import attention_probabilities, writes_out

FUSION_FOLDER = "fusion"  # beside an exported connector: <export>/adapter/fusion/


def cross_attention_layers(unet) -> dict[str, Attention]:
    """The UNet's cross-attention modules by name (``down_blocks.1.attentions.0.transformer_blocks.0.attn2``)."""
    return {name: module for name, module in unet.named_modules()
            if isinstance(module, Attention) and module.is_cross_attention}


def layer_key(name: str) -> str:
    return name.replace(".", "__")  # ModuleDict keys cannot hold dots


class GatedLLMAttention(nn.Module):
    """One layer's keys and values over the LLM tokens, and its gate (a scalar, tanh, zero at the start)."""

    def __init__(self, context_dim: int, inner_dim: int):
        super().__init__()
        self.to_k = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=False)
        self.gate = nn.Parameter(torch.zeros(()))

    def forward(self, llm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(keys, values) of the LLM tokens (batch, tokens, context_dim) -> (batch, tokens, inner_dim) each."""
        return self.to_k(llm), self.to_v(llm)

    def keys_values(self, llm: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``forward`` for a UNet stored in another dtype (a bf16 UNet's context, these fp32 layers, when sampling
        outside autocast): the tokens read in this layer's dtype, keys and values handed back in the attention's
        ``dtype`` (pipelines/dtypes.py). Called as a module, so a sharded layer gathers its weights."""
        keys, values = self(llm.to(self.to_k.weight.dtype))
        return keys.to(dtype), values.to(dtype)

    def openness(self) -> torch.Tensor:
        return torch.tanh(self.gate)


class GatedFusion(ModelMixin, ConfigMixin):
    """The gated LLM attention of every cross-attention layer of one UNet.

    Args:
        layer_widths: ``[[name, inner_dim], ...]``: each cross-attention layer's name in the UNet and its attention
            width.
        context_dim: the context's width (the UNet's ``cross_attention_dim``).
        clip_tokens: how many leading context tokens are CLIP's (77; the rest are the connector's).
    """

    @register_to_config
    def __init__(self, layer_widths: list, context_dim: int = 768, clip_tokens: int = 77):
        super().__init__()
        if not layer_widths:
            raise ValueError("a gated fusion needs at least one cross-attention layer")
        self.layers = nn.ModuleDict({layer_key(name): GatedLLMAttention(context_dim, int(inner))
                                     for name, inner in layer_widths})

    @classmethod
    def for_unet(cls, unet, clip_tokens: int) -> "GatedFusion":
        """A fusion for every cross-attention layer of ``unet``, its key and value projections copied from the
        layer's own (the gates are zero, so the UNet's output is the base's until they open)."""
        layers = cross_attention_layers(unet)
        fusion = cls([[name, module.to_k.out_features] for name, module in layers.items()],
                     context_dim=unet.config.cross_attention_dim, clip_tokens=clip_tokens)
        with torch.no_grad():
            for name, module in layers.items():
                gated = fusion.layers[layer_key(name)]
                gated.to_k.weight.copy_(base_weight(module.to_k))
                gated.to_v.weight.copy_(base_weight(module.to_v))
        return fusion

    def install(self, unet) -> None:
        """Points every cross-attention layer of ``unet`` at its gated attention (refused if the UNet's layers are
        not the ones this fusion was made for). A layer that runs IP-Adapter's decoupled attention gets one
        processor doing both (:class:`GatedIPAdapterProcessor`)."""
        layers = cross_attention_layers(unet)
        names = [name for name, _ in self.config.layer_widths]
        if sorted(names) != sorted(layers):
            raise ValueError(f"this gated fusion was made for a UNet with cross-attention layers {names[:3]}... "
                             f"({len(names)}), this UNet has {list(layers)[:3]}... ({len(layers)}): another base?")
        self._point(layers)

    def install_in_controlnet(self, controlnet) -> None:
        """The same for a ControlNet made from the UNet (its down and middle blocks, named as the UNet's): its
        cross-attention layers read the context through the gated layers of the UNet's layers of the same name,
        so that a closed gate leaves it the base's ControlNet too. Refused where a layer has no counterpart."""
        layers = cross_attention_layers(controlnet)
        widths = {name: int(inner) for name, inner in self.config.layer_widths}
        strangers = [f"{name} ({module.to_k.out_features} wide)" for name, module in layers.items()
                     if widths.get(name) != module.to_k.out_features]
        if strangers:
            raise ValueError(f"this ControlNet's cross-attention layers {', '.join(strangers[:3])} have no layer of the "
                             f"same name and width in the UNet this gated fusion was made for: a ControlNet of another "
                             f"base (the fusion's layers: {', '.join(list(widths)[:3])}...)")
        self._point(layers)

    def _point(self, layers: dict[str, Attention]) -> None:
        for name, module in layers.items():
            gated = self.layers[layer_key(name)]
            current = module.processor
            if getattr(current, "fusion_layer", None) is gated:
                continue
            fused = GatedFusionProcessor(gated, self.config.clip_tokens)
            if isinstance(current, IPAdapterAttnProcessor2_0):  # loaded before the fusion: keep both
                fused = GatedIPAdapterProcessor(current, fused)
            module.set_processor(fused)

    def openness(self) -> torch.Tensor:
        """|tanh(gate)| of every layer, (layers,): how far each layer lets the LLM's attention in."""
        return torch.stack([layer.openness().abs() for layer in self.layers.values()])


def base_weight(linear: nn.Module) -> torch.Tensor:
    """A projection's weight, through a LoRA wrapper if one is there (peft keeps the original in base_layer)."""
    return getattr(linear, "base_layer", linear).weight


def installed_fusion(unet) -> bool:
    return any(isinstance(p, GatedFusionProcessor) for p in unet.attn_processors.values())


class GatedFusionProcessor:
    """diffusers' ``AttnProcessor2_0`` over the context's CLIP tokens, step for step (so a closed gate gives
    the base's output bitwise), plus the gated attention over the LLM tokens before the output projection.

    ``attention_mask`` (the UNet's ``encoder_attention_mask`` as a bias over the whole context) is read for the
    LLM tokens; CLIP's tokens are attended as the base attends them, unmasked. A row with no real LLM token
    gets nothing from the LLM branch. With ``store`` set and enabled (the entity loss's capture,
    losses/attention_capture.py), both softmaxes are written out and recorded side by side, (batch, pixels,
    clip tokens + LLM tokens), each half summing to one."""

    def __init__(self, layer: GatedLLMAttention, clip_tokens: int):
        self.layer = layer
        self.clip_tokens = clip_tokens
        self.store, self.name = None, None

    @property
    def fusion_layer(self) -> GatedLLMAttention:
        return self.layer

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args, **kwargs):
        if encoder_hidden_states is None:
            raise ValueError("the gated fusion sits in cross-attention layers; this call has no context")
        if encoder_hidden_states.shape[1] <= self.clip_tokens:  # CLIP's context alone: the base's attention
            return AttnProcessor2_0()(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        return self.attend(attn, hidden_states, encoder_hidden_states, attention_mask, temb)

    def attend(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
               attention_mask: torch.Tensor | None, temb: torch.Tensor | None, added=None) -> torch.Tensor:
        """The layer's output for a context of CLIP's tokens and the LLM's. ``added(query, attended)``, when given,
        returns ``attended`` (batch, pixels, inner) with more attention added before the output projection (an
        IP-Adapter's image tokens); ``query`` is (batch, heads, pixels, head_dim)."""
        clip_tokens = self.clip_tokens
        clip = encoder_hidden_states[:, :clip_tokens].contiguous()  # as the base reads it
        llm = encoder_hidden_states[:, clip_tokens:]
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size = clip.shape[0]
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if attn.norm_cross:
            clip, llm = attn.norm_encoder_hidden_states(clip), attn.norm_encoder_hidden_states(llm)
        key, value = attn.to_k(clip), attn.to_v(clip)
        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads

        def heads(x: torch.Tensor) -> torch.Tensor:  # (batch, tokens, inner) -> (batch, heads, tokens, head_dim)
            return x.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)

        query, key, value = heads(query), heads(key), heads(value)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        llm_key, llm_value = map(heads, self.layer.keys_values(llm, query.dtype))
        if attn.norm_k is not None:
            llm_key = attn.norm_k(llm_key)
        real = (attention_mask[:, 0, clip_tokens:] > -1.0 if attention_mask is not None   # the UNet's bias: 0 or -10000
                else torch.ones(llm.shape[:2], dtype=torch.bool, device=llm.device))     # (batch, llm_tokens)
        has_tokens = real.any(dim=1)
        keep = real | ~has_tokens[:, None]  # a row without real tokens attends to all (then gets nothing)
        llm_mask = keep[:, None, None, :]

        if writes_out(self.store):  # the softmaxes written out, for the entity loss (recorded while it keeps maps)
            probs = attention_probabilities(query, key, attn.scale)                        # (batch, heads, pixels, 77)
            llm_probs = attention_probabilities(query, llm_key, attn.scale, llm_mask)      # (batch, heads, pixels, L)
            self.store.record(self.name, torch.cat([probs, llm_probs], dim=-1).mean(dim=1))
            hidden_states = torch.matmul(probs.to(value.dtype), value)
            llm_hidden = torch.matmul(llm_probs.to(llm_value.dtype), llm_value)
        else:
            hidden_states = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
            llm_hidden = F.scaled_dot_product_attention(query, llm_key, llm_value, attn_mask=llm_mask, dropout_p=0.0,
                                                        is_causal=False)
        gate = self.layer.openness().to(llm_hidden.dtype) * has_tokens.to(llm_hidden.dtype)[:, None, None, None]
        hidden_states = hidden_states + gate * llm_hidden  # + 0 exactly while the gate is closed
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        if added is not None:
            hidden_states = added(query, hidden_states)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


class GatedIPAdapterProcessor(IPAdapterAttnProcessor2_0):
    """IP-Adapter's decoupled cross-attention and the gated fusion in one layer (both replace the same ``attn2``
    processors; loaded one after the other, the second would silently drop the first):

        out = to_out(h_clip + tanh(g) h_llm + sum_i scale_i h_image_i)

    ``h_clip + tanh(g) h_llm`` is :class:`GatedFusionProcessor`'s, ``h_image_i`` IP-Adapter's attention over its
    image tokens with its own key and value projections, added as ``IPAdapterAttnProcessor2_0`` adds it (after
    the text attention, before the output projection). So the gate closed gives IP-Adapter's processor over
    CLIP's tokens bitwise, and the scale at 0 the gated fusion's bitwise. It is an ``IPAdapterAttnProcessor2_0``
    (diffusers' ``set_ip_adapter_scale`` and ``unload_ip_adapter`` find it): its image projections are the ones
    loaded, shared; the gated layer is held as a plain attribute, so the UNet's state dict never holds it."""

    def __init__(self, ip_adapter: IPAdapterAttnProcessor2_0, fused: GatedFusionProcessor):
        nn.Module.__init__(self)
        self.hidden_size, self.cross_attention_dim = ip_adapter.hidden_size, ip_adapter.cross_attention_dim
        self.num_tokens, self.scale = ip_adapter.num_tokens, ip_adapter.scale
        self.to_k_ip, self.to_v_ip = ip_adapter.to_k_ip, ip_adapter.to_v_ip
        self.fused = fused  # not a module: not registered

    @property
    def fusion_layer(self) -> GatedLLMAttention:
        return self.fused.layer

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states=None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, scale: float = 1.0,
                 ip_adapter_masks=None):
        if not isinstance(encoder_hidden_states, tuple):
            raise ValueError("IP-Adapter's layers read (text context, image tokens); this call has no image tokens "
                             "(pass ip_adapter_image or ip_adapter_image_embeds, or unload_ip_adapter)")
        text, images = encoder_hidden_states
        if text.shape[1] <= self.fused.clip_tokens:  # CLIP's context alone: IP-Adapter's processor as it is
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb, scale,
                                    ip_adapter_masks)
        masks = ip_adapter_masks if ip_adapter_masks is not None else [None] * len(self.scale)
        if not isinstance(masks, list):
            masks = list(masks.unsqueeze(1))  # [num_ip_adapters, 1, height, width], as diffusers accepts it
        if not len(masks) == len(self.scale) == len(images):
            raise ValueError(f"{len(images)} IP-Adapter image inputs for {len(self.scale)} loaded IP-Adapters and "
                             f"{len(masks)} masks: give one each")

        def add_images(query: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
            batch_size, heads, _, head_dim = query.shape
            for tokens, weight, to_k, to_v, mask in zip(images, self.scale, self.to_k_ip, self.to_v_ip, masks):
                weights = weight if isinstance(weight, list) else [weight] * (mask.shape[1] if mask is not None else 1)
                if all(w == 0 for w in weights):
                    continue
                per_image = [tokens[:, i] for i in range(mask.shape[1])] if mask is not None else [tokens]
                for i, image in enumerate(per_image):  # (batch, image tokens, context dim)
                    key = to_k(image).view(batch_size, -1, heads, head_dim).transpose(1, 2)
                    value = to_v(image).view(batch_size, -1, heads, head_dim).transpose(1, 2)
                    seen = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
                    seen = seen.transpose(1, 2).reshape(batch_size, -1, heads * head_dim).to(query.dtype)
                    if mask is not None:  # where in the image this IP image applies (IPAdapterMaskProcessor's)
                        region = IPAdapterMaskProcessor.downsample(mask[:, i], batch_size, seen.shape[1], seen.shape[2])
                        seen = seen * region.to(dtype=query.dtype, device=query.device)
                    attended = attended + weights[i] * seen
            return attended

        return self.fused.attend(attn, hidden_states, text, attention_mask, temb, added=add_images)


@contextlib.contextmanager
def gates_closed(fusion: GatedFusion | None):
    """Every gate at zero inside the block (the UNet is then the base), restored after."""
    if fusion is None:
        yield
        return
    saved = [layer.gate.detach().clone() for layer in fusion.layers.values()]
    try:
        with torch.no_grad():
            for layer in fusion.layers.values():
                layer.gate.zero_()
        yield
    finally:
        with torch.no_grad():
            for layer, value in zip(fusion.layers.values(), saved):
                layer.gate.copy_(value)

"""Capture the UNet's cross-attention probabilities for the entity-guided loss, with autograd intact.

diffusers' default processor (`AttnProcessor2_0`) calls PyTorch's fused `scaled_dot_product_attention`,
which never materializes the softmax probabilities. The entity loss needs them, and needs their gradient
to flow back into the context (the CAM output), so on the few layers it reads we swap in
`CapturingAttnProcessor`: the same computation written out as `softmax(q k^T * scale + mask) v`, which
keeps the probabilities, averaged over heads, as `(batch, pixels, tokens)`. Every other layer keeps its
fused processor untouched, so the memory and speed cost is confined to the captured layers.

Which layers: `cross_attention_layer_names` picks cross-attention modules (`attn2` of the transformer
blocks) by the side length of the feature map they attend from. That resolution is read from the UNet's
structure, not observed at run time: a layer in `down_blocks[i]` runs after the downsamplers of the
down blocks before it, the mid block after all of them, and a layer in `up_blocks[i]` after the
upsamplers of the up blocks before it; the side is `sample_size // 2**depth` (`sample_size` from the
UNet's config, or the latent size you train at). For SD1.5 at 512 px (latents 64) the cross-attention
sides are 64, 32, 16 in the down/up blocks and 8 in the mid block; for the embedded tiny UNet (latents
16) they are 16 and 8.

The store holds one UNet forward's maps only: a forward pre-hook on the UNet clears it at the start of
each forward, and each layer writes once per forward (so the recomputation done by gradient
checkpointing during backward does not overwrite, or add to, what the loss was computed from).
Classifier-free guidance doubles the batch; the store keeps whatever batch it sees.

Memory per captured layer: the float32 probabilities (batch, heads, pixels, tokens) stay alive for the
backward pass. At SD1.5's 16x16 layers with 333 tokens and 8 heads that is ~2.7 MB per sample; at the
64x64 layers ~44 MB per sample per layer, hence the default of the lowest-resolution layers.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Sequence

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from llm4gen.adapters.attention import attention_probabilities, writes_out
from llm4gen.adapters.gated_fusion import GatedFusionProcessor

_PROCESSOR_SUFFIX = ".processor"
_BLOCK_PATTERN = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.|^(mid_block)\.")


class AttentionStore:
    """Cross-attention maps of the current UNet forward, by layer name, in the order the layers ran.

    Each map is (batch, pixels, tokens): softmax probabilities over the context tokens, averaged over
    heads, float32, still attached to the autograd graph. Pixels are the layer's feature map flattened
    row by row, so `map.view(batch, height, width, tokens)` restores the image layout.
    Set `enabled = False` to run the UNet without keeping anything (validation, sampling): without gradients the
    captured layers then run the fused processor they replaced, so a model that trained with the entity loss
    samples bitwise as the same weights do without it (adapters/attention.writes_out).
    """

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self._maps: dict[str, torch.Tensor] = {}
        self._hook_handle = None  # the UNet forward pre-hook that clears the store

    def record(self, name: str, probs: torch.Tensor) -> None:
        """Keep `probs` (batch, pixels, tokens) for layer `name`, once per forward and only while enabled."""
        if self.enabled and name not in self._maps:
            self._maps[name] = probs

    def clear(self) -> None:
        self._maps.clear()

    @contextlib.contextmanager
    def capturing(self):
        """Record maps only inside the block: ``with store.capturing(): unet(...)``, then ``store.maps()``."""
        self.enabled = True
        try:
            yield self
        finally:
            self.enabled = False

    def maps(self) -> dict[str, torch.Tensor]:
        """name -> (batch, pixels, tokens); a new dict, so clearing the store does not empty it."""
        return dict(self._maps)

    def __len__(self) -> int:
        return len(self._maps)


class CapturingAttnProcessor:
    """`AttnProcessor2_0` with the attention written out, so its probabilities can be kept.

    Same steps as diffusers' processor (spatial norm, group norm, mask preparation, cross norm, q/k
    norms, output projection, residual connection, rescale_output_factor); only the fused kernel is
    replaced by `attention_probabilities` followed by `probs @ value`. Writes the head-averaged
    probabilities into `store` under `name` while `store.enabled`; without gradients and with nothing to keep,
    runs `replaced`, the processor it stands in for (put back by `remove_attention_capture`), unchanged.
    """

    def __init__(self, store: AttentionStore, name: str, replaced=None):
        self.store = store
        self.name = name
        self.replaced = replaced

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        if not writes_out(self.store):  # sampling: the processor it stands in for, bit for bit
            fused = self.replaced if self.replaced is not None else AttnProcessor2_0()
            return fused(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)

        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)

        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])

        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)  # (batch, heads, pixels, d)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)  # (batch, heads, tokens, d)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        # attn.scale is what diffusers' processors attend with (head_dim ** -0.5 unless the model says otherwise)
        probs = attention_probabilities(query, key, attn.scale, attention_mask)  # (batch, heads, pixels, tokens)
        self.store.record(self.name, probs.mean(dim=1))  # (batch, pixels, tokens)

        hidden_states = torch.matmul(probs.to(value.dtype), value)  # (batch, heads, pixels, d)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)  # linear projection
        hidden_states = attn.to_out[1](hidden_states)  # dropout

        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def cross_attention_layer_sides(
    unet, sample_size: int | Sequence[int] | None = None
) -> dict[str, tuple[int, int]]:
    """Every cross-attention layer's name (a `unet.attn_processors` key) -> (height, width) of its feature map.

    Determined from the UNet's structure (see the module docstring); `sample_size` is the latent size the
    UNet runs at (an int for square latents or (height, width)), by default the UNet config's.
    """
    size = unet.config.sample_size if sample_size is None else sample_size
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    total_depth = sum(block.downsamplers is not None for block in unet.down_blocks)
    sides = {}
    for module_name, module in unet.named_modules():
        if not (isinstance(module, Attention) and module.is_cross_attention):
            continue
        depth = _depth_of(unet, module_name, total_depth)
        sides[module_name + _PROCESSOR_SUFFIX] = (height // 2**depth, width // 2**depth)
    return sides


def _depth_of(unet, module_name: str, total_depth: int) -> int:
    """How many times the feature map was halved before the block holding `module_name`."""
    match = _BLOCK_PATTERN.match(module_name)
    if match is None:
        raise ValueError(
            f"cross-attention layer {module_name!r} is not inside down_blocks, mid_block or up_blocks; "
            "cannot tell its resolution (is this a UNet2DConditionModel?)"
        )
    if match.group(3) == "mid_block":
        return total_depth
    index = int(match.group(2))
    if match.group(1) == "down_blocks":
        return sum(block.downsamplers is not None for block in unet.down_blocks[:index])
    return total_depth - sum(block.upsamplers is not None for block in unet.up_blocks[:index])


def cross_attention_layer_names(
    unet,
    resolutions: str | Sequence[int | Sequence[int]] = "lowest",
    sample_size: int | Sequence[int] | None = None,
) -> list[str]:
    """Names (`unet.attn_processors` keys) of the cross-attention layers to capture, in that dict's order.

    resolutions:
      "lowest": the mid block plus the deepest down block and the deepest up block that have
                cross-attention, i.e. each part's coarsest maps (tiny UNet: the four 8x8 layers;
                SD1.5: the 8x8 mid layer and the five 16x16 layers; SDXL: the 32x32 layers);
      "all":    every cross-attention layer;
      sides:    feature-map side lengths, e.g. [16] or [16, 32] for SD1.5's 16x16 and 32x32 layers
                (an int is a square map, a (height, width) pair a rectangular one). Side lengths,
                not pixel counts: 64 would be ambiguous for SD1.5 (the 64x64 layers or the 8x8 = 64 one).
    sample_size: the latent size the UNet runs at, if not the config's (sides scale with it).
    """
    sides = cross_attention_layer_sides(unet, sample_size)
    if not sides:
        raise ValueError("this UNet has no cross-attention layers to capture")
    if isinstance(resolutions, str):
        if resolutions == "all":
            return list(sides)
        if resolutions == "lowest":
            coarsest = {}
            for name, side in sides.items():
                part = _part_of(name)
                coarsest[part] = min(coarsest.get(part, side), side, key=lambda hw: hw[0] * hw[1])
            return [name for name, side in sides.items() if side == coarsest[_part_of(name)]]
        raise ValueError(f"resolutions must be 'lowest', 'all' or a list of side lengths, got {resolutions!r}")

    wanted = {(r, r) if isinstance(r, int) else tuple(r) for r in resolutions}
    available = sorted(set(sides.values()), reverse=True)
    missing = wanted - set(available)
    if not wanted:
        raise ValueError(f"resolutions is an empty list; pick from the (height, width) sides {available}")
    if missing:
        raise ValueError(
            f"no cross-attention layer has feature-map size {sorted(missing)}; "
            f"this UNet's (height, width) at sample_size {sample_size or unet.config.sample_size} are {available}"
        )
    return [name for name, side in sides.items() if side in wanted]


def _part_of(name: str) -> str:
    match = _BLOCK_PATTERN.match(name)
    return match.group(1) or match.group(3)


def _module_name(layer_name: str) -> str:
    return layer_name[: -len(_PROCESSOR_SUFFIX)] if layer_name.endswith(_PROCESSOR_SUFFIX) else layer_name


def install_attention_capture(unet, layer_names: Sequence[str], enabled: bool = True) -> AttentionStore:
    """Swap `CapturingAttnProcessor` into the named cross-attention layers; returns the store they fill.

    layer_names: `unet.attn_processors` keys (as from `cross_attention_layer_names`; the trailing
    ".processor" may be left off). Other layers keep their processors. The store is cleared at the
    start of every UNet forward, so it always holds the latest forward's maps only.
    """
    if not layer_names:
        raise ValueError("install_attention_capture needs at least one layer name, got none")
    if captured_layers(unet):
        raise RuntimeError(
            "attention capture is already installed on this UNet; call remove_attention_capture first"
        )
    modules = {}
    cross_layers = cross_attention_layer_sides(unet)
    for layer_name in layer_names:
        name = _module_name(layer_name)
        if name + _PROCESSOR_SUFFIX not in cross_layers:
            raise ValueError(
                f"{layer_name!r} is not a cross-attention layer of this UNet; choose from "
                f"cross_attention_layer_names(unet, 'all'), e.g. {next(iter(cross_layers))!r}"
            )
        modules[name + _PROCESSOR_SUFFIX] = unet.get_submodule(name)

    store = AttentionStore(enabled=enabled)
    for key, module in modules.items():
        if isinstance(module.processor, GatedFusionProcessor):  # it writes out and records its own softmaxes
            module.processor.store, module.processor.name = store, key
        else:
            module.set_processor(CapturingAttnProcessor(store, key, replaced=module.processor))
    store._hook_handle = unet.register_forward_pre_hook(lambda _module, _args: store.clear())
    return store


def captured_layers(unet) -> list[str]:
    """The ``unet.attn_processors`` keys of the layers whose maps are captured."""
    return [name for name, processor in unet.attn_processors.items()
            if isinstance(processor, CapturingAttnProcessor)
            or (isinstance(processor, GatedFusionProcessor) and processor.store is not None)]


def remove_attention_capture(unet) -> None:
    """Put back the processors `install_attention_capture` replaced (the fused AttnProcessor2_0 by default)."""
    for module in unet.modules():
        if not isinstance(module, Attention):
            continue
        processor = module.processor
        if isinstance(processor, CapturingAttnProcessor):
            store = processor.store
            module.set_processor(processor.replaced if processor.replaced is not None else AttnProcessor2_0())
        elif isinstance(processor, GatedFusionProcessor) and processor.store is not None:
            store, processor.store, processor.name = processor.store, None, None
        else:
            continue
        if store._hook_handle is not None:
            store._hook_handle.remove()
            store._hook_handle = None
        store.clear()

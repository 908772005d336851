"""Per-word cross-attention maps of a generated image, and a PNG that shows them beside the image.

This is the inspection side of the entity loss: the loss asks an attribute's map to sit on its
entity's, and these functions show those maps for a prompt. The per-word map is exactly the one the
loss reads (`losses.entity.word_attention_maps`: the word's CLIP and LLM tokens' probabilities summed,
normalized over pixels), averaged over denoising steps and captured layers:

    step maps   {layer: (batch, pixels, tokens)}, one dict per denoising step
    -> average_attention: each layer reshaped to (batch, tokens, h, w), upsampled (bilinear) to the
       largest captured side, mean over layers and steps         -> (batch, tokens, H, W)
    -> word_maps: one image's (tokens, H, W) and its words' token positions -> (words, H, W), each
       summing to 1 over pixels
    -> render_attention_panels: [image | one heatmap panel per word], each labelled

Bilinear upsampling keeps each pixel's distribution over tokens a distribution (a convex combination
of neighbours), so layers of different resolutions average into valid attention.
Heatmaps are min-max scaled per word: they show where a word attends most relative to its own range,
not how peaked its map is compared with another word's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from llm4gen.adapters.layout import ContextLayout
from llm4gen.losses.entity import word_attention_maps

LABEL_HEIGHT = 18  # pixels of the label strip under each panel

# A perceptually ordered dark-to-bright colormap (anchors after matplotlib's "inferno").
_COLORMAP_ANCHORS = np.array(
    [(0, 0, 4), (40, 11, 84), (101, 21, 110), (159, 42, 99), (212, 72, 66), (245, 125, 21),
     (250, 193, 39), (252, 255, 164)], dtype=np.float64)


def layer_grid(probs: torch.Tensor, side: tuple[int, int]) -> torch.Tensor:
    """(batch, pixels, tokens) with pixels = h * w flattened row by row -> (batch, tokens, h, w)."""
    batch, pixels, tokens = probs.shape
    height, width = side
    if height * width != pixels:
        raise ValueError(
            f"a captured map has {pixels} pixels but its layer's feature map is {height}x{width} = "
            f"{height * width}; compute the sides with cross_attention_layer_sides(unet, sample_size) "
            "for the latent size the UNet ran at")
    return probs.reshape(batch, height, width, tokens).permute(0, 3, 1, 2)


def average_attention(
    step_maps: Sequence[Mapping[str, torch.Tensor]],
    sides: Mapping[str, tuple[int, int]],
    size: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Attention averaged over denoising steps and layers -> (batch, tokens, H, W), float32.

    step_maps: one `AttentionStore.maps()` per UNet forward, name -> (batch, pixels, tokens).
    sides: layer name -> (h, w) of its feature map (`cross_attention_layer_sides`).
    size: the common (H, W); by default the largest captured layer's.
    """
    if not step_maps or not any(step_maps):
        raise ValueError("no attention maps were captured: was the store enabled while the UNet ran?")
    names = {name for maps in step_maps for name in maps}
    unknown = sorted(names - set(sides))
    if unknown:
        raise ValueError(f"no feature-map side for captured layers {unknown}; sides has {sorted(sides)}")
    if size is None:
        size = max((sides[name] for name in names), key=lambda hw: hw[0] * hw[1])
    total, count = None, 0
    for maps in step_maps:
        for name, probs in maps.items():
            grid = layer_grid(probs.detach().float(), sides[name])  # (batch, tokens, h, w)
            if tuple(grid.shape[-2:]) != tuple(size):
                grid = F.interpolate(grid, size=tuple(size), mode="bilinear", align_corners=False)
            total = grid if total is None else total + grid
            count += 1
    return total / count


def positions_in_context(positions: Sequence[int], layout: ContextLayout | None, clip_tokens: int) -> list[int]:
    """A word's token positions in the fused sequence [CLIP's ``clip_tokens``, the LLM's] (``fused_word_token_positions``)
    -> its positions in the context the UNet reads: the same for CLIP then LLM tokens (the CAM, the MLP); the
    LLM's alone, shifted to the front, for an LLM-only context (LaVi-Bridge); CLIP's alone where the rest are
    learned queries (ELLA after CLIP) or for the base (``layout`` None). An ELLA context of queries alone holds no
    word positions: refused."""
    if layout is ContextLayout.QUERIES:
        raise ValueError("a context of learned queries alone (ELLA) holds no word positions")
    if layout is ContextLayout.CLIP_THEN_LLM:
        return list(positions)
    if layout is ContextLayout.LLM:
        return [p - clip_tokens for p in positions if p >= clip_tokens]
    return [p for p in positions if p < clip_tokens]  # CLIP's tokens alone carry words


def word_maps(attention: torch.Tensor, positions: Sequence[Sequence[int]]) -> torch.Tensor:
    """Each word's spatial map, as the entity loss computes it, for one image.

    attention (tokens, H, W) from `average_attention(...)[i]`; positions[w] are word w's token
    positions in the context (`positions_in_context`) -> (words, H, W), each summing to 1 over pixels.
    """
    tokens, height, width = attention.shape
    membership = torch.zeros(1, len(positions), tokens)  # (1, words, tokens)
    for index, word_positions in enumerate(positions):
        if not word_positions:
            raise ValueError(f"word {index} has no token position (lost to truncation?); leave it out")
        bad = [p for p in word_positions if not 0 <= p < tokens]
        if bad:
            raise ValueError(f"word {index} has token positions {bad} outside [0, {tokens}): the maps have "
                             f"{tokens} tokens, positions must index the context (positions_in_context)")
        membership[0, index, list(word_positions)] = 1.0
    probs = attention.float().reshape(tokens, height * width).T.unsqueeze(0)  # (1, pixels, tokens)
    return word_attention_maps(probs, membership)[0].reshape(len(positions), height, width)


def colorize(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] of shape (H, W) -> uint8 RGB (H, W, 3) through the dark-to-bright colormap."""
    scaled = np.clip(values, 0.0, 1.0) * (len(_COLORMAP_ANCHORS) - 1)
    low = np.floor(scaled).astype(int).clip(0, len(_COLORMAP_ANCHORS) - 2)
    frac = (scaled - low)[..., None]
    rgb = _COLORMAP_ANCHORS[low] * (1 - frac) + _COLORMAP_ANCHORS[low + 1] * frac
    return rgb.round().astype(np.uint8)


def heatmap(word_map: torch.Tensor, size: int) -> Image.Image:
    """A (H, W) map upsampled (bilinear) to size x size, min-max scaled and colorized."""
    up = F.interpolate(word_map.float()[None, None], size=(size, size), mode="bilinear", align_corners=False)[0, 0]
    low, high = up.min(), up.max()
    scaled = (up - low) / (high - low) if high > low else torch.zeros_like(up)
    return Image.fromarray(colorize(scaled.numpy()))  # (size, size, 3) uint8: RGB


def _label(draw: ImageDraw.ImageDraw, text: str, left: int, top: int, width: int, font) -> None:
    """Draws text centred in a strip of the given width, cut with '...' if it does not fit."""
    shown = text
    while shown and draw.textlength(shown, font=font) > width - 4:
        shown = shown[:-1]
    if shown != text:
        shown = shown[:-3] + "..." if len(shown) > 3 else shown
    x = left + (width - draw.textlength(shown, font=font)) / 2
    draw.text((x, top + 3), shown, fill=(0, 0, 0), font=font)


def render_attention_panels(
    image: Image.Image,
    maps: torch.Tensor,
    labels: Sequence[str],
    panel_size: int = 256,
    image_label: str = "",
) -> Image.Image:
    """[image | heatmap of word 1 | ...], each panel panel_size square with its label in a strip below.

    maps (words, H, W); labels one per word. Width (1 + words) * panel_size, height panel_size +
    LABEL_HEIGHT.
    """
    if maps.ndim != 3 or maps.shape[0] != len(labels):
        raise ValueError(f"maps must be (words, H, W) with one label per word; got {tuple(maps.shape)} "
                         f"and {len(labels)} labels")
    if panel_size < 16:
        raise ValueError(f"panel_size={panel_size} is too small to read; use at least 16 pixels")
    canvas = Image.new("RGB", ((1 + len(labels)) * panel_size, panel_size + LABEL_HEIGHT), (255, 255, 255))
    canvas.paste(image.convert("RGB").resize((panel_size, panel_size), Image.Resampling.NEAREST), (0, 0))
    for index, word_map in enumerate(maps):
        canvas.paste(heatmap(word_map, panel_size), ((1 + index) * panel_size, 0))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for index, text in enumerate([image_label, *labels]):
        _label(draw, text, index * panel_size, panel_size, panel_size, font)
    return canvas


def panel(canvas: Image.Image, index: int, panel_size: int) -> Image.Image:
    """Panel `index` (0 = the image) of a `render_attention_panels` result, without its label."""
    return canvas.crop((index * panel_size, 0, (index + 1) * panel_size, panel_size))

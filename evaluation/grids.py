"""Sample grids a person can read: images upscaled with nearest-neighbour (tiny resolutions stay crisp),
laid out in rows, each with its label written beside or under it.

    labelled_grid(rows, row_labels, column_labels)   # rows of images (None: an empty cell), a label per row
    captioned_grid(images, captions, columns=4)      # images in rows of ``columns``, each caption under its image
"""

from __future__ import annotations

import textwrap
from typing import Optional, Sequence

from PIL import Image, ImageDraw, ImageFont

BACKGROUND = "white"
INK = (20, 20, 20)
FAINT = (150, 150, 150)


def font(size: int = 11) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def upscale(image: Image.Image, side: int) -> Image.Image:
    """``image`` as a ``side`` x ``side`` square, nearest-neighbour (a 32 px sample keeps its pixels)."""
    return image.convert("RGB").resize((side, side), Image.NEAREST)


def wrap(text: str, width: int, max_lines: Optional[int] = None) -> list[str]:
    """``text`` in lines of at most ``width`` characters; with ``max_lines``, the last one ends in "..."."""
    lines = textwrap.wrap(text, width) or [""]
    if max_lines is not None and len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = lines[-1][: max(0, width - 3)].rstrip() + "..."
    return lines


def labelled_grid(rows: Sequence[Sequence[Optional[Image.Image]]], row_labels: Sequence[str],
                  column_labels: Sequence[str], side: int = 96, label_width: int = 300, font_size: int = 11,
                  max_label_lines: int = 7) -> Image.Image:
    """A table of images: a header of ``column_labels``, then per row its wrapped label (left) and its
    images (``None``: an empty cell, drawn as a dash)."""
    text_font = font(font_size)
    line = font_size + 3
    chars = max(10, label_width // max(1, int(font_size * 0.55)))
    header = line * max(len(wrap(c, max(8, side // 6))) for c in column_labels) + 6
    row_height = max(side, line * max_label_lines) + 8
    columns = max(len(r) for r in rows)
    grid = Image.new("RGB", (label_width + columns * (side + 6) + 6, header + len(rows) * row_height), BACKGROUND)
    draw = ImageDraw.Draw(grid)
    for j, label in enumerate(column_labels):
        for k, text in enumerate(wrap(label, max(8, side // 6))):
            draw.text((label_width + j * (side + 6) + 3, 3 + k * line), text, fill=INK, font=text_font)
    for i, (images, label) in enumerate(zip(rows, row_labels)):
        top = header + i * row_height
        for k, text in enumerate(wrap(label, chars, max_label_lines)):
            draw.text((4, top + k * line), text, fill=INK, font=text_font)
        for j, image in enumerate(images):
            left = label_width + j * (side + 6) + 3
            if image is None:
                draw.text((left + side // 2 - 3, top + side // 2 - 6), "-", fill=FAINT, font=text_font)
            else:
                grid.paste(upscale(image, side), (left, top))
    return grid


def captioned_grid(images: Sequence[Image.Image], captions: Sequence[str], columns: int = 4, side: int = 128,
                   font_size: int = 11, max_lines: int = 4, marks: Optional[Sequence[str]] = None) -> Image.Image:
    """``images`` in rows of ``columns``, each upscaled to ``side`` with its caption (wrapped, shortened to
    ``max_lines``) under it and, with ``marks``, a short verdict (e.g. "bound 2/2") above the caption."""
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions; give one caption per image")
    text_font = font(font_size)
    line = font_size + 3
    chars = max(8, int(side / (font_size * 0.55)))
    text_lines = max_lines + (1 if marks else 0)
    cell_w, cell_h = side + 12, side + 8 + text_lines * line + 6
    rows = -(-len(images) // columns)
    grid = Image.new("RGB", (columns * cell_w, rows * cell_h), BACKGROUND)
    draw = ImageDraw.Draw(grid)
    for i, (image, text) in enumerate(zip(images, captions)):
        left, top = (i % columns) * cell_w + 6, (i // columns) * cell_h + 4
        grid.paste(upscale(image, side), (left, top))
        y = top + side + 4
        if marks:
            draw.text((left, y), marks[i], fill=INK, font=text_font)
            y += line
        for k, text_line in enumerate(wrap(text, chars, max_lines)):
            draw.text((left, y + k * line), text_line, fill=INK, font=text_font)
    return grid

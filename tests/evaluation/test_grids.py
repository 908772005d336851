"""Readable sample grids: nearest-neighbour upscaling keeps a tiny sample's pixels, labels are drawn where
they belong, and empty cells stay empty."""

import numpy as np
import pytest
from PIL import Image

from llm4gen.evaluation.grids import captioned_grid, labelled_grid, upscale, wrap


def square(color, side=32):
    return Image.new("RGB", (side, side), color)


def test_upscale_is_nearest_neighbour():
    image = Image.new("RGB", (2, 2), "black")
    image.putpixel((1, 0), (255, 0, 0))
    big = np.asarray(upscale(image, 8))
    assert big.shape == (8, 8, 3)
    assert (big[:4, 4:] == [255, 0, 0]).all() and (big[:4, :4] == 0).all()  # no blended edge


def test_wrap_shortens_with_an_ellipsis():
    lines = wrap("one two three four five six seven eight nine ten", 10, max_lines=2)
    assert len(lines) == 2 and lines[-1].endswith("...") and all(len(line) <= 10 for line in lines)
    assert wrap("short", 10) == ["short"]


def test_captioned_grid_lays_out_rows_and_writes_each_caption_under_its_image():
    images = [square((200, 30, 30)), square((30, 30, 200)), square((30, 170, 60))]
    grid = captioned_grid(images, ["a red one", "a blue one", "a green one"], columns=2, side=64)
    width, height = grid.size
    assert width == 2 * (64 + 12) and height > 2 * 64
    pixels = np.asarray(grid)
    assert (pixels[4:68, 6:70] == [200, 30, 30]).all()  # the first image, upscaled, top left
    under = pixels[70:90, 6:70]
    assert (under < 100).all(axis=-1).any()  # dark text under it
    with pytest.raises(ValueError, match="one caption per image"):
        captioned_grid(images, ["only one"])


def test_labelled_grid_has_a_label_column_and_dashes_for_missing_cells():
    rows = [[square((200, 30, 30)), None], [None, square((30, 30, 200))]]
    grid = labelled_grid(rows, ["first prompt", "second prompt"], ["arm a", "arm b"], side=48, label_width=120)
    pixels = np.asarray(grid)
    assert grid.size[0] == 120 + 2 * (48 + 6) + 6
    assert (pixels[:, :120] < 100).all(axis=-1).any()  # label text is drawn in the label column
    red = np.all(pixels == [200, 30, 30], axis=-1)
    blue = np.all(pixels == [30, 30, 200], axis=-1)
    assert red.sum() == blue.sum() == 48 * 48
    assert np.nonzero(red)[1].min() < np.nonzero(blue)[1].min()  # red in the first column, blue in the second

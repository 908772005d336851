import io
import json
import random

import numpy as np
import pytest
import torch
from PIL import Image

from llm4gen.datamodules.transforms import (
    SKIP_REASONS,
    SampleError,
    crop_box,
    decode_image,
    extract_caption,
    find_image_member,
    image_to_tensor,
    maybe_flip,
    preprocess_image,
    resize_shorter_side,
    sample_rng,
)


def encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def gradient_image() -> Image.Image:
    """4 wide x 2 high; pixel (x, y) = (60 x, 200 y, 7)."""
    array = np.zeros((2, 4, 3), dtype=np.uint8)
    for y in range(2):
        for x in range(4):
            array[y, x] = (60 * x, 200 * y, 7)
    return Image.fromarray(array)


class AlwaysLow(random.Random):
    def random(self):
        return 0.0


class AlwaysHigh(random.Random):
    def random(self):
        return 0.99


def test_center_crop_of_known_image_gives_exact_values():
    pixels = preprocess_image(encode(gradient_image()), resolution=2, center_crop=True)
    assert pixels.shape == (3, 2, 2) and pixels.dtype == torch.float32
    # center crop keeps columns x = 1, 2
    expected_red = torch.tensor([[60.0, 120.0], [60.0, 120.0]]) / 127.5 - 1
    expected_green = torch.tensor([[0.0, 0.0], [200.0, 200.0]]) / 127.5 - 1
    torch.testing.assert_close(pixels[0], expected_red)
    torch.testing.assert_close(pixels[1], expected_green)
    torch.testing.assert_close(pixels[2], torch.full((2, 2), 7 / 127.5 - 1))


def test_flip_mirrors_columns_only_when_the_coin_says_so():
    data = encode(gradient_image())
    flipped = preprocess_image(data, 2, center_crop=True, random_flip=True, rng=AlwaysLow())
    kept = preprocess_image(data, 2, center_crop=True, random_flip=True, rng=AlwaysHigh())
    torch.testing.assert_close(flipped[0, 0], torch.tensor([120.0, 60.0]) / 127.5 - 1)
    torch.testing.assert_close(kept[0, 0], torch.tensor([60.0, 120.0]) / 127.5 - 1)


def test_white_and_black_map_to_the_ends_of_the_range():
    tensor = image_to_tensor(Image.new("RGB", (3, 3), (255, 255, 255)))
    assert torch.all(tensor == 1.0)
    assert torch.all(image_to_tensor(Image.new("RGB", (3, 3), (0, 0, 0))) == -1.0)


def test_any_image_comes_out_at_the_resolution_and_in_range():
    noise = np.random.default_rng(0).integers(0, 256, size=(30, 50, 3), dtype=np.uint8)
    pixels = preprocess_image(encode(Image.fromarray(noise), "JPEG"), 16, center_crop=False, random_flip=True, rng=random.Random(1))
    assert pixels.shape == (3, 16, 16)
    assert pixels.min() >= -1.0 and pixels.max() <= 1.0


def test_random_crop_is_reproducible_from_the_seed_and_varies_across_seeds():
    noise = np.random.default_rng(0).integers(0, 256, size=(40, 60, 3), dtype=np.uint8)
    data = encode(Image.fromarray(noise))
    first = preprocess_image(data, 8, center_crop=False, random_flip=True, rng=sample_rng(3, 0, "k"))
    again = preprocess_image(data, 8, center_crop=False, random_flip=True, rng=sample_rng(3, 0, "k"))
    torch.testing.assert_close(first, again)
    others = [preprocess_image(data, 8, center_crop=False, random_flip=True, rng=sample_rng(3, e, "k")) for e in range(1, 6)]
    assert any(not torch.equal(first, other) for other in others)


def test_resize_keeps_aspect_and_sets_the_shorter_side():
    assert resize_shorter_side(Image.new("RGB", (100, 50)), 64).size == (128, 64)
    assert resize_shorter_side(Image.new("RGB", (30, 90)), 10).size == (10, 30)


def test_random_choices_require_an_explicit_rng():
    with pytest.raises(ValueError, match="rng"):
        crop_box((10, 10), 4, center=False, rng=None)
    with pytest.raises(ValueError, match="rng"):
        maybe_flip(Image.new("RGB", (2, 2)), True, None)


def test_transparent_pixels_become_white_and_opaque_keep_their_colour():
    image = Image.new("RGBA", (2, 1), (255, 0, 0, 0))
    image.putpixel((1, 0), (0, 0, 255, 255))
    decoded = decode_image(encode(image))
    assert decoded.mode == "RGB"
    assert decoded.getpixel((0, 0)) == (255, 255, 255)
    assert decoded.getpixel((1, 0)) == (0, 0, 255)


@pytest.mark.parametrize("mode", ["L", "LA", "P", "CMYK", "I;16"])
def test_every_mode_decodes_to_rgb(mode):
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    image = Image.new(mode, (3, 2))
    assert decode_image(encode(image, fmt)).mode == "RGB"


def test_16_bit_png_keeps_its_grey_levels():
    """Training decodes 16-bit images as prepare writes them: 0..65535 scaled to 0..255, not clipped."""
    image = Image.new("I;16", (3, 1))
    for x, value in enumerate((0, 32896, 65535)):
        image.putpixel((x, 0), value)
    decoded = decode_image(encode(image))
    assert [decoded.getpixel((x, 0)) for x in range(3)] == [(0, 0, 0), (128, 128, 128), (255, 255, 255)]


def test_palette_transparency_is_composited_on_white():
    image = Image.new("P", (2, 1), 0)
    image.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    image.putpixel((1, 0), 1)
    decoded = decode_image(encode(image, transparency=0))
    assert decoded.getpixel((0, 0)) == (255, 255, 255)
    assert decoded.getpixel((1, 0)) == (200, 10, 10)


def test_exif_orientation_is_applied():
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display needs a 90 degree turn
    data = encode(Image.new("RGB", (8, 4)), "JPEG", exif=exif.tobytes())
    assert decode_image(data).size == (4, 8)


@pytest.mark.parametrize("data", [b"not an image at all", encode(gradient_image())[:40], b""])
def test_undecodable_bytes_are_a_bad_image(data):
    with pytest.raises(SampleError) as raised:
        decode_image(data)
    assert raised.value.reason == "bad_image"


def test_image_member_lookup_by_extension():
    assert find_image_member({"__key__": "k", "txt": b"c", "jpeg": b"J"}) == b"J"
    with pytest.raises(SampleError) as raised:
        find_image_member({"__key__": "k", "txt": b"c"})
    assert raised.value.reason == "bad_image"


def test_sample_error_rejects_unknown_reasons():
    with pytest.raises(ValueError, match="bad_image"):
        SampleError("oops")
    assert set(SKIP_REASONS) >= {"bad_image", "missing_caption", "empty_caption", "bad_shard"}


def test_caption_keys_are_tried_in_order():
    sample = {"txt": b" a red circle \n", "caption": b"other", "json": json.dumps({"caption": "from json"}).encode()}
    assert extract_caption(sample) == "a red circle"
    assert extract_caption(sample, ("caption", "txt")) == "other"
    assert extract_caption({"json": json.dumps({"caption": "from json"}).encode()}) == "from json"
    assert extract_caption({"json": json.dumps({"alt": "alt text"}).encode()}, ("json:caption", "json:alt")) == "alt text"


def test_blank_caption_falls_through_to_the_next_key():
    assert extract_caption({"txt": b"  ", "json": b'{"caption": "kept"}'}) == "kept"


def test_missing_and_empty_captions_have_their_own_reasons():
    with pytest.raises(SampleError) as missing:
        extract_caption({"__key__": "k", "png": b"x", "json": b'{"width": 3}'})
    assert missing.value.reason == "missing_caption"
    with pytest.raises(SampleError) as empty:
        extract_caption({"txt": b" \t\n"})
    assert empty.value.reason == "empty_caption"
    with pytest.raises(SampleError) as unparsable:
        extract_caption({"json": b"{not json"}, ("json:caption",))
    assert unparsable.value.reason == "missing_caption"

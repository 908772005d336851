"""SDXL's size and crop conditioning from real data: the datamodule records each image's original size
(prepare.py's record, else the decoded size) and the crop it takes, and the batch carries both."""

import io
import json
import random

import numpy as np
import torch
from PIL import Image

from llm4gen.datamodules.transforms import original_size, preprocess_image, preprocess_image_with_geometry
from llm4gen.datamodules.webdataset_datamodule import WebDatasetDataModule
from tests.helpers.shards import gradient_png, write_tar

image_bytes = gradient_png


def test_centre_crop_geometry_of_a_portrait_image():
    # 40 wide, 60 high -> shorter side 32: 32 x 48, the centre crop starts 8 rows down
    pixels, decoded, crop = preprocess_image_with_geometry(image_bytes(40, 60), 32)
    assert pixels.shape == (3, 32, 32) and decoded == (60, 40) and crop == (8, 0)
    assert torch.equal(pixels, preprocess_image(image_bytes(40, 60), 32))  # the same pixels as before


def test_random_crop_geometry_matches_the_pixels_and_mirrors_when_flipped():
    data = image_bytes(90, 40)  # -> 72 x 32: the crop moves along the width
    resized = Image.open(io.BytesIO(data)).convert("RGB").resize((72, 32), Image.Resampling.BICUBIC)
    seen_flip = seen_plain = False
    for seed in range(12):
        pixels, _, (top, left) = preprocess_image_with_geometry(data, 32, center_crop=False, random_flip=True,
                                                                rng=random.Random(seed))
        again = preprocess_image(data, 32, center_crop=False, random_flip=True, rng=random.Random(seed))
        assert torch.equal(pixels, again) and top == 0
        mirrored = resized.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        expected_flip = torch.from_numpy(np.array(mirrored.crop((left, 0, left + 32, 32)))).permute(2, 0, 1)
        expected_plain = torch.from_numpy(np.array(resized.crop((left, 0, left + 32, 32)))).permute(2, 0, 1)
        to_pixels = lambda t: ((t + 1) * 127.5).round()  # noqa: E731
        if torch.allclose(to_pixels(pixels), expected_flip.float(), atol=1):
            seen_flip = True  # a flipped crop's left edge is measured in the mirrored image, as SDXL's trainer does
        else:
            assert torch.allclose(to_pixels(pixels), expected_plain.float(), atol=1)
            seen_plain = True
    assert seen_flip and seen_plain


def test_original_size_prefers_the_prepare_record():
    assert original_size({"json": json.dumps({"original_size": [1024, 768]}).encode()}, (64, 48)) == (768, 1024)
    assert original_size({"json": b"not json"}, (64, 48)) == (64, 48)
    assert original_size({}, (64, 48)) == (64, 48)


def test_batches_carry_original_size_and_crop(tmp_path):
    write_tar(tmp_path / "shard-000000.tar", [
        ("wide", {"png": image_bytes(64, 32), "txt": b"a wide one"}),
        ("tall", {"png": image_bytes(32, 48), "txt": b"a tall one",
                  "json": json.dumps({"original_size": [320, 480]}).encode()}),
    ])
    dm = WebDatasetDataModule(str(tmp_path / "shard-000000.tar"), batch_size=2, shuffle_buffer=0,
                              shuffle_shards=False, resolution=32)
    batch = next(iter(dm.train_dataloader()))
    assert batch.keys == ["wide", "tall"]
    assert batch.original_size.tolist() == [[32, 64], [480, 320]]
    assert batch.crop_top_left.tolist() == [[0, 16], [8, 0]]

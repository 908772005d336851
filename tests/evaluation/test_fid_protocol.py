"""FID as the field computes it: references centre-cropped to the generated aspect and resized to the
generated size, generated images passed at their own size (Inception resizes both inside), captions a
seeded sample; and the number torchmetrics gives with this preprocessing is the Fréchet distance computed
directly from the same features."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import linalg

from llm4gen.evaluation.prompts import coco_set
from llm4gen.evaluation.scorers import FIDScorer, ImageRecord, iter_reference_images, reference_view


def bands(width: int, height: int) -> Image.Image:
    """Red left quarter, green middle half, blue right quarter (or top/middle/bottom when tall)."""
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    if width >= height:
        pixels[:, : width // 4, 0] = 255
        pixels[:, width // 4: 3 * width // 4, 1] = 255
        pixels[:, 3 * width // 4:, 2] = 255
    else:
        pixels[: height // 4, :, 0] = 255
        pixels[height // 4: 3 * height // 4, :, 1] = 255
        pixels[3 * height // 4:, :, 2] = 255
    return Image.fromarray(pixels)


@pytest.mark.parametrize("size", [(80, 40), (40, 80)])
def test_a_non_square_reference_is_centre_cropped_then_resized_not_squashed(size):
    view = np.asarray(reference_view(bands(*size), (20, 20)))
    assert view.shape == (20, 20, 3)
    # the centre square of the banded image is all green: the outer bands are cropped away
    assert view[..., 1].min() > 200 and view[..., 0].max() < 30 and view[..., 2].max() < 30
    squashed = np.asarray(bands(*size).resize((20, 20), Image.BICUBIC))
    assert squashed[..., 0].max() > 200  # what squashing would have kept


def test_a_reference_keeps_its_aspect_when_the_generated_images_are_not_square():
    view = reference_view(bands(60, 60), (30, 20))  # square reference, 3:2 generated images
    assert view.size == (30, 20)


def test_a_reference_list_names_the_matched_images(tmp_path):
    for i in range(3):
        Image.new("RGB", (8, 8), (i * 80, 0, 0)).save(tmp_path / f"{i}.png")
    (tmp_path / "refs.txt").write_text("2.png\n0.png\n")
    reds = [im.getpixel((0, 0))[0] for im in iter_reference_images(str(tmp_path / "refs.txt"))]
    assert reds == [160, 0]


def test_captions_are_a_seeded_sample_in_image_id_order(tmp_path):
    annotations = [{"image_id": i, "caption": f"caption {i}"} for i in range(100)]
    (tmp_path / "c.json").write_text(json.dumps({"annotations": annotations}))
    a = coco_set(tmp_path / "c.json", tmp_path, limit=10, seed=0)
    b = coco_set(tmp_path / "c.json", tmp_path, limit=10, seed=0)
    c = coco_set(tmp_path / "c.json", tmp_path, limit=10, seed=1)
    assert a.prompts == b.prompts != c.prompts
    ids = [int(p.split()[1]) for p in a.prompts]
    assert ids == sorted(ids) and ids != list(range(10))  # a sample, not the first ten
    assert a.meta["caption_sample"]["seed"] == 0


class ProjectedPixels(torch.nn.Module):
    """A fixed feature extractor: 8 random projections of the 16x16 thumbnail (a stand-in for Inception)."""

    num_features = 8

    def __init__(self):
        super().__init__()
        self.register_buffer("weight", torch.randn(3 * 16 * 16, 8, generator=torch.Generator().manual_seed(0)))

    def preprocess(self, images):
        return torch.stack([torch.from_numpy(np.asarray(im.resize((16, 16), Image.BILINEAR), dtype=np.float32))
                            .permute(2, 0, 1) / 255 for im in images])

    def forward(self, x):
        return x.flatten(1).double() @ self.weight.double()


def frechet(a: np.ndarray, b: np.ndarray) -> float:
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(cov_a @ cov_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root))


def test_the_metric_with_this_preprocessing_is_the_direct_frechet_distance(tmp_path):
    rng = np.random.RandomState(0)
    references = tmp_path / "refs"
    references.mkdir()
    for i in range(24):  # non-square references of two sizes
        shape = (48, 64, 3) if i % 2 else (64, 40, 3)
        Image.fromarray(rng.randint(0, 255, shape, dtype=np.uint8)).save(references / f"{i:02d}.png")
    records = []
    for i in range(20):
        path = tmp_path / f"gen{i:02d}.png"
        Image.fromarray(rng.randint(0, 180, (32, 32, 3), dtype=np.uint8)).save(path)
        records.append(ImageRecord(i, 0, "p", i, path))
    scorer = FIDScorer(features="custom", reference=str(references), batch_size=7)
    scorer.extractor = ProjectedPixels()
    value = scorer.score(type("Set", (), {"reference_images": None})(), records)[0]["fid"]
    extractor = scorer.extractor
    real = [reference_view(im, (32, 32)) for im in iter_reference_images(str(references))]
    fake = [Image.open(r.path).convert("RGB") for r in records]
    direct = frechet(extractor(extractor.preprocess(real)).numpy(), extractor(extractor.preprocess(fake)).numpy())
    assert value == pytest.approx(direct, rel=1e-4)

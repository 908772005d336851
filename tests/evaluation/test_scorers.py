"""CLIPScore and FID end to end on tiny random-weight models saved to folders and loaded through
from_pretrained; model-less failures name what to fetch."""

import io
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from llm4gen.evaluation.scorers import (
    BlipVQAScorer,
    ClipScoreScorer,
    FIDScorer,
    ImageRecord,
    ScorerUnavailable,
    iter_reference_images,
    reference_view,
)


def random_images(n, seed=0, size=32, vary=True):
    """``n`` random images, ``size`` high and (``vary``) of several widths, as references come; one size
    (``vary=False``) as a model generates them."""
    rng = np.random.RandomState(seed)
    return [Image.fromarray(rng.randint(0, 255, (size, size + (3 * i % 7 if vary else 0), 3), dtype=np.uint8))
            for i in range(n)]


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    from tests.helpers.scorer_models import build_tiny_clip

    return build_tiny_clip(tmp_path_factory.mktemp("clip"), seed=3)


@pytest.fixture(scope="module")
def tiny_vit(tmp_path_factory):
    from tests.helpers.scorer_models import build_tiny_vit_features

    return build_tiny_vit_features(tmp_path_factory.mktemp("vit"))


def test_clip_score_is_100_times_the_mean_cosine(tiny_clip):
    scorer = ClipScoreScorer(str(tiny_clip))
    scorer.load()
    images = random_images(5)
    prompts = ["a red circle", "a blue square", "a photo of a cat", "two green triangles", "a yellow star"]
    value, per_image = scorer.score_images(images, prompts)
    with torch.no_grad():  # the formula, from the model's projected embeddings
        pixels = scorer.processor(images=images, return_tensors="pt").pixel_values
        text = scorer.processor(text=prompts, return_tensors="pt", padding=True)
        img = scorer.model.get_image_features(pixel_values=pixels).pooler_output
        txt = scorer.model.get_text_features(input_ids=text.input_ids, attention_mask=text.attention_mask).pooler_output
        cosines = torch.nn.functional.cosine_similarity(img, txt, dim=-1)
    assert per_image == pytest.approx((100 * cosines).clamp(min=0).tolist(), abs=1e-3)
    assert value == pytest.approx(max(0.0, float(100 * cosines.mean())), abs=1e-3)
    assert any(v > 0 for v in per_image)  # the seed gives some positive pairs, so the check is not 0 == 0


class RefSet:
    def __init__(self, reference_images):
        self.reference_images = str(reference_images)


def save_records(images, folder):
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for i, im in enumerate(images):
        im.save(folder / f"{i:02d}.png")
        records.append(ImageRecord(i, 0, "p", 0, folder / f"{i:02d}.png"))
    return records


def test_fid_with_a_local_feature_extractor(tiny_vit, tmp_path):
    from scipy import linalg

    scorer = FIDScorer(str(tiny_vit), batch_size=3)
    scorer.load()
    ref = tmp_path / "ref"
    save_records(random_images(12, seed=1), ref)
    records = save_records([im.transpose(Image.FLIP_LEFT_RIGHT).point(lambda v: v // 2)
                            for im in random_images(10, seed=2, vary=False)], tmp_path / "gen")
    value = scorer.score(RefSet(ref), records)[0]["fid"]

    def features(images):
        return scorer.extractor(scorer.extractor.preprocess(images)).double().numpy()

    f_real = features([reference_view(Image.open(p).convert("RGB"), (32, 32)) for p in sorted(ref.glob("*.png"))])
    f_fake = features([Image.open(r.path).convert("RGB") for r in records])
    mu1, mu2 = f_real.mean(0), f_fake.mean(0)
    s1, s2 = np.cov(f_real, rowvar=False), np.cov(f_fake, rowvar=False)
    expected = float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real))
    assert value == pytest.approx(expected, rel=1e-3, abs=1e-6) and value > 0

    # the same reference images as WebDataset shards give the same FID
    shards = tmp_path / "shards"
    shards.mkdir()
    with tarfile.open(shards / "ref-000000.tar", "w") as tar:
        for p in sorted(ref.glob("*.png")):
            data = p.read_bytes()
            info = tarfile.TarInfo(f"{p.stem}.png")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    assert len(list(iter_reference_images(str(shards)))) == 12
    assert scorer.score(RefSet(shards), records)[0]["fid"] == pytest.approx(value, rel=1e-6)


def test_fid_of_a_set_against_itself_is_zero(tiny_vit, tmp_path):
    scorer = FIDScorer(str(tiny_vit))
    scorer.load()
    records = save_records(random_images(8, seed=4, vary=False), tmp_path)
    assert abs(scorer.score(RefSet(tmp_path), records)[0]["fid"]) < 1e-6


@pytest.mark.parametrize("make, model_id", [
    (lambda: BlipVQAScorer("Salesforce/blip-vqa-capfilt-large"), "Salesforce/blip-vqa-capfilt-large"),
    (lambda: ClipScoreScorer("openai/clip-vit-large-patch14"), "openai/clip-vit-large-patch14"),
    (lambda: FIDScorer("facebook/dinov2-base"), "facebook/dinov2-base"),
])
def test_missing_model_offline_is_one_paragraph_naming_the_model(make, model_id, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ScorerUnavailable) as err:
        make().load()
    message = str(err.value)
    assert model_id in message and f"hf download {model_id}" in message and "\n" not in message


def test_inception_fid_without_torch_fidelity_or_weights_says_what_to_fetch(monkeypatch):
    import llm4gen.evaluation.scorers as S
    monkeypatch.setattr(S, "inception_weights_cached", lambda: False)
    with pytest.raises(ScorerUnavailable) as err:
        FIDScorer("inception").load()
    message = str(err.value)
    assert "torch-fidelity" in message and "--fid-features" in message and "\n" not in message

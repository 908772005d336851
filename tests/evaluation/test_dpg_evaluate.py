"""evaluate.py --protocol dpg-bench end to end on the CPU: a tiny-default checkpoint on DPG-Bench's prompts with a
question table in ELLA's schema answered by a tiny BLIP VQA (built from BLIP's config, loaded through
from_pretrained like the real one); the checkpoint and its base on the shapes world's long prompts answered by the
analyzer, with the aesthetic and long-prompt CLIP scores; evaluate.py compare's paired CIs and Fig. 6 on them."""

import contextlib
import io
import json
from collections import defaultdict
from pathlib import Path

import pytest

from llm4gen.cli import evaluate, train
from llm4gen.datamodules.synthetic import write_synthetic_shards
from llm4gen.evaluation import dpg_bench as D
from tests.helpers.training import FAST

pytestmark = pytest.mark.slow
QUESTIONS = Path(__file__).resolve().parents[1] / "inputs" / "dpg" / "questions.csv"  # an input, not a stored result


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from tests.helpers.scorer_models import build_aesthetic_weights, build_tiny_blip_vqa, build_tiny_clip

    root = tmp_path_factory.mktemp("dpg")
    write_synthetic_shards(root / "shards", num_samples=16, samples_per_shard=16, resolution=32)
    assert train.main([f"output_dir={root / 'run'}", f"data.shards={root / 'shards'}", "data.synthetic_if_missing=false",
                       "trainer.max_steps=2", *FAST]) == 0
    clip = build_tiny_clip(root / "clip", seed=1, projection_dim=768)
    return dict(root=root, checkpoint=root / "run" / "checkpoints" / "last.ckpt",
                scorer_args=["--dpg-vqa", "blip", "--dpg-vqa-model", str(build_tiny_blip_vqa(root / "blip")),
                             "--scorers", "dpg,clip_score_long,aesthetic", "--clip-model", str(clip),
                             "--aesthetic-clip", str(clip), "--aesthetic-weights",
                             str(build_aesthetic_weights(root / "aesthetic.pth"))])


def run(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = evaluate.main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def protocol_run(setup):
    """The checkpoint under --protocol dpg-bench (50 steps, seeds 1001 + j) on 1 DPG-Bench item, 4 images."""
    out = setup["root"] / "protocol"
    code, stdout, stderr = run(["--checkpoint", str(setup["checkpoint"]), "--protocol", "dpg-bench", "--dpg-questions",
                                str(QUESTIONS), "--dpg-limit", "1", *setup["scorer_args"], "--output-dir", str(out),
                                "--no-progress"])
    assert code == 0, stderr
    return out, stdout, stderr


@pytest.fixture(scope="module")
def shapes_runs(setup):
    """The checkpoint and its base on 3 shapes prompts with analyzer questions, 4 images each (2 sampling steps)."""
    outputs = {}
    for label, model in (("ckpt", ["--checkpoint", str(setup["checkpoint"])]), ("base", ["--base", "embedded:shapes-sd"])):
        out = setup["root"] / label
        code, _, stderr = run([*model, "--dpg-shapes", "verbose_2", "--dpg-limit", "3", "--steps", "2",
                               *setup["scorer_args"], "--output-dir", str(out), "--no-progress"])
        assert code == 0, stderr
        outputs[label] = out
    return outputs


def rescored(out, set_name, items, prefix):
    """The run's recorded answers scored again with ELLA's rules over the set's question table."""
    details = [json.loads(line) for line in (out / "details" / f"{set_name}.dpg.jsonl").read_text().splitlines()]
    tiles = defaultdict(list)
    for d in details:
        tiles[d["item_id"]].append({int(k): v for k, v in d["answers"].items()})
    return D.aggregate(items, [D.score_item(items[i], t) for i, t in tiles.items()]).values(prefix)


def test_protocol_run_prints_the_category_table_and_scores_by_ellas_rules(protocol_run):
    out, stdout, stderr = protocol_run
    assert "dpg_bench (dpg_blip): DPG-Bench score" in stdout and "| L1 | entity |" in stdout
    assert "| L2 | attribute - color |" in stdout and "NOT comparable with ELLA's published rows" in stdout
    assert (out / "dpg.md").read_text().strip() in stdout
    assert "is not ELLA's published DPG-Bench question table" in stderr
    prompts = json.loads((out / "prompts" / "dpg_bench.json").read_text())
    assert prompts["prompts"] == [D.prompts()["0"]]
    assert [im["seed"] for im in prompts["images"]] == [1001, 1002, 1003, 1004]   # ELLA's inference.py seeds, pinned
    record = json.loads((out / "scores.json").read_text())
    scores, protocol = record["scores"]["dpg_bench"], record["protocol"]
    assert protocol["protocol"] == "dpg-bench" and protocol["generation"]["scheduler"] == "DPMSolverMultistepScheduler"
    assert protocol["generation"]["num_inference_steps"] == 50 and protocol["generation"]["guidance_scale"] == 12
    assert protocol["scorers"]["dpg"]["vqa"] == "blip" and protocol["scorers"]["dpg"]["comparable_with_published"] is False
    assert protocol["scorers"]["clip_score_long"]["text"].startswith("mean of the L2-normalised")
    again = rescored(out, "dpg_bench", D.read_question_table(QUESTIONS), "dpg_blip")
    assert {k: scores[k] for k in again} == pytest.approx(again)
    assert {"aesthetic", "clip_score_long"} <= set(scores)


def test_shapes_runs_score_by_the_rules_and_compare_gives_paired_cis_and_fig6(shapes_runs, setup):
    from llm4gen.evaluation.dpg_scorer import shapes_dpg_set

    items = shapes_dpg_set("verbose_2", 3).meta["questions"]
    for out in shapes_runs.values():
        scores = json.loads((out / "scores.json").read_text())["scores"]["dpg_shapes_verbose_2"]
        again = rescored(out, "dpg_shapes_verbose_2", items, "dpg_shapes")
        assert {k: scores[k] for k in again} == pytest.approx(again)
    out = setup["root"] / "compare"
    code, stdout, _ = run(["compare", str(shapes_runs["ckpt"]), str(shapes_runs["base"]), "--output-dir", str(out)])
    assert code == 0 and "Paired differences ckpt - base" in stdout and "Fig. 6" in stdout
    rows = {line.split("|")[2].strip(): line for line in (out / "paired.md").read_text().splitlines()
            if line.startswith("| dpg_shapes_verbose_2 |")}
    assert set(rows) == {"dpg_shapes_score (x100)", "aesthetic", "clip_score_long"}
    for line in rows.values():   # 3 prompts: a real interval around each difference
        low, high = (float(x) for x in line.split("|")[6].strip(" []").split(","))
        difference = float(line.split("|")[5].strip(" *"))
        assert low <= difference <= high and line.rstrip(" |").endswith("| 3")
    assert (out / "fig6.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("extra, message", [
    (["--scorers", "aesthetic"], "--aesthetic-weights PATH/sac+logos+ava1-l14-linearMSE.pth"),
    (["--scorers", "inception_score"], "Inception Score with the published InceptionV3"),
    (["--dpg-vqa", "mplug"], "pip install 'llm4gen[dpg]'"),
])
def test_a_scorer_without_its_weights_or_package_is_refused_before_any_image(setup, extra, message, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec   # as on a machine without the optional packages
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("modelscope", "torch_fidelity")
                        else real(name, *a))
    out = setup["root"] / f"refused-{extra[-1]}"
    code, _, stderr = run(["--checkpoint", str(setup["checkpoint"]), "--protocol", "dpg-bench", "--dpg-questions",
                           str(QUESTIONS), "--dpg-limit", "1", *extra, "--output-dir", str(out)])
    assert code == 2 and message in stderr and not out.exists()

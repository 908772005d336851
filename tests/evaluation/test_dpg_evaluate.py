"""evaluate.py --protocol dpg-bench end to end on the CPU: a tiny-default checkpoint against its base, DPG-Bench's
prompts with a question table in ELLA's schema answered by a tiny BLIP VQA (built from BLIP's config, loaded
through from_pretrained like the real one), the shapes world's long prompts answered by the analyzer, the
aesthetic and long-prompt CLIP scores; then evaluate.py compare's paired CIs and Fig. 6."""

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
QUESTIONS = Path(__file__).resolve().parents[1] / "fixtures" / "dpg" / "questions.csv"


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
def runs(setup):
    """The checkpoint and its base, each on 1 DPG-Bench item and 1 shapes prompt, 4 images each."""
    outputs = {}
    for label, model in (("ckpt", ["--checkpoint", str(setup["checkpoint"])]), ("base", ["--base", "embedded:shapes-sd"])):
        out = setup["root"] / label
        code, stdout, stderr = run([*model, "--protocol", "dpg-bench", "--dpg-questions", str(QUESTIONS),
                                    "--dpg-shapes", "verbose_2", "--dpg-limit", "1", *setup["scorer_args"],
                                    "--output-dir", str(out), "--no-progress"])
        assert code == 0, stderr
        outputs[label] = (out, stdout, stderr)
    return outputs


def test_protocol_run_prints_the_category_table_and_scores_by_ellas_rules(runs):
    out, stdout, stderr = runs["ckpt"]
    assert "dpg_bench (dpg_blip): DPG-Bench score" in stdout and "| L1 | entity |" in stdout
    assert "| L2 | attribute - color |" in stdout and "NOT comparable with ELLA's published rows" in stdout
    assert "dpg_shapes_verbose_2 (dpg_shapes)" in stdout and (out / "dpg.md").is_file()
    assert "is not ELLA's published DPG-Bench question table" in stderr
    prompts = json.loads((out / "prompts" / "dpg_bench.json").read_text())
    assert prompts["prompts"] == [D.prompts()["0"]]
    assert [im["seed"] for im in prompts["images"]] == [1001, 1002, 1003, 1004]   # ELLA's inference.py seeds, pinned
    record = json.loads((out / "scores.json").read_text())
    scores, protocol = record["scores"], record["protocol"]
    assert protocol["protocol"] == "dpg-bench" and protocol["generation"]["scheduler"] == "DPMSolverMultistepScheduler"
    assert protocol["scorers"]["dpg"]["vqa"] == "blip" and protocol["scorers"]["dpg"]["comparable_with_published"] is False
    assert protocol["scorers"]["clip_score_long"]["text"].startswith("mean of the L2-normalised")
    # the recorded answers, scored again with ELLA's rules over each set's question table, give the run's numbers
    from llm4gen.evaluation.dpg_scorer import shapes_dpg_set

    for set_name, prefix, items in (("dpg_bench", "dpg_blip", D.read_question_table(QUESTIONS)),
                                    ("dpg_shapes_verbose_2", "dpg_shapes", shapes_dpg_set("verbose_2", 1).meta["questions"])):
        details = [json.loads(line) for line in (out / "details" / f"{set_name}.dpg.jsonl").read_text().splitlines()]
        tiles = defaultdict(list)
        for d in details:
            tiles[d["item_id"]].append({int(k): v for k, v in d["answers"].items()})
        again = D.aggregate(items, [D.score_item(items[i], t) for i, t in tiles.items()]).values(prefix)
        assert {k: scores[set_name][k] for k in again} == pytest.approx(again)
    assert {"aesthetic", "clip_score_long"} <= set(scores["dpg_bench"]) & set(scores["dpg_shapes_verbose_2"])


def test_compare_gives_paired_cis_over_prompts_and_the_fig6_plot(runs, setup):
    out = setup["root"] / "compare"
    code, stdout, _ = run(["compare", str(runs["ckpt"][0]), str(runs["base"][0]), "--output-dir", str(out)])
    assert code == 0
    assert "Paired differences ckpt - base" in stdout and "95% CI" in stdout
    paired = (out / "paired.md").read_text()
    for set_name, metric in (("dpg_shapes_verbose_2", "dpg_shapes_score (x100)"), ("dpg_bench", "aesthetic"),
                             ("dpg_bench", "clip_score_long")):
        assert f"| {set_name} | {metric} |" in paired
    assert (out / "fig6.png").read_bytes()[:4] == b"\x89PNG" and "Fig. 6" in stdout


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

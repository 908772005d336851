"""evaluate.py as a user runs it: a tiny-default checkpoint, its exported adapter and the base model
alone, on T2I-CompBench-style and COCO-style prompt sets, scored with tiny random-weight models."""

import json

import numpy as np
import pytest
from PIL import Image

from llm4gen.cli import evaluate, train
from llm4gen.datamodules.synthetic import write_synthetic_shards

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from tests.helpers.scorer_models import build_tiny_blip_vqa, build_tiny_clip, build_tiny_vit_features

    root = tmp_path_factory.mktemp("eval")
    write_synthetic_shards(root / "shards", num_samples=16, samples_per_shard=16, resolution=32)
    assert train.main([f"output_dir={root / 'run'}", f"data.shards={root / 'shards'}", "data.synthetic_if_missing=false",
                       "trainer.max_steps=2", "data.batch_size=4", "model.optim.warmup_steps=0",
                       "validation.every_n_steps=0", "trainer.enable_progress_bar=false"]) == 0
    compbench = root / "compbench"
    compbench.mkdir()
    (compbench / "color_val.txt").write_text("a green bench and a red car\na blue bowl\nan unused third prompt\n")
    (compbench / "shape_val.txt").write_text("a round clock and a square table\n\na triangular sign\n")
    return dict(root=root, checkpoint=root / "run" / "checkpoints" / "last.ckpt", export=root / "run" / "export",
                compbench=compbench, blip=build_tiny_blip_vqa(root / "blip"), clip=build_tiny_clip(root / "clip", seed=3),
                vit=build_tiny_vit_features(root / "vit"))


def compbench_args(s, out, *extra, source=None, scorers="blip_vqa,clip_score"):
    return ["--compbench", str(source or s["compbench"]), "--compbench-categories", "color,shape", "--compbench-limit",
            "2", "--images-per-prompt", "2", "--steps", "2", "--batch-size", "3", "--blip-model", str(s["blip"]),
            "--scorers", scorers, "--clip-model", str(s["clip"]), "--output-dir", str(out), "--no-progress", *extra]


def pixels(path):
    return np.asarray(Image.open(path))


@pytest.fixture(scope="module")
def ckpt_eval(setup):
    """The checkpoint evaluated on two categories x 2 prompts x 2 images; returns (folder, its stdout)."""
    import contextlib
    import io

    out = setup["root"] / "ckpt"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert evaluate.main(["--checkpoint", str(setup["checkpoint"]), *compbench_args(setup, out)]) == 0
    return out, stdout.getvalue()


def test_checkpoint_evaluation_writes_images_scores_and_a_rerun_generates_nothing(setup, ckpt_eval, capsys):
    out, stdout = ckpt_eval
    assert "generated 8 new images (8 in the plan)" in stdout
    images = sorted(p.relative_to(out).as_posix() for p in (out / "images").rglob("*.png"))
    assert images == [f"images/{c}/{i:05d}_{j:02d}.png" for c in ("color", "shape") for i in range(2) for j in range(2)]
    prompts = json.loads((out / "prompts" / "color.json").read_text())
    assert prompts["prompts"] == ["a green bench and a red car", "a blue bowl"]
    assert [im["seed"] for im in prompts["images"]] == [0, 1, 1000, 1001]

    scores = json.loads((out / "scores.json").read_text())["scores"]
    assert set(scores) == {"color", "shape"} and set(scores["color"]) == {"blip_vqa", "clip_score"}
    details = [json.loads(line) for line in (out / "details" / "color.blip_vqa.jsonl").read_text().splitlines()]
    assert [d["noun_phrases"] for d in details] == [["a green bench", "a red car"]] * 2 + [["a blue bowl"]] * 2
    for d in details:
        assert d["score"] == pytest.approx(np.prod(d["yes"]))
    assert scores["color"]["blip_vqa"] == pytest.approx(np.mean([d["score"] for d in details]))
    table = (out / "scores.md").read_text()
    assert "color blip_vqa (x100)" in table and f"| ckpt | {scores['color']['blip_vqa'] * 100:.2f} |" in table

    before = {p: p.stat().st_mtime_ns for p in (out / "images").rglob("*.png")}
    assert evaluate.main(["--checkpoint", str(setup["checkpoint"]), *compbench_args(setup, out)]) == 0
    assert "generated 0 new images (8 in the plan)" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in (out / "images").rglob("*.png")} == before
    assert json.loads((out / "scores.json").read_text())["scores"] == scores

    # an interrupted run resumes: a missing image is generated again from its own seed
    lost = out / "images" / "shape" / "00001_00.png"
    kept = pixels(lost)
    lost.unlink()
    assert evaluate.main(["--checkpoint", str(setup["checkpoint"]), *compbench_args(setup, out, "--batch-size", "1")]) == 0
    assert "generated 1 new images" in capsys.readouterr().out
    # the same image up to float rounding (a batch of 1 instead of 3 sums in another order)
    assert np.abs(pixels(lost).astype(int) - kept.astype(int)).max() <= 1
    other = pixels(out / "images" / "shape" / "00001_01.png")  # same prompt, next seed: another image
    assert np.abs(other.astype(int) - kept.astype(int)).max() > 10

    # other sampling settings into the same folder are refused, not mixed
    capsys.readouterr()
    assert evaluate.main(["--checkpoint", str(setup["checkpoint"]), *compbench_args(setup, out, "--steps", "3")]) == 2
    assert "different sampling" in capsys.readouterr().err


def test_exported_adapter_gives_the_checkpoint_images_and_compare_writes_table_and_plot(setup, ckpt_eval, tmp_path,
                                                                                       capsys):
    ckpt, (adapter, base) = ckpt_eval[0], (tmp_path / "adapter", tmp_path / "base")
    assert evaluate.main(["--adapter", str(setup["export"]), *compbench_args(
        setup, adapter, source=setup["compbench"] / "color_val.txt", scorers="blip_vqa")]) == 0
    assert evaluate.main(["--base", "embedded:tiny-sd", *compbench_args(setup, base)]) == 0
    assert sorted((adapter / "images").rglob("*.png")) and not (adapter / "images" / "shape").exists()
    for path in (adapter / "images").rglob("*.png"):
        assert np.array_equal(pixels(path), pixels(ckpt / path.relative_to(adapter)))
    first = "images/color/00000_00.png"
    assert not np.array_equal(pixels(ckpt / first), pixels(base / first))  # the baseline has no CAM
    assert json.loads((base / "run.json").read_text())["sampler"] == {"kind": "base", "base": "embedded:tiny-sd"}
    capsys.readouterr()

    assert evaluate.main(["compare", str(ckpt), str(base), "--output-dir", str(tmp_path / "cmp")]) == 0
    table = (tmp_path / "cmp" / "compare.md").read_text().splitlines()
    assert table[0].startswith("| run | color blip_vqa (x100) ↑ | color clip_score ↑ | shape blip_vqa")
    assert [row.split("|")[1].strip() for row in table[2:]] == ["ckpt", "base"]
    ckpt_scores = json.loads((ckpt / "scores.json").read_text())["scores"]
    assert f"{ckpt_scores['shape']['clip_score']:.2f}" in table[2]
    with Image.open(tmp_path / "cmp" / "compare.png") as plot:
        assert plot.format == "PNG" and plot.size[0] > 300


def test_coco_set_gets_fid_and_clip_score(setup, tmp_path):
    captions = {"images": [], "annotations": [
        {"image_id": 7, "caption": "a red circle"}, {"image_id": 3, "caption": "a blue  square"},
        {"image_id": 3, "caption": "second caption, unused"}, {"image_id": 9, "caption": "a green triangle"}]}
    (tmp_path / "captions.json").write_text(json.dumps(captions))
    reference = tmp_path / "val"
    reference.mkdir()
    rng = np.random.RandomState(0)
    for i in range(6):
        Image.fromarray(rng.randint(0, 255, (40, 48, 3), dtype=np.uint8)).save(reference / f"{i}.jpg")
    out = tmp_path / "coco"
    assert evaluate.main(["--checkpoint", str(setup["checkpoint"]), "--coco-captions", str(tmp_path / "captions.json"),
                          "--coco-images", str(reference), "--images-per-prompt", "1", "--steps", "2",
                          "--fid-features", str(setup["vit"]), "--clip-model", str(setup["clip"]),
                          "--output-dir", str(out), "--no-progress"]) == 0
    assert json.loads((out / "prompts" / "coco.json").read_text())["prompts"] == [
        "a blue square", "a red circle", "a green triangle"]  # first caption per image, by image id
    scores = json.loads((out / "scores.json").read_text())["scores"]["coco"]
    assert set(scores) == {"fid", "clip_score"} and scores["fid"] > 0


def test_missing_scorer_model_offline_fails_before_anything_is_generated(setup, tmp_path, monkeypatch, capsys):
    import llm4gen.lightning_modules.sampler as evaluation_sampler
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(evaluation_sampler, "load_sampler", lambda *a, **k: pytest.fail("a model was loaded"))
    out = tmp_path / "offline"
    assert evaluate.main(["--checkpoint", str(setup["checkpoint"]), "--compbench", str(setup["compbench"]),
                          "--compbench-categories", "color", "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("evaluate.py: error: ") and "\n" not in err
    assert "Salesforce/blip-vqa-capfilt-large" in err and "hf download Salesforce/blip-vqa-capfilt-large" in err
    assert not out.exists()


def test_an_exported_pipeline_evaluates_to_the_checkpoints_images(setup, ckpt_eval, tmp_path):
    """evaluate.py --pipeline samples through the LLM4GenPipeline folder export.py writes, the one sampling
    path generate.py --pipeline takes: the same images as the checkpoint's."""
    from llm4gen.cli import export

    ckpt = ckpt_eval[0]
    assert export.main(["--checkpoint", str(setup["checkpoint"]), "--output", str(tmp_path / "pipe")]) == 0
    out = tmp_path / "from-pipeline"
    assert evaluate.main(["--pipeline", str(tmp_path / "pipe"), *compbench_args(
        setup, out, source=setup["compbench"] / "color_val.txt", scorers="blip_vqa")]) == 0
    produced = sorted((out / "images").rglob("*.png"))
    assert len(produced) == 4
    for path in produced:
        assert np.array_equal(pixels(path), pixels(ckpt / path.relative_to(out)))
    assert json.loads((out / "run.json").read_text())["sampler"] == {"kind": "pipeline", "pipeline": str(tmp_path / "pipe")}

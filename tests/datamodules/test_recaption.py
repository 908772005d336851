"""recaption.py on the CPU with a tiny LLaVA (LLaVA-1.5's architecture shrunk, random weights, saved with
save_pretrained and loaded through AutoModelForImageTextToText / AutoProcessor as the real one is): captions under
their keys for every sample, originals untouched, corrupt images skipped and counted, a job killed mid-shard resumed
to the bytes of an uninterrupted one, parts and processes giving the same files, every refusal before the model
loads, the preview, and the captions training through train.py online and through the feature cache."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from llm4gen.cli import cache, recaption, train
from llm4gen.datamodules.shards import LockstepShard, iter_tar_samples, resolve_shards
from llm4gen.datamodules.synthetic import write_synthetic_shards
from llm4gen.datamodules.webdataset_datamodule import WebDatasetDataModule
from llm4gen.embedded.tiny_vlm import build_tiny_florence2, build_tiny_llava
from llm4gen.tools import recaption as recaption_tool
from llm4gen.tools.recaption import verdict
from llm4gen.tools.recaption_model import DEFAULT_PROMPT, Generated
from tests.helpers.shards import png_bytes, write_img2dataset_folder, write_tar
from tests.helpers.training import FAST

pytestmark = [pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]
# 12 new tokens a caption (random weights rarely end early), all kept by a 3..40 word range; batches of 3
# straddle the shards' samples.
SETTINGS = ["--max-new-tokens", "12", "--min-words", "3", "--max-words", "40", "--batch-size", "3", "--device", "cpu",
            "--quiet"]
IMG2DATASET = [
    {"key": "000000000", "caption": "a red circle and a blue square", "size": (64, 48), "original": (1024, 768)},
    {"key": "000000001", "caption": "a yellow square", "size": (48, 48), "original": (512, 512),
     "status": "failed_to_download"},
    {"key": "000000002", "caption": "a white cross on a black background", "size": (48, 48), "original": (640, 640),
     "txt": False},
    {"key": "000000003", "caption": "a green triangle", "size": (48, 72), "original": (800, 1200)},
]


def sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def tree_hashes(folder) -> dict[str, str]:
    return {str(p.relative_to(folder)): sha256(p) for p in sorted(Path(folder).rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
    return str(build_tiny_llava(tmp_path_factory.mktemp("vlm") / "tiny-llava"))


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """Three input shards: img2dataset's layout (a failed download, a caption only in the json), synthetic shapes,
    and one with a truncated PNG and a sample without an image."""
    root = tmp_path_factory.mktemp("inputs") / "laion-part"
    write_img2dataset_folder(root, IMG2DATASET)
    synthetic = root.parent / "synthetic"
    write_synthetic_shards(str(synthetic), num_samples=4, samples_per_shard=4, resolution=32, seed=0)
    os.replace(synthetic / "shard-000000.tar", root / "00001.tar")
    write_tar(root / "00002.tar", [
        ("good-0", {"png": png_bytes(40, (200, 30, 30)), "txt": b"a red square"}),
        ("truncated", {"png": png_bytes(48)[:60], "txt": b"a truncated png"}),
        ("noimage", {"txt": b"a caption without an image"}),
        ("good-1", {"png": png_bytes(40, (30, 30, 200)), "txt": b"a blue square"}),
    ])
    return root


@pytest.fixture(scope="module")
def source_hashes(source):
    return tree_hashes(source)  # before any job reads the inputs


@pytest.fixture(scope="module")
def reference(vlm, source, source_hashes, tmp_path_factory):
    """The uninterrupted job, in-process through the command line."""
    out = tmp_path_factory.mktemp("reference") / "dense"
    assert recaption.main([str(source), "--model", vlm, "--output", str(out), *SETTINGS]) == 0
    return out


def samples(path):
    return list(iter_tar_samples(path if isinstance(path, str) else str(path)))  # a LockstepShard as it is


def original_caption(raw):
    """The caption data.caption_keys' default picks: txt, else the json's caption."""
    if "txt" in raw:
        return raw["txt"].decode()
    return json.loads(raw["json"])["caption"] if "json" in raw else None


# ---------------------------------------------------------------- what a job writes


def test_every_sample_gets_its_record_and_the_good_ones_a_caption_under_the_key(reference, source, source_hashes):
    assert tree_hashes(source) == source_hashes  # the originals are untouched, byte for byte
    job = json.loads((reference / "job.json").read_text())
    manifest = json.loads((reference / "manifest.json").read_text())
    captioned = 0
    for name in ("00000.tar", "00001.tar", "00002.tar"):
        originals, companion = samples(source / name), samples(reference / name)
        assert [s["__key__"] for s in companion] == [s["__key__"] for s in originals]  # lockstep: every sample, in order
        for raw, extra in zip(originals, companion):
            assert set(extra) - {"__key__", "__url__"} <= {"dense.txt", "dense.json"}
            record = json.loads(extra["dense.json"])
            assert record["model"] == job["model"] and record["model"].startswith("local:")
            assert record["prompt"] == DEFAULT_PROMPT
            assert record["generation"] == {"max_new_tokens": 12, "do_sample": False, "repetition_penalty": 1.0}
            assert record["original_caption"] == original_caption(raw)
            if "dense.txt" in extra:
                captioned += 1
                text = extra["dense.txt"].decode()
                assert record["status"] == "captioned" and record["words"] == len(text.split())
                assert 3 <= record["words"] <= 40 and "text" not in record
    assert captioned == 9
    statuses = {s["__key__"]: json.loads(s["dense.json"])["status"] for n in ("00000.tar", "00002.tar")
                for s in samples(reference / n)}
    assert statuses == {"000000000": "captioned", "000000001": "failed_download", "000000002": "captioned",
                        "000000003": "captioned", "good-0": "captioned", "truncated": "bad_image",
                        "noimage": "bad_image", "good-1": "captioned"}
    report = json.loads((reference / "report.json").read_text())
    assert (report["read"], report["captioned"]) == (12, 9)
    assert report["skipped"] == {"bad_image": 2, "failed_download": 1, "empty_output": 0, "too_short": 0,
                                 "too_long": 0, "bad_shard": 0}
    assert sum(report["word_counts"].values()) == 9 == report["words"]["count"]
    assert {(s["key"], s["reason"]) for s in report["skipped_samples"]} == {
        ("000000001", "failed_download"), ("truncated", "bad_image"), ("noimage", "bad_image")}
    # the manifest pairs each input with its companion: what training reads
    assert [(s["url"], s["companions"]) for s in manifest["shards"]] == [
        (str(source / n), [n]) for n in ("00000.tar", "00001.tar", "00002.tar")]
    shards = resolve_shards(str(reference))
    assert all(isinstance(s, LockstepShard) for s in shards)
    merged = samples(shards[2])
    assert merged[0]["txt"] == b"a red square" and merged[0]["png"] and merged[0]["dense.txt"]


def test_out_of_range_and_empty_captions_are_refused_and_counted():
    assert verdict(Generated("", True), 3, 40) == ("empty_output", 0)
    assert verdict(Generated("two words", True), 3, 40) == ("too_short", 2)
    assert verdict(Generated("one two three", False), 3, 40) == ("captioned", 3)
    assert verdict(Generated(" ".join(["w"] * 41), False), 3, 40) == ("too_long", 41)


def test_a_word_floor_above_the_captions_refuses_them_and_keeps_what_the_model_said(vlm, source, tmp_path):
    out = tmp_path / "short"
    assert recaption.main([str(source / "00001.tar"), "--model", vlm, "--output", str(out), *SETTINGS,
                           "--min-words", "13"]) == 0
    records = [json.loads(s["dense.json"]) for s in samples(out / "00001.tar")]
    assert all(r["status"] == "too_short" and r["words"] == 12 and len(r["text"].split()) == 12 for r in records)
    assert not any("dense.txt" in s for s in samples(out / "00001.tar"))
    report = json.loads((out / "report.json").read_text())
    assert report["skipped"]["too_short"] == 4 and report["captioned"] == 0 and report["word_counts"] == {"12": 4}


def test_sampling_draws_from_the_jobs_seed_so_a_rerun_draws_the_same(vlm, source, tmp_path):
    shard = str(source / "00002.tar")
    runs = {}
    for name, extra in (("a", ["--seed", "3"]), ("b", ["--seed", "3"]), ("c", ["--seed", "4"])):
        assert recaption.main([shard, "--model", vlm, "--output", str(tmp_path / name), *SETTINGS, "--do-sample",
                               "--temperature", "1.5", *extra]) == 0
        runs[name] = [s.get("dense.txt") for s in samples(tmp_path / name / "00002.tar")]
    assert runs["a"] == runs["b"] and runs["a"] != runs["c"]
    record = json.loads(samples(tmp_path / "a" / "00002.tar")[0]["dense.json"])
    assert record["generation"] == {"max_new_tokens": 12, "do_sample": True, "temperature": 1.5, "top_p": 1.0,
                                    "repetition_penalty": 1.0, "seed": 3}


# ---------------------------------------------------------------- resume, parts, processes


def test_a_job_killed_mid_shard_redoes_only_that_shard_and_ends_byte_identical(vlm, source, reference, tmp_path):
    out = tmp_path / "killed"
    command = [sys.executable, str(REPO / "recaption.py"), str(source), "--model", vlm, "--output", str(out),
               *SETTINGS]
    env = dict(os.environ, OMP_NUM_THREADS="2")  # the suite's thread count (tests/conftest.py): the same floats
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not (list(out.glob("00001.tar.tmp-*")) and (out / "00000.tar").exists()):
        assert process.poll() is None, process.stderr.read().decode()
        assert time.monotonic() < deadline, "the job never reached its second shard"
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)  # mid-shard: the second shard's companion is half written
    process.wait()
    assert not (out / "00001.tar").exists() and not (out / "manifest.json").exists()
    first = (out / "00000.tar").stat().st_mtime_ns

    assert recaption.main([str(source), "--model", vlm, "--output", str(out), *SETTINGS]) == 0
    assert (out / "00000.tar").stat().st_mtime_ns == first  # the finished shard was not redone
    assert not list(out.glob("*.tmp-*"))
    for name in ("00000.tar", "00001.tar", "00002.tar", "manifest.json", "report.json", "job.json"):
        assert sha256(out / name) == sha256(reference / name), name


def test_parts_of_a_slurm_array_and_local_processes_write_the_same_files_as_one(vlm, source, reference, tmp_path,
                                                                              monkeypatch):
    out = tmp_path / "parts"
    args = [str(source), "--model", vlm, "--output", str(out), *SETTINGS]
    assert recaption.main(args, environ={"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "2"}) == 0
    assert sorted(p.name for p in out.glob("*.tar")) == ["00001.tar", "00002.tar"]  # part 1 of 2: the last shards
    assert not (out / "manifest.json").exists()  # the other part is not done
    assert recaption.main(["--merge", "--output", str(out)]) == 2
    assert recaption.main(args, environ={"SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_COUNT": "2"}) == 0
    for name in ("00000.tar", "00001.tar", "00002.tar", "manifest.json", "report.json"):
        assert sha256(out / name) == sha256(reference / name), name
    (out / "manifest.json").unlink()
    assert recaption.main(["--merge", "--output", str(out)]) == 0  # the last part's merge, by hand
    assert sha256(out / "manifest.json") == sha256(reference / "manifest.json")

    spawned = tmp_path / "processes"
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the spawned processes compute at the suite's thread count
    assert recaption.main([*args[:4], str(spawned), *SETTINGS, "--processes", "2"]) == 0
    for name in ("00000.tar", "00001.tar", "00002.tar", "manifest.json", "report.json"):
        assert sha256(spawned / name) == sha256(reference / name), name


# ---------------------------------------------------------------- refusals: exit 2, before the model loads


@pytest.fixture
def no_model(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model loaded although the request is refused")

    monkeypatch.setattr(recaption_tool, "Captioner", refuse)


def refused(capsys, args, *fragments):
    assert recaption.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("recaption.py: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, err
    return err


def test_every_bad_request_is_refused_in_one_paragraph_before_the_model_loads(vlm, source, reference, tmp_path,
                                                                              capsys, no_model):
    out = str(tmp_path / "out")
    base = [str(source), "--output", out, *SETTINGS]
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    refused(capsys, [*base, "--model", str(bert)], "is a 'bert' model (BertModel), not a vision-language model")
    refused(capsys, [*base, "--model", str(source)], "holds no config.json")
    refused(capsys, [*base, "--model", "nobody/no-such-vlm"], "not in this machine's Hugging Face cache",
            "hf download nobody/no-such-vlm")
    refused(capsys, [*base, "--model", vlm, "--prompt-format", "raw", "--prompt", "Describe this image."],
            "has no room for the image", "holds '<image>' where the image goes")
    refused(capsys, [*base, "--model", vlm, "--prompt", "<image> Describe it."], "the chat template adds itself")
    refused(capsys, [*base, "--model", vlm, "--max-new-tokens", "250"], "past the model's context of 256")
    refused(capsys, [*base, "--model", vlm, "--min-words", "50", "--max-words", "20"], "--min-words 50 --max-words 20")
    refused(capsys, [*base, "--model", vlm, "--batch-size", "0"], "--batch-size 0")
    refused(capsys, [*base, "--model", vlm, "--key", "dense"], "--key 'dense'")
    refused(capsys, [str(source), "--output", str(source), *SETTINGS, "--model", vlm], "is the folder of the input shard")
    refused(capsys, [str(reference), "--output", out, *SETTINGS, "--model", vlm],  # the inputs already hold dense.txt
            "the input samples already hold dense.txt, dense.json", "--key llava.txt")
    assert not os.path.exists(out)  # nothing written by any refusal
    job = sha256(reference / "job.json")
    refused(capsys, [str(source), "--output", str(reference), *SETTINGS, "--model", vlm, "--prompt", "Say what you see."],
            f"--output {reference} holds another job's captions", "prompt: ")
    refused(capsys, [str(source), "--output", str(reference), *SETTINGS[:-1], "--model", vlm, "--max-words", "30"],
            "max_words: 40 there, 30 now")
    assert sha256(reference / "job.json") == job
    strangers = tmp_path / "strangers"
    strangers.mkdir()
    (strangers / "x.tar").write_bytes(b"")
    refused(capsys, [str(source), "--output", str(strangers), *SETTINGS, "--model", vlm], "holds .tar files but no job.json")
    refused(capsys, ["--output", out], "give the input SHARDS and --model")


# ---------------------------------------------------------------- seeing it, training on it


def test_the_preview_shows_each_sample_and_the_word_counts(reference):
    assert recaption.main(["--preview", "5", "--output", str(reference)]) == 0
    sheet, histogram = Image.open(reference / "preview.png"), Image.open(reference / "word_counts.png")
    assert sheet.width > 1000 and 3 * 160 < sheet.height < 3 * 400  # 5 cells, 2 a row: 3 rows
    assert histogram.size == (720, 360)
    assert len(set(histogram.convert("RGB").get_flattened_data())) > 3  # bars, axes and text drawn


def test_recaptioned_shards_train_online_and_through_the_feature_cache(reference, tmp_path):
    mix = "data.caption_mix={dense.txt: 0.5, txt: 0.5}"
    common = ["data.synthetic_if_missing=false", mix, *FAST, "trainer.max_steps=2", "checkpoint.every_n_steps=2",
              "data.batch_size=2"]
    online = tmp_path / "online"
    assert train.main([f"output_dir={online}", f"data.shards={reference}", *common]) == 0
    assert (online / "checkpoints" / "last.ckpt").is_file()

    cached = str(tmp_path / "cache")
    assert cache.main(["--shards", str(reference), "--output", cached, "--fields", "latent_moments,llm_features",
                       "--device", "cpu", "--rank", "0", "--world-size", "1", mix]) == 0
    names = set(samples(os.path.join(cached, "00001.tar"))[0])
    assert {"llm_features.dense_txt.npy", "llm_features.txt.npy", "latent_moments.npy", "dense.txt"} <= names
    run = tmp_path / "cached"
    assert train.main([f"output_dir={run}", f"data.shards={cached}", *common,
                       "data.precomputed_keys=[latent_moments,llm_features]"]) == 0
    assert (run / "checkpoints" / "last.ckpt").is_file()
    dm = WebDatasetDataModule(cached, batch_size=4, shuffle_buffer=0, shuffle_shards=False, resolution=32,
                              caption_mix={"dense.txt": 1.0}, precomputed_keys=["latent_moments", "llm_features"])
    keys = [k for batch in dm.train_dataloader() for k in batch.keys]
    assert len(keys) == 9  # every captioned sample, from the cache


def test_a_florence2_style_model_captions_from_a_raw_task_prompt(source, tmp_path, capsys):
    """The other kind the issue names: an encoder-decoder with no chat template, prompted by a task token; its
    processor places the image itself, and its output holds no prompt to cut off."""
    model = str(build_tiny_florence2(tmp_path / "tiny-florence2"))
    out = tmp_path / "florence"
    args = [str(source / "00001.tar"), "--model", model, "--output", str(out), *SETTINGS]
    refused(capsys, [*args, "--prompt-format", "chat"], "has no chat template", "--prompt-format raw")
    assert recaption.main([*args, "--prompt", "<MORE_DETAILED_CAPTION>"]) == 0  # auto: raw, no template
    assert json.loads((out / "job.json").read_text())["prompt_format"] == "raw"
    companion = samples(out / "00001.tar")
    texts = [s["dense.txt"].decode() for s in companion]
    assert len(texts) == 4 and all(3 <= len(t.split()) <= 12 for t in texts)
    assert not any("Describe" in t or "paragraph" in t for t in texts)  # the task's prompt is not in the caption
    assert {json.loads(s["dense.json"])["prompt"] for s in companion} == {"<MORE_DETAILED_CAPTION>"}

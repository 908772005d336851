"""Tests for the prepare command: odd inputs, outcomes that add up, shard contents, resume, parallel."""

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from llm4gen.cli import prepare as prepare_cli
from llm4gen.cli.prepare import main
from llm4gen.tools import prepare, prepare_images, prepare_sources, shard_writer

REPO_ROOT = Path(__file__).resolve().parents[2]
MIN_SIZE = 16


# ------------------------------------------------------------------------------------------------
# Fixtures: inputs generated with PIL


def jpeg_bytes(image: Image.Image, **save_args) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95, **save_args)
    return buffer.getvalue()


def png_bytes(image: Image.Image, **save_args) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **save_args)
    return buffer.getvalue()


def noise_rgb(width: int, height: int, seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def left_red_right_blue(width: int, height: int) -> Image.Image:
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[:, : width // 2] = (255, 0, 0)
    pixels[:, width // 2:] = (0, 0, 255)
    return Image.fromarray(pixels)


def palette_with_transparency() -> Image.Image:
    """Left half palette index 0 (declared transparent), right half index 1 (green)."""
    image = Image.new("P", (32, 32), 0)
    image.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    image.paste(1, (16, 0, 32, 32))
    return image


def rgba_half_transparent() -> Image.Image:
    pixels = np.zeros((32, 32, 4), dtype=np.uint8)
    pixels[:, :16] = (0, 0, 255, 0)  # fully transparent blue: must become white
    pixels[:, 16:] = (255, 0, 0, 255)  # opaque red
    return Image.fromarray(pixels, "RGBA")


# name -> (image file bytes or None, caption bytes or None, expected outcome)
def odd_inputs() -> dict[str, tuple[bytes | None, bytes | None, str]]:
    good_jpeg = jpeg_bytes(noise_rgb(40, 30, 0))
    gray16 = Image.fromarray(np.full((24, 20), 257 * 200, dtype=np.uint16))  # 16-bit value -> 200
    exif = Image.Exif()
    exif[prepare_images.EXIF_ORIENTATION] = 6  # stored 40x20, displayed rotated 90 degrees clockwise: 20x40
    rotated = jpeg_bytes(left_red_right_blue(40, 20), exif=exif)
    la = Image.merge("LA", (Image.new("L", (20, 20), 0), Image.new("L", (20, 20), 0)))  # transparent black
    return {
        "good_rgb.jpg": (good_jpeg, b"a photo of noise\n", "written"),
        "good_rgb.png": (png_bytes(noise_rgb(20, 20, 1)), None, "duplicate_key"),  # same stem, same sidecar
        "cmyk.jpg": (jpeg_bytes(Image.new("CMYK", (24, 24), (0, 255, 255, 0))), b"a red CMYK square", "written"),
        "gray16.png": (png_bytes(gray16), b"a grey 16-bit field", "written"),
        "palette_alpha.png": (png_bytes(palette_with_transparency(), transparency=0),
                              b"a green half on a transparent half", "written"),
        "rgba.png": (png_bytes(rgba_half_transparent()), b"red on transparent", "written"),
        "la.png": (png_bytes(la), b"transparent grey", "written"),
        "gray.png": (png_bytes(Image.new("L", (20, 20), 77)), b"a grey square", "written"),
        "rotated.jpg": (rotated, b"red above blue", "written"),
        "with.dots.in.name.jpg": (jpeg_bytes(noise_rgb(20, 20, 2)), "caf\u00e9 \u2615 \u00fcber".encode(), "written"),
        "nested/deep/inner.png": (png_bytes(noise_rgb(18, 22, 3)), b"  spaced caption \r\n", "written"),
        "bom.jpg": (jpeg_bytes(noise_rgb(20, 20, 4)), b"\xef\xbb\xbfcaption after a BOM", "written"),
        "truncated.jpg": (jpeg_bytes(noise_rgb(64, 64, 5))[:700], b"cut in half", "corrupt_image"),
        "cut_short.png": (png_bytes(noise_rgb(64, 64, 6))[:300], b"cut short", "corrupt_image"),
        "empty.jpg": (b"", b"nothing here", "empty_file"),
        "html.jpg": (b"<html><body>404 Not Found</body></html>\n", b"a saved error page", "not_an_image"),
        "tiny.jpg": (jpeg_bytes(noise_rgb(8, 40, 7)), b"too narrow", "too_small"),
        "no_caption.jpg": (jpeg_bytes(noise_rgb(20, 20, 8)), None, "missing_caption"),
        "latin1.jpg": (jpeg_bytes(noise_rgb(20, 20, 9)), b"caf\xe9 au lait", "caption_not_utf8"),
        "blank_caption.jpg": (jpeg_bytes(noise_rgb(20, 20, 10)), b"  \n\t ", "empty_caption"),
    }


EXPECTED_CAPTIONS = {
    "good_rgb": "a photo of noise",
    "cmyk": "a red CMYK square",
    "gray16": "a grey 16-bit field",
    "palette_alpha": "a green half on a transparent half",
    "rgba": "red on transparent",
    "la": "transparent grey",
    "gray": "a grey square",
    "rotated": "red above blue",
    "with_dots_in_name": "caf\u00e9 \u2615 \u00fcber",
    "inner": "spaced caption",
    "bom": "caption after a BOM",
}


def write_inputs(folder: Path, inputs: dict) -> None:
    for name, (image, caption, _) in inputs.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(image)
        if caption is not None:
            path.with_suffix(".txt").write_bytes(caption)


@pytest.fixture
def odd_folder(tmp_path) -> Path:
    folder = tmp_path / "odd"
    write_inputs(folder, odd_inputs())
    (folder / ".hidden.jpg").write_bytes(b"macOS resource fork")  # dot files are not inputs
    (folder / "notes.md").write_text("not an input")
    (folder / "orphan.txt").write_text("a caption without an image is not an input")
    return folder


def make_good_folder(folder: Path, count: int) -> Path:
    for i in range(count):
        (folder / f"img{i:03d}.jpg").parent.mkdir(parents=True, exist_ok=True)
        (folder / f"img{i:03d}.jpg").write_bytes(jpeg_bytes(noise_rgb(20 + i % 5, 24, i)))
        (folder / f"img{i:03d}.txt").write_text(f"caption number {i}")
    return folder


def run(argv, capsys=None) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of the command; argparse's own errors exit through SystemExit."""
    try:
        code = main([str(a) for a in argv] + ["--quiet"], environ={})
    except SystemExit as exit_:
        code = exit_.code
    if capsys is None:
        return code, "", ""
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def read_shards(output: Path) -> dict[str, dict[str, bytes]]:
    """key -> {extension: bytes}, read back with tarfile from the shards the manifest lists."""
    manifest = json.loads((output / "manifest.json").read_text())
    samples: dict[str, dict[str, bytes]] = {}
    for shard in manifest["shards"]:
        with tarfile.open(output / shard["path"]) as tar:
            for member in tar.getmembers():
                key, extension = member.name.split(".", 1)
                samples.setdefault(key, {})[extension] = tar.extractfile(member).read()
    return samples


def decoded(sample: dict[str, bytes]) -> Image.Image:
    return Image.open(io.BytesIO(sample["jpg"]))


def close_to(pixel, expected, tolerance=12) -> bool:
    return all(abs(int(a) - int(b)) <= tolerance for a, b in zip(pixel, expected))


# ------------------------------------------------------------------------------------------------
# The folder of odd inputs


@pytest.fixture
def prepared_odd(odd_folder, tmp_path, capsys):
    output = tmp_path / "out"
    code, out, err = run([odd_folder, "--output", output, "--min-size", MIN_SIZE, "--samples-per-shard", 4], capsys)
    assert code == 0, err
    return output, out


def test_every_odd_input_has_its_expected_outcome(prepared_odd):
    output, printed = prepared_odd
    inputs = odd_inputs()
    expected: dict[str, int] = {}
    for _, _, outcome in inputs.values():
        expected[outcome] = expected.get(outcome, 0) + 1
    report = json.loads((output / "report.json").read_text())
    assert report["inputs"] == len(inputs) == 20  # dot file, .md and orphan .txt are not inputs
    assert report["outcomes"] == expected
    assert report["written"] == 11 and report["skipped"] == 9
    assert report["written"] + sum(report["skipped_by_reason"].values()) == report["inputs"]
    assert set(report["reasons"]) == set(report["skipped_by_reason"])
    by_source = {entry["source"]: entry["reason"] for entry in report["skipped_inputs"]}
    assert by_source == {name: outcome for name, (_, _, outcome) in inputs.items() if outcome != "written"}
    assert "good_rgb.jpg" in next(e for e in report["skipped_inputs"] if e["reason"] == "duplicate_key")["detail"]
    # the printed summary carries the same numbers
    assert "prepared 11 of 20 inputs" in printed
    assert "corrupt_image" in printed and "total" in printed


def test_every_good_input_is_in_the_shards_with_its_caption(prepared_odd):
    output, _ = prepared_odd
    samples = read_shards(output)
    assert set(samples) == set(EXPECTED_CAPTIONS)
    for key, caption in EXPECTED_CAPTIONS.items():
        assert set(samples[key]) == {"jpg", "json", "txt"}
        assert samples[key]["txt"].decode("utf-8") == caption
        metadata = json.loads(samples[key]["json"])
        assert metadata["caption"] == caption and metadata["key"] == key
        image = decoded(samples[key])
        assert image.format == "JPEG" and image.mode == "RGB"
        assert metadata["size"] == list(image.size)
    assert json.loads(samples["inner"]["json"])["source"] == "nested/deep/inner.png"
    assert json.loads(samples["rotated"]["json"])["original_size"] == [40, 20]
    assert json.loads(samples["gray16"]["json"])["original_mode"] == "I;16"


def test_manifest_lists_shards_that_match_the_files(prepared_odd):
    output, _ = prepared_odd
    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["format"] == prepare.MANIFEST_FORMAT and manifest["members"] == ["jpg", "json", "txt"]
    assert [s["samples"] for s in manifest["shards"]] == [4, 4, 3]  # one chunk, 4 per shard
    assert manifest["totals"] == {"inputs": 20, "samples": 11, "skipped": 9, "shards": 3,
                                  "bytes": sum((output / s["path"]).stat().st_size for s in manifest["shards"])}
    for shard in manifest["shards"]:
        assert shard_writer.file_sha256(output / shard["path"]) == shard["sha256"]
    assert manifest["settings"]["min_size"] == MIN_SIZE and manifest["settings"]["num_chunks"] == 1
    assert manifest["source"]["kind"] == "folder"


def test_pixels_are_converted_to_upright_rgb(prepared_odd, odd_folder):
    output, _ = prepared_odd
    samples = read_shards(output)
    # an upright RGB JPEG keeps its original bytes; the rotated one is re-encoded upright
    assert samples["good_rgb"]["jpg"] == (odd_folder / "good_rgb.jpg").read_bytes()
    rotated = decoded(samples["rotated"])
    assert rotated.size == (20, 40)
    assert close_to(rotated.getpixel((10, 8)), (255, 0, 0)) and close_to(rotated.getpixel((10, 32)), (0, 0, 255))
    assert close_to(decoded(samples["cmyk"]).getpixel((12, 12)), (255, 0, 0))
    assert close_to(decoded(samples["gray16"]).getpixel((10, 10)), (200, 200, 200), tolerance=2)
    palette = decoded(samples["palette_alpha"])
    assert close_to(palette.getpixel((4, 16)), (255, 255, 255)) and close_to(palette.getpixel((28, 16)), (0, 255, 0))
    rgba = decoded(samples["rgba"])
    assert close_to(rgba.getpixel((4, 16)), (255, 255, 255)) and close_to(rgba.getpixel((28, 16)), (255, 0, 0))
    assert close_to(decoded(samples["la"]).getpixel((10, 10)), (255, 255, 255))
    assert close_to(decoded(samples["gray"]).getpixel((10, 10)), (77, 77, 77), tolerance=2)


def test_webdataset_reads_the_shards(prepared_odd):
    import webdataset as wds

    output, _ = prepared_odd
    manifest = json.loads((output / "manifest.json").read_text())
    urls = [str(output / shard["path"]) for shard in manifest["shards"]]
    dataset = wds.WebDataset(urls, shardshuffle=False).decode("pil").to_tuple("__key__", "jpg", "txt")
    seen = {key: (image.mode, caption) for key, image, caption in dataset}
    assert seen == {key: ("RGB", caption) for key, caption in EXPECTED_CAPTIONS.items()}


# ------------------------------------------------------------------------------------------------
# Table sources


def test_csv_source_with_named_columns(tmp_path, capsys):
    images = make_good_folder(tmp_path / "imgs", 3)
    (tmp_path / "imgs" / "empty.jpg").write_bytes(b"")
    table = tmp_path / "pairs.csv"
    table.write_bytes(
        "id,path,text\n"
        "a,imgs/img000.jpg,\"a caption, with a comma\"\n"
        "b,imgs/img001.jpg,caf\u00e9\n".encode()
        + b"c,imgs/img002.jpg,caf\xe9\n"  # not UTF-8
        + b"d,imgs/missing.jpg,gone\n"
          b"e,,no path\n"
          b"f,imgs/empty.jpg,zero bytes\n"
          b"g,imgs/img000.jpg,\n"
          b"a,imgs/img001.jpg,same id again\n")
    output = tmp_path / "out"
    code, _, err = run([table, "-o", output, "--image-column", "path", "--caption-column", "text",
                        "--key-column", "id"], capsys)
    assert code == 0, err
    report = json.loads((output / "report.json").read_text())
    assert report["outcomes"] == {"written": 2, "caption_not_utf8": 1, "missing_image": 1, "bad_record": 1,
                                  "empty_file": 1, "empty_caption": 1, "duplicate_key": 1}
    samples = read_shards(output)
    assert {k: v["txt"].decode() for k, v in samples.items()} == {"a": "a caption, with a comma", "b": "caf\u00e9"}
    assert json.loads(samples["a"]["json"])["source"] == "imgs/img000.jpg"
    assert samples["a"]["jpg"] == (images / "img000.jpg").read_bytes()


def test_tsv_source_keeps_quotes_and_uses_image_root(tmp_path, capsys):
    make_good_folder(tmp_path / "elsewhere", 2)
    table = tmp_path / "tables" / "pairs.tsv"
    table.parent.mkdir()
    table.write_text('image\tcaption\nimg000.jpg\ta "quoted" word\nimg001.jpg\tplain\n')
    output = tmp_path / "out"
    code, _, err = run([table, "-o", output, "--image-root", tmp_path / "elsewhere"], capsys)
    assert code == 0, err
    samples = read_shards(output)
    assert {k: v["txt"].decode() for k, v in samples.items()} == {"img000": 'a "quoted" word', "img001": "plain"}


def test_jsonl_source_counts_bad_lines(tmp_path, capsys):
    make_good_folder(tmp_path, 3)
    lines = [
        json.dumps({"image": "img000.jpg", "caption": "zero"}),
        "",  # blank lines are not inputs
        "{not json",
        json.dumps(["a", "list"]),
        json.dumps({"image": "img001.jpg"}),  # no caption field
        json.dumps({"image": "img002.jpg", "caption": None}),
        json.dumps({"image": "img002.jpg", "caption": "two \u2603"}),
    ]
    table = tmp_path / "pairs.jsonl"
    table.write_text("\n".join(lines) + "\n")
    output = tmp_path / "out"
    code, _, err = run([table, "-o", output], capsys)
    assert code == 0, err
    report = json.loads((output / "report.json").read_text())
    assert report["inputs"] == 6
    # img002 without caption claims the key first: the later good row is a duplicate
    assert report["outcomes"] == {"written": 1, "bad_record": 2, "missing_caption": 2, "duplicate_key": 1}
    assert {e["source"] for e in report["skipped_inputs"] if e["reason"] == "bad_record"} == {
        "pairs.jsonl:3", "pairs.jsonl:4"}
    assert {k: v["txt"].decode() for k, v in read_shards(output).items()} == {"img000": "zero"}


def test_table_with_missing_column_is_refused_before_writing(tmp_path, capsys):
    table = tmp_path / "pairs.csv"
    table.write_text("file,text\na.jpg,hello\n")
    code, _, err = run([table, "-o", tmp_path / "out"], capsys)
    assert code == 2
    assert "no column 'image', 'caption'" in err and "['file', 'text']" in err and "--image-column" in err
    assert not (tmp_path / "out").exists()


def test_parquet_without_pyarrow_or_pandas_says_what_to_install(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # None in sys.modules makes the import fail
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    monkeypatch.setitem(sys.modules, "pandas", None)
    table = tmp_path / "pairs.parquet"
    table.write_bytes(b"PAR1")
    code, _, err = run([table, "-o", tmp_path / "out"], capsys)
    assert code == 2 and "pip install pyarrow" in err


# ------------------------------------------------------------------------------------------------
# Shard sizing, resize, duplicates


def test_max_shard_bytes_bounds_every_file(tmp_path, capsys):
    make_good_folder(tmp_path / "in", 12)
    output = tmp_path / "out"
    limit = 30 * 1024
    code, _, err = run([tmp_path / "in", "-o", output, "--max-shard-bytes", "30KiB"], capsys)
    assert code == 0, err
    manifest = json.loads((output / "manifest.json").read_text())
    sizes = [(output / s["path"]).stat().st_size for s in manifest["shards"]]
    assert len(sizes) > 1 and max(sizes) <= limit
    assert sizes == [s["bytes"] for s in manifest["shards"]]
    assert sum(s["samples"] for s in manifest["shards"]) == 12 == len(read_shards(output))


def test_resize_to_downscales_the_shorter_side_and_never_upscales(tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "wide.png").write_bytes(png_bytes(noise_rgb(90, 60, 0)))
    (folder / "small.jpg").write_bytes(jpeg_bytes(noise_rgb(24, 20, 1)))
    for name in ("wide", "small"):
        (folder / f"{name}.txt").write_text(name)
    code, _, err = run([folder, "-o", tmp_path / "out", "--resize-to", 30], capsys)
    assert code == 0, err
    samples = read_shards(tmp_path / "out")
    assert decoded(samples["wide"]).size == (45, 30)
    assert samples["small"]["jpg"] == (folder / "small.jpg").read_bytes()


def test_resize_decodes_large_jpegs_at_a_dct_scale_with_the_same_result_size(tmp_path):
    exif = Image.Exif()
    exif[prepare_images.EXIF_ORIENTATION] = 8  # 90 degrees counter-clockwise: 401x300 is shown as 300x401
    data = jpeg_bytes(left_red_right_blue(401, 300), exif=exif)
    rendered = prepare_images.render_image(data, prepare_images.ShardSettings(resize_to=50))
    assert rendered.original_size == (401, 300) and rendered.size == (50, 67) and rendered.reencoded
    image = Image.open(io.BytesIO(rendered.jpeg))
    assert close_to(image.getpixel((25, 5)), (0, 0, 255)) and close_to(image.getpixel((25, 60)), (255, 0, 0))
    full = prepare_images.render_image(jpeg_bytes(left_red_right_blue(401, 300)), prepare_images.ShardSettings(resize_to=50))
    assert full.size == (67, 50)


def test_refusing_duplicates_stops_before_writing(odd_folder, tmp_path, capsys):
    output = tmp_path / "out"
    code, _, err = run([odd_folder, "-o", output, "--on-duplicate", "refuse"], capsys)
    assert code == 2
    assert "good_rgb.png repeats key 'good_rgb' of good_rgb.jpg" in err and "nothing was written" in err
    assert not output.exists()


# ------------------------------------------------------------------------------------------------
# Determinism, resume, workers, SLURM arrays


def shard_listing(output: Path) -> list[tuple[str, int, str]]:
    manifest = json.loads((output / "manifest.json").read_text())
    return [(s["path"], s["samples"], s["sha256"]) for s in manifest["shards"]]


def test_rerun_resumes_and_gives_the_same_manifest(odd_folder, tmp_path, capsys):
    output = tmp_path / "out"
    argv = [odd_folder, "-o", output, "--min-size", MIN_SIZE, "--chunk-size", 5, "--samples-per-shard", 2]
    assert run(argv, capsys)[0] == 0
    manifest = (output / "manifest.json").read_bytes()
    report = (output / "report.json").read_bytes()
    stamps = {p.name: p.stat().st_mtime_ns for p in (output / "shards").iterdir()}

    config = prepare_cli.config_from_args(prepare_cli.build_parser().parse_args([str(a) for a in argv] + ["-q"]), {})
    result = prepare.run_prepare(config, out=io.StringIO())
    assert result.processed_chunks == []  # nothing rewritten
    assert {p.name: p.stat().st_mtime_ns for p in (output / "shards").iterdir()} == stamps
    assert (output / "manifest.json").read_bytes() == manifest and (output / "report.json").read_bytes() == report

    # an interrupted chunk (record missing, a half-written tar left behind) is redone, and only it
    (output / "chunks" / "000002.json").unlink()
    (output / "shards" / "000002-0009.tar.tmp").write_bytes(b"partial")
    result = prepare.run_prepare(config, out=io.StringIO())
    assert result.processed_chunks == [2]
    assert not list((output / "shards").glob("*.tmp"))
    assert (output / "manifest.json").read_bytes() == manifest


def test_changed_settings_are_refused_until_overwrite(tmp_path, capsys):
    make_good_folder(tmp_path / "in", 4)
    output = tmp_path / "out"
    assert run([tmp_path / "in", "-o", output], capsys)[0] == 0
    code, _, err = run([tmp_path / "in", "-o", output, "--resize-to", 10], capsys)
    assert code == 2 and "differs in: settings" in err and "--overwrite" in err
    assert run([tmp_path / "in", "-o", output, "--resize-to", 10, "--overwrite"], capsys)[0] == 0
    assert json.loads((output / "manifest.json").read_text())["settings"]["resize_to"] == 10
    assert all(min(decoded(s).size) == 10 for s in read_shards(output).values())


def test_two_workers_write_the_same_shards_as_one(odd_folder, tmp_path, capsys):
    common = ["--min-size", MIN_SIZE, "--chunk-size", 4, "--samples-per-shard", 3]
    assert run([odd_folder, "-o", tmp_path / "one", *common], capsys)[0] == 0
    assert run([odd_folder, "-o", tmp_path / "two", "--workers", 2, *common], capsys)[0] == 0
    assert json.loads((tmp_path / "two" / "manifest.json").read_text())["settings"]["num_chunks"] == 5
    assert shard_listing(tmp_path / "one") == shard_listing(tmp_path / "two")  # byte-identical shards
    assert read_shards(tmp_path / "one") == read_shards(tmp_path / "two")
    assert set(read_shards(tmp_path / "two")) == set(EXPECTED_CAPTIONS)
    assert (tmp_path / "one" / "report.json").read_bytes() == (tmp_path / "two" / "report.json").read_bytes()


def test_slurm_array_tasks_split_the_work_and_the_last_merges(odd_folder, tmp_path, capsys):
    output = tmp_path / "array"
    argv = [str(odd_folder), "-o", str(output), "--min-size", str(MIN_SIZE), "-q"]
    for task in (3, 5):  # --array=1-5:2 -> tasks 1, 3, 5 are positions 0, 1, 2
        env = {"SLURM_ARRAY_TASK_ID": str(task), "SLURM_ARRAY_TASK_COUNT": "3",
               "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_STEP": "2"}
        assert main(argv, environ=env) == 0
        assert not (output / "manifest.json").exists()
    assert "not finished yet (0)" in capsys.readouterr().out
    code, _, err = run([output, "-o", output, "--merge"], capsys)
    assert code == 2 and "1 of 3 chunks are not finished (0)" in err
    env = {"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_MIN": "1",
           "SLURM_ARRAY_TASK_STEP": "2"}
    assert main(argv, environ=env) == 0
    assert json.loads((output / "manifest.json").read_text())["settings"]["num_chunks"] == 3
    assert run([odd_folder, "-o", tmp_path / "local", "--min-size", MIN_SIZE, "--num-chunks", 3], capsys)[0] == 0
    assert shard_listing(output) == shard_listing(tmp_path / "local")
    manifest = (output / "manifest.json").read_bytes()
    assert run(["-o", output, "--merge"], capsys)[0] == 0
    assert (output / "manifest.json").read_bytes() == manifest


def test_same_inputs_give_byte_identical_shards(tmp_path, capsys):
    make_good_folder(tmp_path / "in", 6)
    for name in ("a", "b"):
        assert run([tmp_path / "in", "-o", tmp_path / name, "--reencode-jpeg", "--samples-per-shard", 4], capsys)[0] == 0
    assert shard_listing(tmp_path / "a") == shard_listing(tmp_path / "b")
    assert read_shards(tmp_path / "a")["img000"]["jpg"] != (tmp_path / "in" / "img000.jpg").read_bytes()


# ------------------------------------------------------------------------------------------------
# Command line


@pytest.mark.parametrize("extra, message", [
    (["--samples-per-shard", "0"], "--samples-per-shard must be a positive integer, got 0"),
    (["--min-size", "-3"], "--min-size must be 0"),
    (["--resize-to", "0"], "--resize-to must be a positive integer, got 0"),
    (["--jpeg-quality", "101"], "--jpeg-quality must be between 1 and 100"),
    (["--workers", "0"], "--workers must be a positive integer, got 0"),
    (["--chunk-index", "1"], "--chunk-index 1 needs --num-chunks"),
    (["--chunk-index", "4", "--num-chunks", "2"], "--chunk-index 4 is outside 0..1"),
    (["--key-column", "id"], "--key-column and --image-root apply to table sources"),
    (["--max-shard-bytes", "lots"], "'lots' is not a size"),
    (["--samples-per-shard", "ten"], "invalid int value: 'ten'"),
])
def test_bad_arguments_exit_with_one_paragraph(tmp_path, capsys, extra, message):
    make_good_folder(tmp_path / "in", 1)
    code, _, err = run([tmp_path / "in", "-o", tmp_path / "out", *extra], capsys)
    assert code == 2
    assert message in err
    assert err.count("\n") == 1  # one paragraph, no usage dump
    assert not (tmp_path / "out" / "shards").exists()


def test_unknown_source_suffix_and_missing_source(tmp_path, capsys):
    (tmp_path / "pairs.xlsx").write_text("x")
    code, _, err = run([tmp_path / "pairs.xlsx", "-o", tmp_path / "out"], capsys)
    assert code == 2 and "'.xlsx', which is not supported" in err
    code, _, err = run(["-o", tmp_path / "out"], capsys)
    assert code == 2 and "SOURCE is missing" in err


def test_source_without_inputs_is_refused(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "readme.txt").write_text("captions but no images")
    code, _, err = run([tmp_path / "in", "-o", tmp_path / "out"], capsys)
    assert code == 2 and "holds no inputs: no images (.bmp" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_entry_point_script_runs(tmp_path):
    make_good_folder(tmp_path / "in", 2)
    done = subprocess.run([sys.executable, "prepare.py", str(tmp_path / "in"), "--output", str(tmp_path / "out")],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "prepared 2 of 2 inputs into 1 shards" in done.stdout
    assert done.stderr == ""  # stderr is not a terminal: no progress bar
    bad = subprocess.run([sys.executable, "prepare.py", str(tmp_path / "in")], cwd=REPO_ROOT,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--output" in bad.stderr


# ------------------------------------------------------------------------------------------------
# Small pure functions


def test_key_from_name_replaces_separators_and_rejects_empty():
    assert prepare_sources.key_from_name("a.b/c\\d") == "a_b_c_d"
    with pytest.raises(prepare_sources.SkipSample) as skip:
        prepare_sources.key_from_name("  ")
    assert skip.value.reason == "bad_record"


@pytest.mark.parametrize("raw, expected", [
    (b"  hello\n", "hello"), (b"\xef\xbb\xbfbom", "bom"), ("s\u00fc\u00df".encode(), "s\u00fc\u00df"),
    (b"line one\nline two\n", "line one\nline two"),
])
def test_caption_from_bytes(raw, expected):
    assert prepare_sources.caption_from_bytes(raw) == expected


@pytest.mark.parametrize("raw, reason", [(b"caf\xe9", "caption_not_utf8"), (b" \n ", "empty_caption"), (b"", "empty_caption")])
def test_caption_from_bytes_skips(raw, reason):
    with pytest.raises(prepare_sources.SkipSample) as skip:
        prepare_sources.caption_from_bytes(raw)
    assert skip.value.reason == reason


@pytest.mark.parametrize("size, target, expected", [
    ((90, 60), 30, (45, 30)), ((60, 90), 30, (30, 45)), ((30, 40), 30, None), ((20, 40), 30, None),
    ((101, 100), 50, (50, 50)), ((100, 100), None, None),
])
def test_resized_size(size, target, expected):
    assert prepare_images.resized_size(size, target) == expected


def test_chunk_bounds_cover_every_input_once():
    bounds = shard_writer.chunk_bounds(10, 3)
    assert bounds == [(0, 3), (3, 6), (6, 10)]
    assert shard_writer.chunk_bounds(2, 4) == [(0, 0), (0, 1), (1, 1), (1, 2)]


@pytest.mark.parametrize("text, expected", [("2000", 2000), ("1KiB", 1024), ("1.5MB", 1_500_000), ("1GiB", 2**30), ("3gb", 3 * 10**9)])
def test_parse_bytes(text, expected):
    assert prepare_cli.parse_bytes(text) == expected


def test_to_rgb_of_16_bit_uses_the_full_range():
    image = Image.fromarray(np.array([[0, 257 * 128, 65535]], dtype=np.uint16))
    assert [prepare_images.to_rgb(image).getpixel((x, 0)) for x in range(3)] == [(0, 0, 0), (128, 128, 128), (255, 255, 255)]


def test_finished_tar_size_matches_tarfile(tmp_path):
    path = tmp_path / "x.tar"
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for size in (10, 600, 30_000):
            tar.addfile(shard_writer.member_info(f"k{size}.bin", size), io.BytesIO(b"x" * size))
        offset = tar.offset
    assert shard_writer.finished_tar_size(offset) == path.stat().st_size


def test_an_img2dataset_folder_is_resharded_without_downloading(tmp_path, capsys):
    """LAION / DataComp shards as img2dataset wrote them: resized to --resize-to, a failed download
    skipped, the json-only caption read, the downloader's original size kept, the side files not inputs."""
    from tests.helpers.shards import write_img2dataset_folder

    source = tmp_path / "laion-part"
    write_img2dataset_folder(source, [
        {"key": "000000000", "caption": "a red bus", "size": (96, 64), "original": (1536, 1024)},
        {"key": "000000001", "caption": "a dog on grass", "size": (64, 80), "original": (800, 1000),
         "status": "failed_to_download"},
        {"key": "000000002", "caption": "a green kite", "size": (64, 64), "original": (640, 640), "txt": False},
    ])
    output = tmp_path / "resharded"
    assert main([str(source), "--output", str(output), "--resize-to", "32", "--quiet"]) == 0
    report = json.loads((output / "report.json").read_text())
    assert report["inputs"] == 3 and report["outcomes"] == {"written": 2, "failed_download": 1}
    samples = read_shards(output)
    assert set(samples) == {"000000000", "000000002"}
    bus, kite = (json.loads(samples[k]["json"]) for k in ("000000000", "000000002"))
    assert samples["000000002"]["txt"].decode() == "a green kite" == kite["caption"]
    assert bus["original_size"] == [1536, 1024] and bus["size"] == [48, 32]  # shorter side to 32
    assert bus["url"] == "https://example.com/000000000.jpg"
    assert json.loads((output / "manifest.json").read_text())["source"]["kind"] == "shards"
    # the re-sharded folder trains as it is, with the downloader's original size for SDXL
    from llm4gen.datamodules.webdataset_datamodule import WebDatasetDataModule

    dm = WebDatasetDataModule(str(output / "manifest.json"), batch_size=2, shuffle_buffer=0, shuffle_shards=False,
                              resolution=32)
    batch = next(iter(dm.train_dataloader()))
    assert batch.original_size.tolist() == [[1024, 1536], [640, 640]]

import io
import json
import os
import tarfile

import pytest
from PIL import Image

from datamodules.shapes import HELD_OUT, caption, parse_prompt
from datamodules.synthetic import COLORS, Scene, ensure_synthetic_shards, write_synthetic_shards


def read_tar(path):
    """{key: {ext: bytes}} of a shard, in file order."""
    samples = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key, ext = member.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


def test_writes_the_requested_samples_into_numbered_shards(tmp_path):
    paths = write_synthetic_shards(str(tmp_path), num_samples=10, samples_per_shard=4, resolution=16, seed=0)
    assert [os.path.basename(p) for p in paths] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    per_shard = [read_tar(p) for p in paths]
    assert [len(s) for s in per_shard] == [4, 4, 2]
    keys = [k for shard in per_shard for k in shard]
    assert keys == [f"sample-{i:06d}" for i in range(10)]


def test_each_sample_has_image_caption_and_structured_description(tmp_path):
    (path,) = write_synthetic_shards(str(tmp_path), num_samples=24, samples_per_shard=24, resolution=32, seed=1)
    for key, members in read_tar(path).items():
        assert set(members) == {"png", "txt", "json"}
        record = json.loads(members["json"])
        scene = Scene.from_dict(record)
        text = members["txt"].decode()
        assert text == record["caption"] == caption(scene, record["phrasing"])
        assert 1 <= len(scene.objects) <= 3
        assert len({o.color for o in scene.objects}) == len(scene.objects)
        assert not {(o.color, o.shape) for o in scene.objects} & HELD_OUT
        parsed = sorted(o.attributes() for o in parse_prompt(text).objects)
        assert parsed == sorted(o.attributes() for o in scene.objects)
        image = Image.open(io.BytesIO(members["png"]))
        assert image.size == (32, 32) and image.mode == "RGB"
        # every shape is visible at its box centre, in its colour
        for obj in record["objects"]:
            left, upper, right, lower = obj["bbox"]
            assert image.getpixel(((left + right) // 2, (upper + lower) // 2)) == COLORS[obj["color"]]


def test_same_seed_same_bytes_other_seed_other_samples(tmp_path):
    a = write_synthetic_shards(str(tmp_path / "a"), num_samples=5, samples_per_shard=5, seed=3)
    b = write_synthetic_shards(str(tmp_path / "b"), num_samples=5, samples_per_shard=5, seed=3)
    c = write_synthetic_shards(str(tmp_path / "c"), num_samples=5, samples_per_shard=5, seed=4)
    assert open(a[0], "rb").read() == open(b[0], "rb").read()
    captions = lambda p: [m["txt"] for m in read_tar(p).values()]  # noqa: E731
    assert captions(a[0]) != captions(c[0])


def test_ensure_writes_once_then_reuses(tmp_path):
    directory = str(tmp_path / "shards")
    first = ensure_synthetic_shards(directory, num_samples=8, samples_per_shard=4)
    assert len(first) == 2 and all(os.path.exists(p) for p in first)
    stamps = [os.stat(p).st_mtime_ns for p in first]
    again = ensure_synthetic_shards(directory, num_samples=8, samples_per_shard=4)
    assert again == first and [os.stat(p).st_mtime_ns for p in again] == stamps
    assert not [n for n in os.listdir(directory) if n.startswith(".partial")]


def test_ensure_accepts_a_brace_pattern_and_rejects_a_mismatched_one(tmp_path):
    pattern = str(tmp_path / "p" / "shard-{000000..000002}.tar")
    paths = ensure_synthetic_shards(pattern, num_samples=9, samples_per_shard=3)
    assert len(paths) == 3 and all(os.path.exists(p) for p in paths)
    with pytest.raises(ValueError, match="samples_per_shard"):
        ensure_synthetic_shards(str(tmp_path / "q" / "shard-{000000..000004}.tar"), num_samples=4, samples_per_shard=2)


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(ValueError, match="num_samples"):
        write_synthetic_shards(str(tmp_path), num_samples=0)
    with pytest.raises(ValueError, match="resolution"):
        write_synthetic_shards(str(tmp_path), num_samples=2, resolution=4)

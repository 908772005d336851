import io
import json
import os
import tarfile

import pytest
from PIL import Image

from llm4gen.datamodules.synthetic import COLORS, Scene, ensure_synthetic_shards, write_synthetic_shards
from llm4gen.datamodules.synthetic import mentions_in_clip_window
from llm4gen.shapes.world import HELD_OUT, caption, parse_prompt


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


def test_a_folder_from_another_shapes_world_version_is_refused(tmp_path):
    directory = tmp_path / "shards"
    ensure_synthetic_shards(str(directory), num_samples=4, samples_per_shard=4)
    marker = json.loads((directory / "synthetic.json").read_text())
    assert marker["shapes_world"] >= 2 and marker["num_samples"] == 4
    (directory / "synthetic.json").write_text(json.dumps({**marker, "shapes_world": 1}))
    with pytest.raises(ValueError, match="delete the folder"):
        ensure_synthetic_shards(str(directory), num_samples=4, samples_per_shard=4)
    # a folder of shards without the marker (the user's own data) is trusted as before
    (directory / "synthetic.json").unlink()
    assert len(ensure_synthetic_shards(str(directory), num_samples=4, samples_per_shard=4)) == 1


# ---------------------------------------------------------------- verbose captions

def sample_digest(samples):
    import hashlib

    digest = hashlib.sha256()
    for sample in samples:
        for key in ("__key__", "png", "txt", "json"):
            value = sample[key]
            digest.update(value if isinstance(value, bytes) else value.encode())
    return digest.hexdigest()


def test_default_samples_are_byte_identical_to_before_verbose_captions():
    """Pinned on samples captured before the verbose phrasing existed: a share of 0 (the default)
    writes the same bytes."""
    from llm4gen.datamodules.synthetic import synthetic_sample

    for share in ({}, {"verbose_share": 0.0}):
        assert sample_digest(synthetic_sample(i, 32, 0, **share) for i in range(64)) == (
            "f711d476f60d05e9851b5c722b0181f099ffdf0d338e57b6647140fac9d5d1e4")
        assert sample_digest(synthetic_sample(i, 16, 5, (24, 16), **share) for i in range(16)) == (
            "5c3dbd3784d8e0ae569be68bf4dee80f978146c939ab0739d51a8a1d82b3bb67")
    first = json.loads(synthetic_sample(0, 32, 0)["json"])
    assert first["caption"] == "a circle that is small and green next to a large black circle and a large blue cross"
    assert "mentions" not in first


def test_a_verbose_share_writes_verbose_captions_with_their_clip_positions(tmp_path):
    from transformers import CLIPTokenizer

    from llm4gen.datamodules.synthetic import clip_tokenizer, synthetic_sample
    from llm4gen.embedded.registry import CLIP_TOKENIZER_DIR
    from llm4gen.shapes.world import VERBOSE

    assert clip_tokenizer() is clip_tokenizer()  # loaded once
    (path,) = write_synthetic_shards(str(tmp_path), num_samples=40, samples_per_shard=40, resolution=32, seed=2,
                                     verbose_share=0.5)
    tokenizer = CLIPTokenizer.from_pretrained(str(CLIP_TOKENIZER_DIR))
    phrasings = []
    for key, members in read_tar(path).items():
        record = json.loads(members["json"])
        text = members["txt"].decode()
        index = int(key.split("-")[1])
        # the same scene as with no verbose share; only the caption may change
        plain = json.loads(synthetic_sample(index, 32, 2)["json"])
        assert record["objects"] == plain["objects"]
        phrasings.append(record["phrasing"])
        if record["phrasing"] != VERBOSE:
            assert record == plain and text == synthetic_sample(index, 32, 2)["txt"]
            continue
        assert text == caption(Scene.from_dict(record), VERBOSE)
        assert sorted(o.attributes() for o in parse_prompt(text).objects) == sorted(
            o.attributes() for o in Scene.from_dict(record).objects)
        assert record["mentions"] == mentions_in_clip_window(text, tokenizer)
        # re-tokenized independently: the largest index of each object's colour, size and shape tokens
        pieces = tokenizer.convert_ids_to_tokens(tokenizer(text, verbose=False)["input_ids"])
        for mention in record["mentions"]:
            wanted = [mention["shape"], mention["color"], mention["size"]]
            n_before = sum(1 for m in record["mentions"] if m["entity"]["start"] < mention["entity"]["start"])
            # the objects' words come three by three in text order (filler names none of them)
            positions = [i for i, p in enumerate(pieces) if p.removesuffix("</w>") in
                         {"circle", "square", "triangle", "cross", *COLORS, "small", "large"}]
            own = positions[3 * n_before:3 * n_before + 3]
            assert sorted(pieces[i].removesuffix("</w>") for i in own) == sorted(wanted)
            assert mention["last_clip_token"] == max(own)
            assert mention["in_clip_window"] == (max(own) <= 75)
    assert 10 <= phrasings.count(VERBOSE) <= 30


def test_the_marker_records_the_verbose_share_and_another_share_is_refused(tmp_path):
    directory = tmp_path / "shards"
    ensure_synthetic_shards(str(directory), num_samples=4, samples_per_shard=4, verbose_share=0.25)
    marker = json.loads((directory / "synthetic.json").read_text())
    assert marker["verbose_share"] == 0.25 and marker["shapes_world"] == 3
    assert len(ensure_synthetic_shards(str(directory), num_samples=4, samples_per_shard=4, verbose_share=0.25)) == 1
    with pytest.raises(ValueError, match=r"verbose_share=0\.25.*verbose_share=0\.0.*delete the folder"):
        ensure_synthetic_shards(str(directory), num_samples=4, samples_per_shard=4)
    # a marker from before verbose captions (no verbose_share) means a share of 0
    del marker["verbose_share"]
    (directory / "synthetic.json").write_text(json.dumps(marker))
    assert len(ensure_synthetic_shards(str(directory), num_samples=4, samples_per_shard=4)) == 1
    with pytest.raises(ValueError, match=r"verbose_share=0\.0.*verbose_share=0\.5.*delete the folder"):
        ensure_synthetic_shards(str(directory), num_samples=4, samples_per_shard=4, verbose_share=0.5)
    with pytest.raises(ValueError, match="verbose_share"):
        ensure_synthetic_shards(str(tmp_path / "other"), num_samples=4, verbose_share=2.0)
    with pytest.raises(ValueError, match="verbose_share"):
        write_synthetic_shards(str(tmp_path / "other"), num_samples=4, verbose_share=-0.1)

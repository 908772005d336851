"""FID's reference reader over WebDataset shards decodes each sample's image member with PIL and nothing else: a
``.pyd`` or ``.pickle`` member crafted to create a file when unpickled (webdataset's default decoders unpickle
both) never runs, and a sample whose image is missing or is a pickle is skipped and counted like a corrupt one."""

from __future__ import annotations

import pickle
from collections import Counter

from llm4gen.evaluation.scorers import iter_reference_images
from tests.helpers.shards import png_bytes, write_tar
from tests.helpers.untrusted import CreatesFile


def crafted_shard(folder, marker):
    payload = pickle.dumps(CreatesFile(marker))
    write_tar(folder / "ref-000000.tar", [
        ("with-extras", {"png": png_bytes(8, (255, 0, 0)), "pyd": payload, "pickle": payload}),
        ("only-a-pickle", {"pyd": payload}),
        ("pickled-image", {"png": payload}),
        ("plain", {"jpg": png_bytes(8, (0, 0, 255))}),  # PIL reads by content, as webdataset's decoder did
    ])
    return folder


def test_the_crafted_shard_is_live_under_webdataset_default_decoding(tmp_path):
    import webdataset as wds

    marker = tmp_path / "ran"
    shards = crafted_shard(tmp_path, marker)
    for _ in wds.WebDataset(str(shards / "ref-000000.tar"), shardshuffle=False, empty_check=False).decode("pil"):
        break  # the first sample's .pyd member is unpickled on decoding
    assert marker.exists()


def test_reference_shards_are_read_without_unpickling_and_bad_samples_counted(tmp_path):
    marker = tmp_path / "ran"
    shards = crafted_shard(tmp_path, marker)
    skipped = Counter()
    images = list(iter_reference_images(str(shards), skipped=skipped))
    assert [image.getpixel((0, 0)) for image in images] == [(255, 0, 0), (0, 0, 255)]
    assert skipped == {"bad_image": 2} and not marker.exists()
    assert [im.getpixel((0, 0)) for im in iter_reference_images(str(shards / "ref-000000.tar"), limit=1)] == [(255, 0, 0)]

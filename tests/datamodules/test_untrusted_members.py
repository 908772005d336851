"""Shard members crafted to create a file when unpickled: the training stream, the feature cache as training reads
it, and cache.py reading its source shards decode only the members they need, with decoders that cannot run code.
A sample whose needed member would need unpickling is skipped and counted like a corrupt one; extra pickle members
(``.pyd``, ``.pickle``, ``.pth``: what webdataset's default decoders unpickle) are never decoded. The payloads are
live: the decoders that unpickle them create the file."""

from __future__ import annotations

import io
import json
import os
import pickle

import numpy as np
import pytest
import torch

from llm4gen.datamodules.cache_codec import encode_precomputed
from llm4gen.datamodules.transforms import SKIP_REASONS
from llm4gen.datamodules.webdataset_datamodule import WebDatasetDataModule
from tests.helpers.shards import png_bytes, write_tar
from tests.helpers.untrusted import CreatesFile


def payloads(marker) -> dict[str, bytes]:
    """The same payload as the member kinds that carry pickles: a pickle, a torch file, a numpy object array."""
    torch_file, npy = io.BytesIO(), io.BytesIO()
    torch.save(CreatesFile(marker), torch_file)
    np.save(npy, np.array([CreatesFile(marker)], dtype=object), allow_pickle=True)
    return {"pickle": pickle.dumps(CreatesFile(marker)), "torch": torch_file.getvalue(), "npy": npy.getvalue()}


def test_the_payloads_are_live(tmp_path):
    marker = tmp_path / "ran"
    crafted = payloads(marker)
    for unpickle in (lambda: pickle.loads(crafted["pickle"]),
                     lambda: torch.load(io.BytesIO(crafted["torch"]), weights_only=False),
                     lambda: np.load(io.BytesIO(crafted["npy"]), allow_pickle=True)[0]):
        unpickle()
        assert marker.exists()
        marker.unlink()


def good(i: int) -> tuple[str, dict[str, bytes]]:
    return f"good-{i}", {"png": png_bytes(12), "txt": f"a caption {i}".encode()}


def one_pass(shards, **settings) -> tuple[list[str], dict[str, int]]:
    dm = WebDatasetDataModule(shards, batch_size=2, num_workers=0, resolution=8, shuffle_buffer=0,
                              shuffle_shards=False, seed=0, **settings)
    keys, skipped = [], torch.zeros(len(SKIP_REASONS), dtype=torch.long)
    for batch in dm.train_dataloader():
        dm.on_batch_consumed(batch)
        keys += batch.keys
        skipped += batch.skipped
    return keys, dict(zip(SKIP_REASONS, skipped.tolist()))


def test_the_training_stream_never_decodes_pickle_members(tmp_path):
    marker = tmp_path / "ran"
    crafted = payloads(marker)
    write_tar(tmp_path / "shard.tar", [
        ("with-extras", {**good(0)[1], "pyd": crafted["pickle"], "pickle": crafted["pickle"], "pth": crafted["torch"]}),
        good(1),
        ("pickled-image", {"png": crafted["pickle"], "txt": b"its image member is a pickle"}),
        ("only-a-pickle", {"pyd": crafted["pickle"], "txt": b"no image member, a pickle instead"}),
        good(2),
    ])
    keys, skipped = one_pass(str(tmp_path / "shard.tar"))
    assert sorted(keys) == ["good-1", "good-2", "with-extras"]  # its extra members were never decoded
    assert skipped["bad_image"] == 2 and not marker.exists()


def test_cached_members_that_need_unpickling_are_skipped_as_bad_precomputed(tmp_path):
    marker = tmp_path / "ran"
    crafted = payloads(marker)
    moments = lambda: encode_precomputed(latent_moments=np.zeros((8, 2, 2), np.float32))  # noqa: E731
    write_tar(tmp_path / "cache.tar", [
        ("cached-0", {"txt": b"a red circle", **moments()}),
        ("torch-payload", {"txt": b"a torch file of a pickle", "latent_moments.pt": crafted["torch"]}),
        ("npy-payload", {"txt": b"an object array", "latent_moments.npy": crafted["npy"]}),
        ("cached-1", {"txt": b"a blue square", **moments(), "pyd": crafted["pickle"]}),
    ])
    keys, skipped = one_pass(str(tmp_path / "cache.tar"), precomputed_keys=["latent_moments"])
    assert sorted(keys) == ["cached-0", "cached-1"]
    assert skipped["bad_precomputed"] == 2 and not marker.exists()


@pytest.mark.slow
def test_cache_py_reads_its_source_shards_without_unpickling(tmp_path):
    from llm4gen.cli import cache
    from llm4gen.tools.cache_key import STORAGE_REPORT_FILE

    marker = tmp_path / "ran"
    crafted = payloads(marker)
    (tmp_path / "source").mkdir()
    write_tar(tmp_path / "source" / "shard-000000.tar", [
        ("with-extras", {"png": png_bytes(32), "txt": b"a red circle", "pyd": crafted["pickle"],
                         "pth": crafted["torch"]}),
        ("pickled-image", {"png": crafted["pickle"], "txt": b"a blue square"}),
        ("only-a-pickle", {"pickle": crafted["pickle"], "txt": b"a green circle"}),
    ])
    out = tmp_path / "cache"
    assert cache.main(["--shards", str(tmp_path / "source"), "--output", str(out), "--fields", "latent_moments",
                       "--device", "cpu", "--rank", "0", "--world-size", "1"]) == 0
    report = json.loads((out / STORAGE_REPORT_FILE).read_text())
    assert report["samples"] == 1 and report["skipped"]["bad_image"] == 2 and not marker.exists()
    assert os.listdir(out)  # the cache was written from the one good sample

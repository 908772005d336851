"""Shards as img2dataset writes them for LAION / DataComp (resized images; the original size, the download
status and the caption in each sample's json; a parquet table and a stats file beside each tar): SDXL is
conditioned on the recorded original size, not the downloaded one, online, from the feature cache and in a
training run; a failed download is skipped and counted; the side files are ignored without a warning."""

import json
import os
import warnings

import pytest
import torch

from llm4gen.cli import cache, train
from llm4gen.configs.buckets import bucket_sizes
from llm4gen.datamodules.transforms import (
    SampleError,
    check_download_status,
    original_size,
)
from llm4gen.datamodules.webdataset_datamodule import WebDatasetDataModule
from llm4gen.tools.cache_key import STORAGE_REPORT_FILE
from tests.helpers.shards import write_img2dataset_folder

SAMPLES = [  # downloaded at about 48 px on the shorter side, as img2dataset --image_size 48 --resize_mode keep_ratio
    {"key": "000000000", "caption": "a red circle and a blue square", "size": (64, 48), "original": (1024, 768)},
    {"key": "000000001", "caption": "a green triangle", "size": (48, 72), "original": (800, 1200)},
    {"key": "000000002", "caption": "a yellow square", "size": (48, 48), "original": (512, 512), "status": "failed_to_download"},
    {"key": "000000003", "caption": "a white cross on a black background", "size": (48, 48), "original": (640, 640),
     "txt": False},
    {"key": "000000004", "caption": "a purple circle", "size": (80, 48), "original": (2000, 1200)},
]
RECORDED = {s["key"]: (s["original"][1], s["original"][0]) for s in SAMPLES}  # (height, width)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("img2dataset") / "laion-part"
    write_img2dataset_folder(root, SAMPLES)
    return root


def test_the_original_size_comes_from_the_downloaders_record_first():
    record = {"original_width": 1024, "original_height": 768, "original_size": [10, 20], "width": 64, "height": 48}
    assert original_size({"json": json.dumps(record).encode()}, (48, 64)) == (768, 1024)
    assert original_size({"json": json.dumps({"original_size": [640, 480]}).encode()}, (48, 64)) == (480, 640)
    assert original_size({"json": json.dumps({"original_width": 0, "original_height": 5}).encode()}, (48, 64)) == (48, 64)
    assert original_size({"json": json.dumps({"original_width": True, "original_height": 5}).encode()}, (48, 64)) == (48, 64)


def test_a_status_other_than_success_is_a_failed_download():
    check_download_status({"json": b'{"status": "success"}'})
    check_download_status({"json": b'{"caption": "no status recorded"}'})
    check_download_status({"txt": b"no json at all"})
    with pytest.raises(SampleError) as err:
        check_download_status({"json": b'{"status": "failed_to_download", "error_message": "HTTP 404"}'})
    assert err.value.reason == "failed_download" and "HTTP 404" in str(err.value)


def test_batches_carry_the_recorded_sizes_skip_the_failed_download_and_ignore_the_side_files(folder):
    dm = WebDatasetDataModule(str(folder), batch_size=1, shuffle_buffer=0, shuffle_shards=False, resolution=32,
                              buckets=bucket_sizes(32))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = list(dm.train_dataloader())
    assert not [w for w in caught if "parquet" in str(w.message) or "stats" in str(w.message)]
    keys = [k for b in batches for k in b.keys]
    assert keys == ["000000000", "000000001", "000000003", "000000004"]
    for batch in batches:
        assert batch.original_size.tolist() == [list(RECORDED[batch.keys[0]])]
    assert [b.captions[0] for b in batches][2] == "a white cross on a black background"  # from the json
    assert dm.skipped_totals()["failed_download"] == 1 and sum(dm.skipped_totals().values()) == 1


def test_the_feature_cache_keeps_the_recorded_sizes_and_counts_the_failed_download(folder, tmp_path):
    out = tmp_path / "cache"
    assert cache.main(["--config", "configs/tiny_sdxl.yaml", "--shards", str(folder), "--output", str(out),
                       "--fields", "latent_moments", "--dtype", "float32", "--device", "cpu",
                       "--rank", "0", "--world-size", "1"]) == 0
    report = json.loads((out / STORAGE_REPORT_FILE).read_text())
    assert report["skipped"]["failed_download"] == 1 and sum(report["skipped"].values()) == 1
    dm = WebDatasetDataModule(str(out), batch_size=1, shuffle_buffer=0, shuffle_shards=False, resolution=32,
                              precomputed_keys=["latent_moments"], buckets=bucket_sizes(32))
    batches = list(dm.train_dataloader())
    assert [b.keys[0] for b in batches] == ["000000000", "000000001", "000000003", "000000004"]
    for batch in batches:
        assert batch.original_size.tolist() == [list(RECORDED[batch.keys[0]])]


@pytest.mark.slow
def test_an_sdxl_run_on_the_shards_is_conditioned_on_the_recorded_sizes(folder, tmp_path, monkeypatch):
    import llm4gen.encoders.sdxl as sdxl

    seen = []
    original = sdxl.add_time_ids

    def recording(target_size, batch_size, original_sizes=None, *args, **kwargs):
        if original_sizes is not None:
            seen.extend(tuple(int(v) for v in row) for row in torch.as_tensor(original_sizes).tolist())
        return original(target_size, batch_size, original_sizes, *args, **kwargs)

    monkeypatch.setattr(sdxl, "add_time_ids", recording)
    out = tmp_path / "run"
    assert train.main(["--config", "configs/tiny_sdxl.yaml", f"output_dir={out}", f"data.shards={folder}",
                       "data.synthetic_if_missing=false", "data.batch_size=1", "trainer.max_steps=4",
                       "validation.every_n_steps=0", "validation.at_start=false", "checkpoint.every_n_steps=4"]) == 0
    assert set(seen) == {RECORDED[k] for k in ("000000000", "000000001", "000000003", "000000004")}
    assert os.path.isfile(out / "checkpoints" / "last.ckpt")

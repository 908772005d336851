"""Samples per shard before the first step (datamodules/shard_counts.py): the count pass agrees with what the
stream reads, the writers' records are used where they can be trusted, and counted shards are cached (beside the
shards, or in the run folder) until the shard changes."""

import json
import os
import tarfile

import llm4gen.datamodules.shard_counts as shard_counts
from llm4gen.datamodules.shard_counts import COUNTS_FILE, RUN_COUNTS_FILE, count_tar_samples, known_counts
from llm4gen.datamodules.shards import iter_tar_samples
from llm4gen.datamodules.transforms import SampleError
from tests.helpers.shards import png_bytes, write_tar


def samples(n, prefix="s"):
    return [(f"{prefix}-{i}", {"png": png_bytes(8), "txt": f"caption {i}".encode(), "json": b"{}"}) for i in range(n)]


def readable(url):
    keys = []
    try:
        for sample in iter_tar_samples(url):
            keys.append(sample["__key__"])
    except SampleError:
        pass
    return keys


def test_the_count_pass_counts_what_the_stream_reads(tmp_path):
    write_tar(tmp_path / "good.tar", samples(5))
    assert count_tar_samples(str(tmp_path / "good.tar")) == 5 == len(readable(str(tmp_path / "good.tar")))
    assert count_tar_samples(f"pipe:cat {tmp_path / 'good.tar'}") == 5  # streamed, as a remote shard is

    cut = tmp_path / "cut.tar"
    write_tar(cut, samples(6, "cut"))
    with tarfile.open(cut) as tar:
        cut_at = next(m for m in tar.getmembers() if m.name == "cut-3.txt").offset_data + 3
    with open(cut, "r+b") as handle:
        handle.truncate(cut_at)
    # the sample the tar broke in is counted: the stream meets the break there and counts one bad_shard
    assert readable(str(cut)) == ["cut-0", "cut-1", "cut-2"]
    assert count_tar_samples(str(cut)) == 4 == count_tar_samples(f"pipe:cat {cut}")

    (tmp_path / "garbage.tar").write_bytes(b"not a tar archive" * 50)
    assert count_tar_samples(str(tmp_path / "garbage.tar")) is None
    assert count_tar_samples(str(tmp_path / "missing.tar")) is None


def test_records_come_first_where_they_can_be_trusted(tmp_path):
    folder = tmp_path / "shards"
    folder.mkdir()
    for name in ("a", "b", "c", "d"):
        write_tar(folder / f"{name}.tar", samples(3, name))
    urls = [str(folder / f"{name}.tar") for name in "abcd"]
    size = os.path.getsize(urls[0])
    # a prepare.py manifest: "samples" trusted while "bytes" matches the file (the 7 and 8 are not the truth,
    # which shows the record was read rather than the tar counted)
    (folder / "manifest.json").write_text(json.dumps({"shards": [
        {"path": "a.tar", "samples": 7, "bytes": size}, {"path": "b.tar", "samples": 8, "bytes": size + 1},
        {"path": "c.tar"}, {"path": "d.tar"}]}))
    (folder / ".cache_stats").mkdir()
    (folder / ".cache_stats" / "c.json").write_text(json.dumps({"shard": "c.tar", "samples": 9}))
    (folder / "d_stats.json").write_text(json.dumps({"count": 5, "successes": 5, "failed_to_download": 0}))
    assert known_counts(str(folder), urls, None) == [7, None, 9, 5]
    # img2dataset's stats with failures do not say whether the failed rows are in the tar: counted instead
    (folder / "d_stats.json").write_text(json.dumps({"count": 5, "successes": 3, "failed_to_download": 2}))
    assert known_counts(str(folder), urls, None)[3] is None


def test_counted_shards_are_cached_beside_them_until_they_change(tmp_path, monkeypatch):
    from llm4gen.datamodules.webdataset_datamodule import WebDatasetDataModule

    folder = tmp_path / "shards"
    folder.mkdir()
    write_tar(folder / "a.tar", samples(3, "a"))
    write_tar(folder / "b.tar", samples(4, "b"))
    dm = WebDatasetDataModule(str(folder), batch_size=2, rank=0, world_size=1)
    dm.setup("fit")
    assert dm._sizes == [3, 4]
    cached = json.loads((folder / COUNTS_FILE).read_text())["shards"]
    assert {name: entry["samples"] for name, entry in cached.items()} == {"a.tar": 3, "b.tar": 4}

    counted = []
    real = shard_counts.count_tar_samples
    monkeypatch.setattr(shard_counts, "count_tar_samples", lambda url: (counted.append(url), real(url))[1])
    assert known_counts(str(folder), [str(folder / "a.tar"), str(folder / "b.tar")], None) == [3, 4]
    write_tar(folder / "b.tar", samples(6, "b"))  # rewritten: another size
    again = WebDatasetDataModule(str(folder), batch_size=2, rank=0, world_size=1)
    again.setup("fit")
    assert again._sizes == [3, 6] and counted == [str(folder / "b.tar")]


def test_a_read_only_or_remote_shard_is_cached_in_the_run_folder(tmp_path, monkeypatch):
    folder, run = tmp_path / "shards", tmp_path / "run"
    folder.mkdir()
    run.mkdir()
    write_tar(folder / "a.tar", samples(3, "a"))
    remote = f"pipe:cat {folder / 'b.tar'}"
    write_tar(folder / "b.tar", samples(2, "b"))
    writable = os.access
    monkeypatch.setattr(shard_counts.os, "access", lambda path, mode: writable(path, mode) and str(path) != str(folder))
    shard_counts.store_counts([str(folder / "a.tar"), remote], [3, 2], str(run))
    assert not (folder / COUNTS_FILE).exists()
    cached = json.loads((run / RUN_COUNTS_FILE).read_text())["shards"]
    assert cached[str(folder / "a.tar")]["samples"] == 3 and cached[remote]["samples"] == 2
    assert known_counts([str(folder / "a.tar"), remote], [str(folder / "a.tar"), remote], str(run)) == [3, 2]
    assert known_counts([remote], [remote], None) == [None]  # without the run folder: counted again


def test_an_unreadable_shard_still_counts_once_as_bad_shard(tmp_path):
    from llm4gen.datamodules.webdataset_datamodule import WebDatasetDataModule

    write_tar(tmp_path / "a.tar", samples(6, "a"))
    (tmp_path / "b.tar").write_bytes(b"not a tar archive" * 50)
    dm = WebDatasetDataModule(str(tmp_path), batch_size=4, resolution=8, shuffle_buffer=0)
    keys = []
    for batch in dm.train_dataloader():
        dm.on_batch_consumed(batch)
        keys += batch.keys
    assert dm._sizes == [6, 1] and "b.tar" not in (tmp_path / COUNTS_FILE).read_text()  # not cached: retried
    assert sorted(keys) == [f"a-{i}" for i in range(6)] and dm.skipped_totals()["bad_shard"] == 1

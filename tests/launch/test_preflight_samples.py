"""Several GPUs share each epoch in equal full batches: shards holding fewer samples than one batch per GPU are
refused before any model loads where their counts are recorded (no count pass in the preflight), and by the
datamodule after it counted them otherwise; the message is the same."""

import json
import os

import pytest

from llm4gen.configs.errors import ConfigError
from llm4gen.configs.schema import load_config
from llm4gen.datamodules.shards import resolve_shards
from llm4gen.datamodules.webdataset_datamodule import WebDatasetDataModule
from llm4gen.launch.preflight import check_data_layout
from tests.helpers.shards import png_bytes, write_tar

MESSAGE = "the shards hold 6 samples, fewer than one batch for each of the 4 ranks"


def test_too_few_samples_for_the_gpus_is_refused_first_where_counts_are_recorded(tmp_path):
    folder = tmp_path / "shards"
    folder.mkdir()
    for name in ("a", "b"):
        write_tar(folder / f"{name}.tar", [(f"{name}-{i}", {"png": png_bytes(8), "txt": b"a caption"}) for i in range(3)])
    manifest = {"shards": [{"path": f"{name}.tar", "samples": 3, "bytes": os.path.getsize(folder / f"{name}.tar")}
                           for name in ("a", "b")]}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    overrides = [f"output_dir={tmp_path / 'run'}", f"data.shards={folder}", "data.synthetic_if_missing=false",
                 "data.batch_size=2"]
    with pytest.raises(ConfigError, match=MESSAGE):
        check_data_layout(load_config(None, [*overrides, "trainer.devices=4"]), resolve_shards(str(folder)))
    check_data_layout(load_config(None, [*overrides, "trainer.devices=3"]), resolve_shards(str(folder)))  # 6 = 3 x 2

    (folder / "manifest.json").unlink()  # no record: the preflight does not count, the datamodule does
    check_data_layout(load_config(None, [*overrides, "trainer.devices=4"]), resolve_shards(str(folder)))
    with pytest.raises(ConfigError, match=MESSAGE):
        WebDatasetDataModule(str(folder), batch_size=2, rank=0, world_size=4).setup("fit")

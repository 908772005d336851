"""Small shard-writing helpers shared by the data tests."""

import io
import tarfile
from pathlib import Path

from PIL import Image


def png_bytes(size: int, color=(10, 200, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buffer, format="PNG")
    return buffer.getvalue()


def write_tar(path, samples) -> None:
    """samples: list of (key, {extension: bytes}), written in this order (a sample's members adjacent)."""
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for extension, data in members.items():
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def jpeg_bytes(width: int, height: int, seed: int = 0) -> bytes:
    """A JPEG of varied pixels (a flat colour would hide crop and resize mistakes)."""
    import numpy as np

    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def write_img2dataset_folder(folder, samples) -> None:
    """An img2dataset output folder (LAION / DataComp layout): ``00000.tar`` with ``KEY.jpg``, ``KEY.txt`` and
    ``KEY.json`` per sample, beside ``00000.parquet`` and ``00000_stats.json``. ``samples``: dicts with
    ``key``, ``caption``, ``size`` (width, height as downloaded and resized), ``original`` (width, height
    before the resize), and optionally ``status`` (default "success") and ``txt`` (False: caption in the
    json only). The json fields are img2dataset's."""
    import json
    from pathlib import Path

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    members = []
    for i, s in enumerate(samples):
        (width, height), (original_width, original_height) = s["size"], s["original"]
        status = s.get("status", "success")
        meta = {"url": f"https://example.com/{s['key']}.jpg", "key": s["key"], "status": status,
                "error_message": None if status == "success" else "HTTP 404", "width": width, "height": height,
                "original_width": original_width, "original_height": original_height, "caption": s["caption"],
                "exif": None, "sha256": f"{i:064x}"}
        entry = {"jpg": jpeg_bytes(width, height, seed=i), "json": json.dumps(meta).encode()}
        if s.get("txt", True):
            entry["txt"] = s["caption"].encode()
        members.append((s["key"], entry))
    write_tar(folder / "00000.tar", members)
    (folder / "00000.parquet").write_bytes(b"PAR1" + b"\0" * 64 + b"PAR1")  # the downloader's table, not a shard
    (folder / "00000_stats.json").write_text(json.dumps({"count": len(samples), "successes": sum(
        s.get("status", "success") == "success" for s in samples), "failed_to_download": sum(
        s.get("status", "success") != "success" for s in samples)}))


def gradient_png(width: int, height: int) -> bytes:
    """A PNG whose pixels all differ (values counting up mod 251): crops and resizes show in every pixel."""
    import torch

    pixels = torch.arange(width * height * 3, dtype=torch.int64).remainder(251).to(torch.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels.view(height, width, 3).numpy()).save(buffer, format="PNG")
    return buffer.getvalue()


def first_batch(shards, precomputed_keys, **settings):
    """The first batch of 4 of ``shards`` in order at 32 px, with ``precomputed_keys`` read from the shards."""
    from llm4gen.datamodules.webdataset_datamodule import WebDatasetDataModule

    dm = WebDatasetDataModule(shards, batch_size=4, shuffle_buffer=0, shuffle_shards=False, resolution=32,
                              precomputed_keys=precomputed_keys, **settings)
    return next(iter(dm.train_dataloader()))


def write_latent_shards(directory, num_samples: int, samples_per_shard: int, poisoned=(), seed: int = 0,
                        latent_shape=(8, 16, 16), overrides=("model.base.pretrained=embedded:tiny-sd",)) -> list:
    """Shards whose samples carry a caption, an image and cached ``latent_moments`` (the tiny VAE's at 32 px),
    with the cache key of a run with ``overrides``; the samples whose index is in ``poisoned`` hold +inf
    moments: a batch with one of them has an inf loss."""
    import json
    import random

    import numpy as np

    from llm4gen.configs.schema import load_config
    from llm4gen.tools.cache_key import CACHE_KEY_FILE, cache_key

    key = cache_key(load_config(overrides=list(overrides)), ["latent_moments"], "float32")
    (Path(directory) / CACHE_KEY_FILE).write_text(json.dumps(key))

    from llm4gen.datamodules.synthetic import random_scene
    from llm4gen.datamodules.cache_codec import encode_precomputed

    rng, generator = random.Random(seed), np.random.default_rng(seed)
    paths = []
    for first in range(0, num_samples, samples_per_shard):
        samples = []
        for index in range(first, min(first + samples_per_shard, num_samples)):
            moments = generator.standard_normal(latent_shape).astype(np.float32) * 0.5
            if index in poisoned:
                moments[:] = np.inf
            samples.append((f"sample-{index:06d}", {"txt": random_scene(rng, 32)["caption"].encode(),
                                                    "png": png_bytes(32),
                                                    **encode_precomputed(latent_moments=moments)}))
        path = f"{directory}/shard-{first // samples_per_shard:06d}.tar"
        write_tar(path, samples)
        paths.append(path)
    return paths


def consume(dm, limit=None, loader=None):
    """Iterate a datamodule's train loader (or ``loader``) as Lightning does, reporting each batch as consumed (the
    position a checkpoint saves); stop after ``limit`` batches."""
    batches = []
    for batch in dm.train_dataloader() if loader is None else loader:
        dm.on_batch_consumed(batch)
        batches.append(batch)
        if limit is not None and len(batches) == limit:
            break
    return batches


def keys_of(batches):
    """The sample keys of ``batches``, in order."""
    return [key for batch in batches for key in batch.keys]

"""Small shard-writing helpers shared by the data tests."""

import io
import tarfile

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

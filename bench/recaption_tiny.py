"""The tiny recaptioning job of docs/data.md: a tiny LLaVA (random weights) over 12 synthetic shapes images and one
undecodable one, then its preview; prints how fast the CPU captioned.

    python bench/recaption_tiny.py --output runs/recaption-tiny      # then open runs/recaption-tiny/dense/preview.png
    cp runs/recaption-tiny/dense/preview.png docs/recaption/tiny_preview.png   # the docs' picture

The captions are noise: the model's weights are random. The picture shows what the tool writes (each image, its
original caption, the dense one with its word count, or why a sample has none), not what a real model says.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tarfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from llm4gen.cli import recaption  # noqa: E402
from llm4gen.datamodules.synthetic import write_synthetic_shards  # noqa: E402
from llm4gen.embedded.tiny_vlm import build_tiny_llava  # noqa: E402
from llm4gen.tools.shard_writer import member_info  # noqa: E402

SETTINGS = ["--max-new-tokens", "40", "--min-words", "5", "--max-words", "60", "--batch-size", "4", "--device", "cpu"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="runs/recaption-tiny")
    args = parser.parse_args(argv)
    root = Path(args.output)
    shards = root / "shards"
    write_synthetic_shards(str(shards), num_samples=12, samples_per_shard=4, resolution=64, seed=0, verbose_share=0.5)
    with tarfile.open(shards / "shard-000003.tar", "w") as tar:  # one image that does not decode
        for name, data in (("broken.png", b"\x89PNG\r\n\x1a\n truncated"), ("broken.txt", b"a red circle")):
            tar.addfile(member_info(name, len(data)), io.BytesIO(data))
    model = build_tiny_llava(root / "tiny-llava")
    started = time.perf_counter()
    code = recaption.main([str(shards), "--model", str(model), "--output", str(root / "dense"), *SETTINGS, "--quiet"])
    seconds = time.perf_counter() - started
    recaption.main(["--preview", "13", "--output", str(root / "dense")])
    print(f"\n| job | images | seconds | images/s |\n| --- | ---: | ---: | ---: |\n"
          f"| tiny LLaVA, CPU, batch 4, 40 new tokens | 13 | {seconds:.1f} | {13 / seconds:.1f} |")
    return code


if __name__ == "__main__":
    sys.exit(main())

"""Pretrain the shapes base from scratch (llm4gen/tools/pretrain.py); one field of PretrainConfig per flag.

    python -m llm4gen.cli.pretrain --help
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from typing import Optional

from llm4gen.tools import pretrain
from llm4gen.tools.pretrain import PretrainConfig


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llm4gen.cli.pretrain", description=pretrain.__doc__.split("\n")[0])
    for f in fields(PretrainConfig):
        kind = {"int": int, "float": float, "str": str}.get(str(f.type).replace("Optional[", "").rstrip("]"), str)
        parser.add_argument("--" + f.name.replace("_", "-"), type=kind, default=f.default)
    pretrain.pretrain(PretrainConfig(**vars(parser.parse_args(argv))))
    return 0


if __name__ == "__main__":
    sys.exit(main())

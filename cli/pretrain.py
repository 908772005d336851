"""Pretrain the shapes base from scratch (llm4gen/tools/pretrain.py); one field of PretrainConfig per flag.

    python -m llm4gen.cli.pretrain --help
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from typing import Optional

from llm4gen.configs.errors import entry_point
from llm4gen.lightning_modules.safe_loading import TRUST_FLAG, TRUST_HELP, trusted_checkpoints
from llm4gen.tools import pretrain
from llm4gen.tools.pretrain import PretrainConfig


@entry_point("pretrain")
def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llm4gen.cli.pretrain", description=pretrain.__doc__.split("\n")[0])
    for f in fields(PretrainConfig):
        kind = {"int": int, "float": float, "str": str}.get(str(f.type).replace("Optional[", "").rstrip("]"), str)
        parser.add_argument("--" + f.name.replace("_", "-"), type=kind, default=f.default)
    parser.add_argument(TRUST_FLAG, action="store_true", help=f"the partial stages in OUTPUT/stages: {TRUST_HELP}")
    args = vars(parser.parse_args(argv))
    with trusted_checkpoints(args.pop("trust_checkpoint")):
        pretrain.pretrain(PretrainConfig(**args))
    return 0


if __name__ == "__main__":
    sys.exit(main())

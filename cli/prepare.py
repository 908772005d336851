"""Write WebDataset shards from a folder or table of (image, caption): `python prepare.py --help`.

The logic lives in tools/prepare.py; this file only makes it a command.
"""

import sys

from llm4gen.tools.prepare import main as prepare_main


def main(argv=None) -> int:
    return prepare_main(argv)


if __name__ == "__main__":
    sys.exit(main())

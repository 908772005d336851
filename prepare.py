"""Write WebDataset shards from a folder or table of (image, caption): `python prepare.py --help`.

A repository shortcut for `llm4gen.cli.prepare` (installed as `llm4gen-prepare`)."""

import sys

from llm4gen.cli.prepare import main

if __name__ == "__main__":
    sys.exit(main())

"""Dense captions for WebDataset shards from a vision-language model: `python recaption.py --help`.

A repository shortcut for `llm4gen.cli.recaption` (installed as `llm4gen-recaption`)."""

import sys

from llm4gen.cli.recaption import main

if __name__ == "__main__":
    sys.exit(main())

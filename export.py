"""Export a trained run in the authors' release layout: `python export.py --help`.

A repository shortcut for `llm4gen.cli.export` (installed as `llm4gen-export`)."""

import sys

from llm4gen.cli.export import main

if __name__ == "__main__":
    sys.exit(main())

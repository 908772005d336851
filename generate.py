"""Generate images from a trained run.

A repository shortcut for `llm4gen.cli.generate` (installed as `llm4gen-generate`)."""

import sys

from llm4gen.cli.generate import main

if __name__ == "__main__":
    sys.exit(main())

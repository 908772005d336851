"""Train the LLM4GEN Cross-Adapter Module.

A repository shortcut for `llm4gen.cli.train` (installed as `llm4gen-train`)."""

import sys

from llm4gen.cli.train import main

if __name__ == "__main__":
    sys.exit(main())

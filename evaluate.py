"""Evaluate a run, an exported adapter or a base model on prompt sets, with fixed seeds.

A repository shortcut for `llm4gen.cli.evaluate` (installed as `llm4gen-evaluate`)."""

import sys

from llm4gen.cli.evaluate import main

if __name__ == "__main__":
    sys.exit(main())

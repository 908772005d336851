"""Run a config sweep locally or as one SLURM job array, and summarize it.

A repository shortcut for `llm4gen.cli.sweep` (installed as `llm4gen-sweep`)."""

import sys

from llm4gen.cli.sweep import main

if __name__ == "__main__":
    sys.exit(main())

"""Submit one training run as a SLURM batch job.

A repository shortcut for `llm4gen.cli.submit` (installed as `llm4gen-submit`)."""

import sys

from llm4gen.cli.submit import main

if __name__ == "__main__":
    sys.exit(main())

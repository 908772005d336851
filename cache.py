"""Precompute VAE latents, LLM/CLIP features and entity parses into companion shards: `python cache.py --help`.

A repository shortcut for `llm4gen.cli.cache` (installed as `llm4gen-cache`)."""

import sys

from llm4gen.cli.cache import main

if __name__ == "__main__":
    sys.exit(main())

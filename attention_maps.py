"""Show where each entity and attribute word of a prompt attends while a trained model generates it.

A repository shortcut for `llm4gen.cli.attention_maps` (installed as `llm4gen-attention-maps`)."""

import sys

from llm4gen.cli.attention_maps import main

if __name__ == "__main__":
    sys.exit(main())

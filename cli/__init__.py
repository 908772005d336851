"""Entry points: thin wirings of library functions, installed as the llm4gen-* console scripts.

Importing this package filters the library notices known to be harmless (llm4gen/noise.py) before the
libraries load, since diffusers prints one while it is imported; ``--verbose`` keeps them."""

import sys

from llm4gen.noise import filter_known_noise

if not {"--verbose", "-v"} & set(sys.argv[1:]):
    filter_known_noise()

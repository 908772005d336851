"""Precompute VAE latents, LLM/CLIP features and entity parses into companion shards: `python cache.py --help`.

    python cache.py --config CFG [dotted.key=value ...] --shards SPEC --output DIR
                    [--fields latent_moments,llm_features,clip_features,entities] [--dtype float16|float32]

Train on the result with ``data.shards=DIR data.precomputed_keys=[latent_moments,llm_features]``.
The logic lives in tools/feature_cache.py; this file only makes it a command.
"""

import sys

from llm4gen.tools.feature_cache import main as cache_main


def main(argv=None) -> int:
    return cache_main(argv)


if __name__ == "__main__":
    sys.exit(main())

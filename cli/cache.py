"""Precompute VAE latents, LLM/CLIP features and entity parses into companion shards: `python cache.py --help`.

    python cache.py --config CFG [dotted.key=value ...] --shards SPEC --output DIR
                    [--fields latent_moments,llm_features,clip_features,entities] [--dtype float16|float32]

Train on the result with ``data.shards=DIR data.precomputed_keys=[latent_moments,llm_features]``.
The work is tools/feature_cache.py's ``run_cache``; this file is its command line.
"""

from __future__ import annotations

import argparse
import sys

import torch

from llm4gen.configs.errors import entry_point
from llm4gen.configs.schema import load_config
from llm4gen.datamodules.synthetic import ensure_synthetic_shards
from llm4gen.tools.cache_key import CACHE_DTYPES, CACHE_FIELDS, CacheError, DEFAULT_FIELDS
from llm4gen.tools.feature_cache import default_rank, run_cache


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="cache.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="the run's experiment YAML (models, resolution, caption keys)")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides, as for train.py")
    parser.add_argument("--shards", help="input shards (directory, brace pattern, manifest); default data.shards")
    parser.add_argument("--output", required=True, help="cache directory (one shard per input shard, same names)")
    parser.add_argument("--fields", default=",".join(DEFAULT_FIELDS),
                        help=f"comma-separated, from {','.join(CACHE_FIELDS)} (default %(default)s)")
    parser.add_argument("--dtype", default="float16", choices=sorted(CACHE_DTYPES), help="cached array precision")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-shards-per-process", type=int, default=None,
                        help="cache at most this many unfinished shards, then exit (time-limited jobs)")
    parser.add_argument("--rank", type=int, default=None, help="default: SLURM_PROCID, else RANK, else 0")
    parser.add_argument("--world-size", type=int, default=None, help="default: SLURM_NTASKS, else WORLD_SIZE, else 1")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--drop-images", action="store_true", help="leave image members out of the cached shards")
    return parser.parse_args(argv)


@entry_point("cache.py")
def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if (args.rank is None) != (args.world_size is None):
            raise CacheError("give both --rank and --world-size, or neither (then SLURM or torchrun variables decide)")
        rank, world_size = (args.rank, args.world_size) if args.rank is not None else default_rank()
        shards = args.shards
        if shards is None:
            shards = cfg.data.shards
            if cfg.data.synthetic_if_missing:
                ensure_synthetic_shards(shards, resolution=cfg.data.resolution, seed=cfg.seed)
        fields = [name.strip() for name in args.fields.split(",") if name.strip()]
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        summary = run_cache(cfg, shards, args.output, fields, cache_dtype=args.dtype, batch_size=args.batch_size,
                            rank=rank, world_size=world_size, max_shards=args.num_shards_per_process, device=device,
                            drop_images=args.drop_images)
    except FileNotFoundError as error:  # input shards named by --shards or data.shards
        raise CacheError(f"--shards / data.shards: {error}") from None
    return 1 if summary["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())

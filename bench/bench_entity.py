"""Cost of the entity-guided regularization: tiny-default training-step time with the entity loss on vs
off, and entity-parser throughput per data worker.

    python bench/bench_entity.py [--steps 30] [--batch-size 8] [--layers lowest] [--n-short 1000] [--n-dense 100]

Step time: the same plain PyTorch loop as bench/bench_step.py (compute_losses, backward, clipping,
AdamW) over fixed in-memory batches whose `entities` are parsed beforehand, as the data workers do;
off = model.objective.lambda_entity 0 (no capture, fused attention everywhere), on = 0.1. Runs
off, on, off, on and averages each pair. Target: on / off <= 1.3.
Parser: captions/s of one process (torch on one thread) for the short and dense caption sets of
bench/bench_parser.py, i.e. what each data worker can feed.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from bench_parser import DENSE, SHORT, captions_per_second  # noqa: E402  (a sibling: python puts bench/ on the path)
from bench_step import make_batches, plain_loop  # noqa: E402
from llm4gen.configs.schema import load_config  # noqa: E402
from llm4gen.datamodules.collate import entity_parser, with_entities  # noqa: E402
from llm4gen.datamodules.entity_targets import EntityTargetBuilder, TokenizerSources  # noqa: E402
from llm4gen.lightning_modules.llm4gen import LLM4GenModule  # noqa: E402


def entity_batches(n: int, batch_size: int, resolution: int, model_cfg) -> list:
    """bench_step's batches with each caption's entity groups and targets precomputed, as the data side does."""
    builder = EntityTargetBuilder(TokenizerSources.from_model_config(model_cfg))
    return [with_entities(batch, model_cfg.objective.entity_parser, builder)
            for batch in make_batches(n, batch_size, resolution)]


def step_times(cfg, batches, steps: int, layers: str) -> dict[str, float]:
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    times: dict[str, list[float]] = {"off": [], "on": []}
    for name in ("off", "on", "off", "on"):
        model_cfg["objective"]["lambda_entity"] = 0.1 if name == "on" else 0.0
        model_cfg["objective"]["entity_layers"] = layers
        torch.manual_seed(0)
        module = LLM4GenModule(model_cfg)
        times[name].append(plain_loop(module, batches, steps, cfg.trainer.gradient_clip_val))
    return {name: sum(v) / len(v) for name, v in times.items()}


def parser_rates(model: str, n_short: int, n_dense: int) -> dict[str, float]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one data worker
    try:
        parser = entity_parser(model)
        parser.parse_many(SHORT + DENSE)  # warm-up
        return {"short (4-10 words)": captions_per_second(parser.parse_many, [SHORT[i % len(SHORT)] for i in range(n_short)]),
                "dense (~75 words)": captions_per_second(parser.parse_many, [DENSE[i % len(DENSE)] for i in range(n_dense)])}
    finally:
        torch.set_num_threads(threads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--layers", default="lowest", help="model.objective.entity_layers for the 'on' runs")
    parser.add_argument("--n-short", type=int, default=1000)
    parser.add_argument("--n-dense", type=int, default=100)
    args = parser.parse_args()
    cfg = load_config(None, ["model.optim.warmup_steps=0"])
    batches = entity_batches(8, args.batch_size, cfg.data.resolution, cfg.model)
    pairs = sum(len(g["attributes"]) for b in batches for caption in b.entities for g in caption)
    times = step_times(cfg, batches, args.steps, args.layers)
    rates = parser_rates(cfg.model.objective.entity_parser, args.n_short, args.n_dense)
    load = os.getloadavg()[0]

    print(f"\ntiny default, batch {args.batch_size}, {args.steps} timed steps x 2 runs each, torch threads "
          f"{torch.get_num_threads()}, entity layers {args.layers}, {pairs / len(batches):.1f} pairs/batch, "
          f"load average (1 min) at the end {load:.2f}")
    print("| measure | value |\n| --- | --- |")
    print(f"| step, entity loss off (ms) | {times['off'] * 1e3:.1f} |")
    print(f"| step, entity loss on (ms) | {times['on'] * 1e3:.1f} |")
    print(f"| ratio on / off (target <= 1.3) | {times['on'] / times['off']:.3f} |")
    for name, rate in rates.items():
        print(f"| parser, {name} (captions/s per worker) | {rate:.1f} |")


if __name__ == "__main__":
    main()

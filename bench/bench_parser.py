"""Entity parser throughput on one process: short captions and dense ~80-word captions.

Run: python bench/bench_parser.py [--n-short 2000] [--n-dense 200] [--batch-size 64]
Prints a table of captions/s for `EntityParser.parse_many` (nlp.pipe) and `EntityParser.parse`.
"""

from __future__ import annotations

import argparse
import time

from llm4gen.losses.entity_parser import EntityParser  # noqa: E402

SHORT = [
    "a red and white bus",
    "a leather bag next to a glass vase",
    "the walls are painted pale blue",
    "a heart-shaped balloon with a polka-dot pattern",
    "a fire truck and a teddy bear on a wooden table",
    "three black cats under glowing signs",
    "a shiny silver car parked near a stone bridge",
    "a cat that is black",
]
DENSE = [
    "The image shows a cozy living room with a large gray sofa placed against a white brick wall. "
    "On the sofa sit two fluffy cushions and a folded blue blanket. In front of the sofa there is a "
    "round wooden coffee table holding a glass vase with bright yellow flowers and a stack of old "
    "books. A tall floor lamp with a beige shade stands in the corner, and sunlight streams through a "
    "large window with thin white curtains.",
    "A busy city street at night is filled with people walking past tall buildings. Small shops have "
    "bright neon signs, and a red double-decker bus drives down the wet road, its headlights "
    "reflecting on the shiny pavement. A young woman in a long black coat holds a transparent "
    "umbrella while a man wearing a leather jacket stands at the crosswalk. The sky is dark and "
    "cloudy, and the air looks cold and misty.",
]


def captions_per_second(function, captions) -> float:
    start = time.perf_counter()
    function(captions)
    return len(captions) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-short", type=int, default=2000)
    parser.add_argument("--n-dense", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()

    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass
    entity_parser = EntityParser(batch_size=args.batch_size)
    entity_parser.parse_many(SHORT + DENSE)  # warm-up

    sets = {
        "short (4-10 words)": [SHORT[i % len(SHORT)] for i in range(args.n_short)],
        "dense (~75 words)": [DENSE[i % len(DENSE)] for i in range(args.n_dense)],
    }
    print(f"spaCy model: {entity_parser.model}, batch_size={args.batch_size}, one process")
    print(f"{'captions':<20} {'n':>6} {'parse_many cap/s':>17} {'parse cap/s':>12}")
    for name, captions in sets.items():
        many = captions_per_second(entity_parser.parse_many, captions)
        single = captions_per_second(lambda cs: [entity_parser.parse(c) for c in cs], captions)
        print(f"{name:<20} {len(captions):>6} {many:>17.1f} {single:>12.1f}")


if __name__ == "__main__":
    main()

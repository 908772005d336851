"""How many prompts CLIP's 77-token window cuts: DPG-Bench's 1,065 (shipped) and the shapes world's long sets.

    python bench/clip_truncation.py

Counts CLIP tokens (the real CLIP BPE, start and end tokens included) per prompt and prints, per set, how many
prompts exceed 77 tokens and so reach torchmetrics' CLIPScore cut (``clip_score``), which keeps the first 77
tokens (no end token: see docs/evaluation.md for what the pooled embedding then is), and how many words the cut
drops. ``clip_score_long`` reads all of them.
"""

from __future__ import annotations

import numpy as np

from llm4gen.datamodules.synthetic import clip_tokenizer
from llm4gen.evaluation import dpg_bench
from llm4gen.evaluation.prompt_sets import prompt_set
from llm4gen.evaluation.scorers import CLIP_CONTEXT


def main() -> None:
    tokenizer = clip_tokenizer()
    sets = {"dpg_bench": list(dpg_bench.prompts().values()),
            **{name: [r.text for r in prompt_set(name)] for name in ("verbose_2", "verbose_3")}}
    print("| set | prompts | over 77 tokens | share | median tokens | max tokens | tokens cut (mean over cut prompts) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, prompts in sets.items():
        lengths = np.array([len(tokenizer(p, truncation=False).input_ids) for p in prompts])
        over = lengths > CLIP_CONTEXT
        cut = (lengths[over] - CLIP_CONTEXT).mean() if over.any() else 0.0
        print(f"| {name} | {len(prompts)} | {over.sum()} | {over.mean():.1%} | {np.median(lengths):.0f} | "
              f"{lengths.max()} | {cut:.1f} |")


if __name__ == "__main__":
    main()

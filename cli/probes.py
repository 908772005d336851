"""Linear probes of what the LLM's features hold, and where the UNet looks (llm4gen/experiments/probes.py).

    python -m llm4gen.cli.probes --help
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional

from llm4gen.evaluation.prompt_sets import prompt_set
from llm4gen.experiments import probes
from llm4gen.experiments.probes import (COLORS, ProbeSplits, layer_sweep, llm_attention_share, load_encoders,
                                        noun_examples, noun_features, probe_scores, score_row)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llm4gen.cli.probes", description=probes.__doc__.split("\n")[0])
    parser.add_argument("--base", default="embedded:shapes-sd")
    parser.add_argument("--llm", default="embedded:minilm")
    parser.add_argument("--max-length", type=int, default=192, help="LLM tokens (192 hold every verbose caption)")
    parser.add_argument("--train", type=int, default=600, help="two-object captions the probe is fit on")
    parser.add_argument("--val", type=int, default=300, help="captions that choose the layer")
    parser.add_argument("--test", type=int, default=300, help="captions that score the chosen layer")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--heldout-test", action="store_true",
                        help="the first design, for comparison: fit on training-split pairs, test on held-out ones")
    parser.add_argument("--attention", nargs="*", default=[], metavar="CHECKPOINT",
                        help="training checkpoints: also print the UNet's cross-attention share on the LLM tokens")
    args = parser.parse_args(argv)
    clip, llm = load_encoders(args.base, args.llm, args.max_length)
    clip_spec = (lambda t: clip(t).hidden, clip.tokenizer, clip.tokenizer.model_max_length, "")
    if args.heldout_test:
        train, test = noun_examples(args.train, "train", args.seed), noun_examples(args.test, "heldout", args.seed + 2)
        columns = ["all", *sorted({e.phrasing for e in test})]
        print(f"linear probe fit on {len(train)} nouns of training-split pairs, tested on {len(test)} of held-out "
              f"pairs (the first design: it cannot read a held-out pair even from an encoder that binds)")
        print("| encoder | " + " | ".join(columns) + " |\n| --- |" + " --- |" * len(columns))
        llm_spec = (lambda t: llm(t).features, llm.tokenizer, llm.max_length, llm.prefix)
        for name, spec in (("CLIP (the base's, 77 tokens)", clip_spec), (f"{args.llm}, last layer", llm_spec)):
            print(score_row(name, probe_scores(train, noun_features(train, *spec), test, noun_features(test, *spec)),
                            columns))
        return 0
    splits = ProbeSplits.make(args.train, args.val, args.test, args.seed)
    choice = layer_sweep(llm, splits)
    print(f"linear probe: an object's colour from the feature at its noun, captions over every colour-shape pair "
          f"in every phrasing; fit on {len(splits.train)} nouns, layer chosen on {len(splits.val)}, scored on "
          f"{len(splits.test)} (chance {1 / len(COLORS):.3f}); {args.llm} at max_length {args.max_length}")
    print("\nvalidation accuracy per layer (0: the embeddings; mean: the layer-normalised mean of all layers):")
    print("| layer | " + " | ".join(map(str, choice.validation)) + " |\n| --- |" + " --- |" * len(choice.validation))
    print("| own colour | " + " | ".join(f"{v:.3f}" for v in choice.validation.values()) + " |")
    columns = ["all", "short", *sorted({e.phrasing for e in splits.test})]
    print(f"\nchosen layer: {choice.layer!r}; the test split:")
    print("| encoder | " + " | ".join(columns) + " |\n| --- |" + " --- |" * len(columns))
    print(score_row(f"{args.llm}, layer {choice.layer}", choice.test, columns))
    clip_scores = probe_scores(splits.train, noun_features(splits.train, *clip_spec),
                               splits.test, noun_features(splits.test, *clip_spec))
    print(score_row("CLIP (the base's, 77 tokens)", clip_scores, columns))
    if args.attention:
        prompts = [r.text for r in prompt_set("verbose_2")]
        print("\n| checkpoint | cross-attention on CLIP / LLM tokens / LLM padding (verbose_2, t = 200/500/800) |"
              "\n| --- | --- |")
        for checkpoint in args.attention:
            split = llm_attention_share(checkpoint, prompts)
            print(f"| {checkpoint} | {split.clip:.3f} / {split.llm:.3f} / {split.padding:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Does a text encoder's feature at an object's noun say which colour *that* object has? A linear probe.

The CAM can only help binding if the LLM's token features carry it. For two-object captions of the
shapes benchmark we take each encoder's feature at each object's shape noun ("circle", averaged over
its tokens) and fit a linear classifier that reads the object's colour from it. Trained on
training-split captions, tested on held-out colour-shape pairs (never in training captions), per
caption phrasing. ``own`` is the probe's accuracy (chance 1/8); ``lost`` the share of nouns the encoder
never saw (truncated at its max_length; they count as wrong); ``other`` how often it names the other
object's colour instead, the signature of an encoder that knows which colours are in the caption but
not which object has which. CLIP's text encoder attends causally, so in "a square colored red" the
noun comes before its colour and cannot see it; a bidirectional encoder (MiniLM) can.

    python -m evaluation.probes [--base embedded:shapes-sd] [--llm embedded:minilm] [--train 3000] [--test 1000]
    python -m evaluation.probes --attention RUN/checkpoints/last.ckpt [...]   # + where the UNet looks

``--attention`` also measures, for trained checkpoints, how much of the UNet's cross-attention lands on
the CAM's LLM tokens (positions after CLIP's 77) rather than on CLIP's, on held-out two-object prompts:
a CAM whose tokens draw no attention cannot change what is drawn.
"""

from __future__ import annotations

import argparse
import random
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from datamodules.shapes import COLORS, caption, entity_groups, phrasings_for, sample_scene
from losses.entity_parser import Word
from losses.token_alignment import batch_word_token_positions

COLOR_INDEX = {name: i for i, name in enumerate(COLORS)}


@dataclass(frozen=True)
class NounExample:
    text: str
    phrasing: str
    noun: Word          # the object's shape noun: caption[noun.start:noun.end]
    color: int          # its colour (index into COLORS)
    other_color: int    # the other object's colour


def noun_examples(n_captions: int, split: str, seed: int) -> list[NounExample]:
    """Two examples per two-object caption (one per object), phrasings drawn uniformly."""
    rng = random.Random(seed)
    examples = []
    for _ in range(n_captions):
        scene = sample_scene(rng, split, n_objects=2)
        phrasing = rng.choice(phrasings_for(2))
        text = caption(scene, phrasing)
        groups = entity_groups(text)
        colours = []
        for group in groups:
            colour = next(a["text"] for a in group["attributes"] if a["text"] in COLOR_INDEX)
            colours.append(COLOR_INDEX[colour])
        for i, group in enumerate(groups):
            noun = Word(group["entity"]["text"], group["entity"]["start"], group["entity"]["end"])
            examples.append(NounExample(text, phrasing, noun, colours[i], colours[1 - i]))
    return examples


def noun_features(examples: Sequence[NounExample], encode: Callable[[list[str]], torch.Tensor], tokenizer,
                  max_length: int, prefix: str = "", batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Each example's encoder feature averaged over its noun's tokens, (N, hidden), and whether the noun
    survived truncation to ``max_length``, (N,) bool (a lost noun's row is zeros: the encoder never saw
    it). ``encode`` maps captions to (B, max_length, hidden) features of ``tokenizer(prefix + caption)``."""
    rows, kept = [], []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        texts = [e.text for e in chunk]
        positions = batch_word_token_positions(texts, [[e.noun] for e in chunk], tokenizer, max_length, prefix)
        hidden = encode(texts)
        for b, (word_positions,) in enumerate(positions):
            kept.append(bool(word_positions))
            rows.append(hidden[b, word_positions].mean(0) if word_positions else hidden.new_zeros(hidden.shape[-1]))
    return torch.stack(rows), torch.tensor(kept)


def fit_linear_probe(features: torch.Tensor, labels: torch.Tensor, classes: int, steps: int = 300,
                     weight_decay: float = 1e-3, seed: int = 0) -> Callable[[torch.Tensor], torch.Tensor]:
    """A multinomial logistic regression on standardized features (full-batch L-BFGS); returns a
    function from features (N, hidden) to predicted labels (N,)."""
    generator = torch.Generator().manual_seed(seed)
    mean, std = features.mean(0), features.std(0).clamp_min(1e-6)
    x = (features - mean) / std
    linear = torch.nn.Linear(x.shape[1], classes)
    with torch.no_grad():
        linear.weight.normal_(0, 0.01, generator=generator)
        linear.bias.zero_()
    optimizer = torch.optim.LBFGS(linear.parameters(), max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(linear(x), labels) + weight_decay * linear.weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return lambda f: linear((f - mean) / std).argmax(-1).detach()


def probe_scores(train: Sequence[NounExample], train_features: tuple[torch.Tensor, torch.Tensor],
                 test: Sequence[NounExample], test_features: tuple[torch.Tensor, torch.Tensor]) -> dict[str, dict]:
    """``{"all" | phrasing: {"own": accuracy, "other": share naming the other object's colour, "lost": share
    of nouns truncated away (they count as wrong), "n": count}}``; features as ``noun_features`` returns."""
    (x_train, kept_train), (x_test, kept_test) = train_features, test_features
    labels = torch.tensor([e.color for e in train])
    predict = fit_linear_probe(x_train[kept_train], labels[kept_train], len(COLORS))
    predicted = torch.where(kept_test, predict(x_test), -1)
    own = predicted == torch.tensor([e.color for e in test])
    other = predicted == torch.tensor([e.other_color for e in test])
    groups = {"all": list(range(len(test)))}
    for i, e in enumerate(test):
        groups.setdefault(e.phrasing, []).append(i)
    return {name: {"own": float(own[idx].float().mean()), "other": float(other[idx].float().mean()),
                   "lost": float((~kept_test[idx]).float().mean()), "n": len(idx)} for name, idx in groups.items()}


def encoders(base: str, llm: str) -> dict[str, tuple[Callable, object, int, str]]:
    """name -> (encode, tokenizer, max_length, prefix), both loaded as training loads them."""
    from configs.schema import load_config
    from encoders.llm import LLMEncoder
    from encoders.stable_diffusion import load_base_model

    cfg = load_config(overrides=[f"model.base.pretrained={base}", f"model.llm.pretrained={llm}"])
    clip = load_base_model(cfg.model.base).text
    language_model = LLMEncoder.from_config(cfg.model.llm)
    return {
        "CLIP text encoder (the base's)": (lambda t: clip(t).hidden, clip.tokenizer, clip.tokenizer.model_max_length, ""),
        f"LLM ({llm})": (lambda t: language_model(t).features, language_model.tokenizer, language_model.max_length,
                         language_model.prefix),
    }


@torch.no_grad()
def llm_attention_share(checkpoint: str, prompts: Sequence[str], timesteps: Sequence[int] = (200, 500, 800),
                        seed: int = 0) -> float:
    """Mean share of cross-attention probability (every cross-attention layer, head, pixel, and the given
    timesteps) on the context's LLM tokens (positions >= 77) for the prompts, from a noised random latent;
    0 for a run without the CAM."""
    from evaluation.sampler import load_checkpoint_module
    from losses.attention_capture import cross_attention_layer_names, install_attention_capture, remove_attention_capture

    module = load_checkpoint_module(checkpoint).eval()
    if not module.uses_cam:
        return 0.0
    remove_attention_capture(module.unet)  # a run with the entity loss has its own capture on some layers
    store = install_attention_capture(module.unet, cross_attention_layer_names(module.unet, "all"))
    context, unet_kwargs = module.conditioning({"captions": list(prompts)})
    clip_tokens = context.shape[1] - module.cfg.llm.max_length
    generator = torch.Generator().manual_seed(seed)
    size = module.unet.config.sample_size
    shares = []
    for t in timesteps:
        latents = torch.randn(len(prompts), module.unet.config.in_channels, size, size, generator=generator)
        module.unet(latents, torch.full((len(prompts),), t), context, **unet_kwargs)
        for probs in store.maps().values():                              # (batch, pixels, tokens)
            shares.append(float(probs[..., clip_tokens:].sum(-1).mean()))
    return sum(shares) / len(shares)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m evaluation.probes", description=__doc__.split("\n")[0])
    parser.add_argument("--base", default="embedded:shapes-sd")
    parser.add_argument("--llm", default="embedded:minilm")
    parser.add_argument("--train", type=int, default=3000, help="training-split two-object captions")
    parser.add_argument("--test", type=int, default=1000, help="held-out two-object captions")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--attention", nargs="*", default=[], metavar="CHECKPOINT",
                        help="training checkpoints: also print the UNet's cross-attention share on the LLM tokens")
    args = parser.parse_args(argv)
    train, test = noun_examples(args.train, "train", args.seed), noun_examples(args.test, "heldout", args.seed + 1)
    phrasings = sorted({e.phrasing for e in test})
    print(f"linear probe: an object's colour from the feature at its noun; trained on {len(train)} nouns of "
          f"training-split captions, tested on {len(test)} of held-out pairs (chance {1 / len(COLORS):.3f})")
    print("| encoder | " + " | ".join(["all", *phrasings]) + " |")
    print("| --- |" + " --- |" * (1 + len(phrasings)))
    for name, (encode, tokenizer, max_length, prefix) in encoders(args.base, args.llm).items():
        with torch.no_grad():
            scores = probe_scores(train, noun_features(train, encode, tokenizer, max_length, prefix),
                                  test, noun_features(test, encode, tokenizer, max_length, prefix))
        cells = [f"{scores[k]['own']:.2f} (other {scores[k]['other']:.2f}" +
                 (f", lost {scores[k]['lost']:.2f})" if scores[k]["lost"] else ")") for k in ["all", *phrasings]]
        print(f"| {name} | " + " | ".join(cells) + " |")
    if args.attention:
        from evaluation.prompt_sets import prompt_set

        prompts = [r.text for r in prompt_set("heldout_2", 48)]
        print("\n| checkpoint | cross-attention on the LLM tokens (heldout_2, t = 200/500/800) |\n| --- | --- |")
        for checkpoint in args.attention:
            print(f"| {checkpoint} | {llm_attention_share(checkpoint, prompts):.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

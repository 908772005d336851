"""Does a text encoder's feature at an object's noun say which colour *that* object has? A linear probe.

The CAM can only help binding if the LLM's token features carry it. For two-object captions of the
shapes benchmark we take each encoder's feature at each object's shape noun ("circle", averaged over
its tokens) and fit a linear classifier that reads the object's colour from it. ``own`` is the probe's
accuracy (chance 1/8); ``lost`` the share of nouns the encoder never saw (truncated at its max_length;
they count as wrong); ``other`` how often it names the other object's colour instead, the signature of
an encoder that knows which colours are in the caption but not which object has which.

The design matters. Captions for the probe's training, validation and test splits are drawn from
every colour-shape pair (``noun_examples(..., splits=("train", "heldout"))``), each split from its own
seed. A probe trained only on training-split pairs and tested on held-out ones (the first version of
this module) cannot succeed on an encoder that binds perfectly: in training no circle is ever, say,
red, so the probe learns "a circle is never red" and names the other object's colour; its low scores
measured the probe, not the encoder (``--heldout-test`` keeps that design for comparison).

``layer_sweep`` reads every hidden layer of the LLM from one forward pass (and the layer-normalised mean
of all layers), scores each on the validation split, and picks the best; the test split then scores the
chosen layer once. That is how the evidence protocol (docs/evidence/protocol.md) chooses
``model.llm.layer``. CLIP's causal encoder is probed beside it: in "a square colored red" the noun
comes before its colour and cannot see it.

    python -m llm4gen.cli.probes [--llm embedded:minilm] [--max-length 192] [--train 600 --val 300 --test 300]
    python -m llm4gen.cli.probes --attention RUN/checkpoints/last.ckpt [...]   # + where the UNet looks

``--attention`` also measures, for trained checkpoints, how much of the UNet's cross-attention lands on
the CAM's LLM tokens (the positions after CLIP's) rather than on CLIP's: a CAM whose tokens draw no
attention cannot change what is drawn.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from llm4gen.configs.schema import load_config
from llm4gen.encoders.llm import (
    LLMEncoder,
    normalizes,
    num_hidden_layers,
    read_hidden_states,
)
from llm4gen.encoders.stable_diffusion import load_base_model
from llm4gen.lightning_modules.attention_split import AttentionSplit, attention_split
from llm4gen.lightning_modules.sampler import load_checkpoint_module
from llm4gen.losses.entity_parser import Word
from llm4gen.losses.token_alignment import batch_word_token_positions
from llm4gen.shapes.world import (
    COLORS,
    caption,
    entity_groups,
    phrasings_for,
    sample_scene,
)

COLOR_INDEX = {name: i for i, name in enumerate(COLORS)}


@dataclass(frozen=True)
class NounExample:
    text: str
    phrasing: str
    noun: Word          # the object's shape noun: caption[noun.start:noun.end]
    color: int          # its colour (index into COLORS)
    other_color: int    # the other object's colour


def noun_examples(n_captions: int, splits: str | Sequence[str], seed: int,
                  phrasings: Optional[Sequence[str]] = None) -> list[NounExample]:
    """Two examples per two-object caption (one per object, in text order). Each caption's scene comes
    from one of ``splits`` (drawn uniformly; ``("train", "heldout")`` covers every colour-shape pair)
    and its phrasing from ``phrasings`` (default: every phrasing, verbose included)."""
    rng = random.Random(seed)
    splits = (splits,) if isinstance(splits, str) else tuple(splits)
    phrasings = list(phrasings or phrasings_for(2, include_verbose=True))
    examples = []
    for _ in range(n_captions):
        scene = sample_scene(rng, rng.choice(splits), n_objects=2)
        phrasing = rng.choice(phrasings)
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
    it). ``encode`` maps captions to (B, tokens, hidden) features of ``tokenizer(prefix + caption)`` (right
    padded, at most ``max_length`` tokens); one giving (layers, B, tokens, hidden) gives (layers, N, hidden).
    Captions are encoded shortest first, so that an encoder that pads to the batch's longest wastes little."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].text))
    rows: list = [None] * len(examples)
    kept: list = [None] * len(examples)
    for start in range(0, len(order), batch_size):
        chunk = [examples[i] for i in order[start:start + batch_size]]
        texts = [e.text for e in chunk]
        positions = batch_word_token_positions(texts, [[e.noun] for e in chunk], tokenizer, max_length, prefix)
        hidden = encode(texts)
        for b, (word_positions,) in enumerate(positions):
            i = order[start + b]
            kept[i] = bool(word_positions)
            at = hidden[..., b, :, :]  # (tokens, hidden), or (layers, tokens, hidden)
            rows[i] = at[..., word_positions, :].mean(-2) if word_positions else at.new_zeros(at[..., 0, :].shape)
    return torch.stack(rows, dim=-2), torch.tensor(kept)


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
    if any(e.phrasing == "verbose" for e in test):  # the five short phrasings together, beside the verbose one
        groups["short"] = [i for i, e in enumerate(test) if e.phrasing != "verbose"]
    for i, e in enumerate(test):
        groups.setdefault(e.phrasing, []).append(i)
    return {name: {"own": float(own[idx].float().mean()), "other": float(other[idx].float().mean()),
                   "lost": float((~kept_test[idx]).float().mean()), "n": len(idx)} for name, idx in groups.items()}


@dataclass
class ProbeSplits:
    """The three caption splits of the layer choice, each from its own seed, all over every colour-shape pair."""
    train: list[NounExample]
    val: list[NounExample]
    test: list[NounExample]

    @classmethod
    def make(cls, train: int = 600, val: int = 300, test: int = 300, seed: int = 0) -> "ProbeSplits":
        every_pair = ("train", "heldout")
        return cls(noun_examples(train, every_pair, seed), noun_examples(val, every_pair, seed + 1),
                   noun_examples(test, every_pair, seed + 2))


def layer_names(layers: int) -> list[int | str]:
    """Every hidden state of a ``layers``-layer model (0: the embeddings) and ``"mean"``."""
    return [*range(layers + 1), "mean"]


def all_layer_encoder(llm) -> Callable[[list[str]], torch.Tensor]:
    """``texts -> (layers + 2, B, tokens, hidden)``: an ``encoders.llm.LLMEncoder``'s features at every
    layer of ``layer_names`` from one forward pass, each read as ``model.llm.layer`` would read it
    (``read_hidden_states`` with that layer's automatic normalisation), padding zeroed as the encoder does.
    Padded to the batch's longest caption rather than to max_length: the real tokens' features are the
    same (the encoder masks padding), up to float rounding, at a fraction of the cost."""
    layers = num_hidden_layers(llm.model.config)

    @torch.no_grad()
    def encode(texts: list[str]) -> torch.Tensor:
        tokens = llm.tokenizer([llm.prefix + t for t in texts], max_length=llm.max_length, padding="longest",
                               truncation=True, return_tensors="pt").to(llm.model.device)
        states = llm.model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                           output_hidden_states=True).hidden_states
        mask = tokens["attention_mask"][..., None].to(states[0].dtype)
        return torch.stack([read_hidden_states(states, layer, normalizes(layer, "auto", llm.kind, layers)) * mask
                            for layer in layer_names(layers)]).float()
    return encode


@dataclass
class LayerChoice:
    layer: int | str                      # the chosen model.llm.layer
    validation: dict                      # layer -> own-colour accuracy on the validation split
    test: dict[str, dict]                 # probe_scores of the chosen layer on the test split


def layer_sweep(llm, splits: ProbeSplits) -> LayerChoice:
    """Scores every layer on the validation split (the probe fit on the training split), picks the most
    accurate (the earlier layer on a tie), and scores that one layer on the test split."""
    names = layer_names(num_hidden_layers(llm.model.config))
    args = (all_layer_encoder(llm), llm.tokenizer, llm.max_length, llm.prefix)
    (x_train, k_train), (x_val, k_val), (x_test, k_test) = (noun_features(split, *args)
                                                           for split in (splits.train, splits.val, splits.test))
    validation = {name: probe_scores(splits.train, (x_train[i], k_train), splits.val, (x_val[i], k_val))["all"]["own"]
                  for i, name in enumerate(names)}
    best = max(names, key=lambda name: (validation[name], -names.index(name)))
    i = names.index(best)
    return LayerChoice(best, validation, probe_scores(splits.train, (x_train[i], k_train), splits.test, (x_test[i], k_test)))


def score_row(name: str, scores: dict[str, dict], columns: Sequence[str]) -> str:
    cells = [f"{scores[k]['own']:.2f} (other {scores[k]['other']:.2f}" +
             (f", lost {scores[k]['lost']:.2f})" if scores[k]["lost"] else ")") for k in columns]
    return f"| {name} | " + " | ".join(cells) + " |"


def llm_attention_share(module, prompts: Sequence[str], timesteps: Sequence[int] = (200, 500, 800),
                        seed: int = 0) -> AttentionSplit:
    """Where the UNet's cross-attention goes for the prompts (CLIP, the connector's real tokens, LLM padding:
    lightning_modules/attention_split.py), for an ``LLM4GenModule`` or a training checkpoint's path."""
    if isinstance(module, (str, bytes)) or hasattr(module, "__fspath__"):
        module = load_checkpoint_module(module)
    return attention_split(module, prompts, timesteps, seed)


def load_encoders(base: str, llm: str, max_length: int, layer: int | str = -1):
    """(the base's CLIP text encoder, the LLMEncoder), loaded as training loads them."""
    cfg = load_config(overrides=[f"model.base.pretrained={base}", f"model.llm.pretrained={llm}",
                                 f"model.llm.max_length={max_length}", f"model.llm.layer={layer}"])
    return load_base_model(cfg.model.base).text, LLMEncoder.from_config(cfg.model.llm)

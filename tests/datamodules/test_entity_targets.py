"""Entity-loss targets are built with the batch (datamodules/entity_targets.py), from cached positions without
any tokenizer, and equal what the model built online; a step on a fully cached batch runs no tokenizer."""

from __future__ import annotations

import pickle

import pytest
import torch

from llm4gen.cli import cache
from llm4gen.configs.schema import load_config
from llm4gen.datamodules.collate import parse_entities
from llm4gen.datamodules.entity_targets import EntityTargetBuilder, TokenizerSources
from llm4gen.datamodules.synthetic import write_synthetic_shards
from llm4gen.datamodules.webdataset_datamodule import WebDatasetDataModule
from llm4gen.losses.entity import build_entity_targets_from_captions
from llm4gen.losses.entity_parser import groups_from_json
from tests.helpers.modules import PARSER, fixed_inputs, make_module, synthetic_captions

FIELDS = ["latent_moments", "llm_features", "clip_features", "entities", "entity_positions"]


def assert_same_targets(a, b):
    for name in ("token_membership", "word_mask", "is_entity", "pairs", "pair_mask"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


class Refuse:
    """A tokenizer stand-in that fails the test when anything asks it to tokenize."""

    is_fast = True

    def __init__(self, real):
        self.model_max_length = real.model_max_length

    def __call__(self, *args, **kwargs):
        raise AssertionError("a tokenizer ran")


@pytest.fixture(scope="module")
def model_cfg():
    return load_config(overrides=[f"model.objective.entity_parser={PARSER}", "model.objective.lambda_entity=0.1",
                                  "model.base.pretrained=embedded:tiny-sd"]).model


@pytest.fixture(scope="module")
def builder(model_cfg):
    return EntityTargetBuilder(TokenizerSources.from_model_config(model_cfg))


def test_the_builder_aligns_words_as_the_model_did_online(builder, model_cfg):
    captions = synthetic_captions(4)
    entities = parse_entities(PARSER, captions)
    clip, llm = builder.tokenizers
    online = build_entity_targets_from_captions(
        captions, [groups_from_json(e, c) for e, c in zip(entities, captions)], clip, llm,
        clip_max_length=clip.model_max_length, llm_max_length=model_cfg.llm.max_length, llm_prefix=builder.llm_prefix)
    targets = builder(captions, entities)
    assert targets.num_tokens == 77 + model_cfg.llm.max_length and targets.pair_mask.any()
    assert_same_targets(targets, online)


def test_cached_positions_build_the_same_targets_without_a_tokenizer(builder):
    captions = synthetic_captions(3, seed=1)
    entities = parse_entities(PARSER, captions)
    expected = builder(captions, entities)
    positions = builder.positions(captions, entities)
    blind = EntityTargetBuilder(tokenizers=tuple(Refuse(t) for t in builder.tokenizers),
                                llm_max_length=builder.llm_max_length, llm_prefix=builder.llm_prefix)
    assert_same_targets(blind(captions, entities, positions, builder.num_tokens), expected)
    with pytest.raises(AssertionError, match="a tokenizer ran"):
        blind(captions, entities)


def test_the_builder_travels_to_a_worker_without_its_tokenizers(builder):
    builder.tokenizers  # loaded here
    copy = pickle.loads(pickle.dumps(builder))
    assert copy._tokenizers is None and copy.sources == builder.sources
    captions = synthetic_captions(2)
    entities = parse_entities(PARSER, captions)
    assert_same_targets(copy(captions, entities), builder(captions, entities))


@pytest.fixture(scope="module")
def cached_shards(tmp_path_factory, model_cfg):
    root = tmp_path_factory.mktemp("entity-cache")
    write_synthetic_shards(str(root / "source"), num_samples=8, samples_per_shard=8, resolution=32, seed=3)
    assert cache.main(["--shards", str(root / "source"), "--output", str(root / "cache"), "--fields", ",".join(FIELDS),
                       "--dtype", "float32", "--device", "cpu", "--rank", "0", "--world-size", "1",
                       "model.base.pretrained=embedded:tiny-sd", f"model.objective.entity_parser={PARSER}"]) == 0
    return root


def first_batch(shards, builder, keys=()):
    dm = WebDatasetDataModule(str(shards), batch_size=4, num_workers=0, resolution=32, shuffle_buffer=1, seed=0,
                              rank=0, world_size=1, precomputed_keys=keys, entity_parser=PARSER, entity_targets=builder)
    return next(iter(dm.train_dataloader()))


def test_batches_from_the_cache_carry_the_targets_the_online_batches_carry(cached_shards, builder):
    blind = EntityTargetBuilder(tokenizers=tuple(Refuse(t) for t in builder.tokenizers),
                                llm_max_length=builder.llm_max_length, llm_prefix=builder.llm_prefix)
    cached = first_batch(cached_shards / "cache", blind, FIELDS)
    online = first_batch(cached_shards / "source", builder)
    assert cached.captions == online.captions and cached.entity_positions is None
    assert_same_targets(cached.entity_targets, online.entity_targets)


def test_a_step_on_a_fully_cached_batch_runs_no_tokenizer(cached_shards, builder, tiny_model_config, monkeypatch):
    module = make_module(tiny_model_config, **{"objective.lambda_entity": 0.1, "objective.entity_parser": PARSER})
    blind = EntityTargetBuilder(tokenizers=tuple(Refuse(t) for t in builder.tokenizers),
                                llm_max_length=builder.llm_max_length, llm_prefix=builder.llm_prefix)
    batch = first_batch(cached_shards / "cache", blind, FIELDS)
    batch = batch.for_model()
    monkeypatch.setattr(module.clip, "tokenizer", Refuse(module.clip.tokenizer))
    monkeypatch.setattr(module.llm, "tokenizer", Refuse(module.llm.tokenizer))
    noise, timesteps = fixed_inputs(module, batch)
    module.train()
    terms = module.compute_losses(batch, noise=noise, timesteps=timesteps, drop=torch.zeros(4, dtype=torch.bool))
    assert terms.entity_parts is not None and terms.entity_parts.num_pairs > 0 and torch.isfinite(terms.entity)

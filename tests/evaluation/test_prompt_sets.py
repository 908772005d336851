"""The fixed evaluation prompt sets: fixed content and seeds, the right split and object count."""

import json

import pytest

from llm4gen.datamodules.synthetic import mentions_in_clip_window
from llm4gen.evaluation import PROMPT_SETS, PromptRecord, prompt_set
from llm4gen.evaluation.prompt_sets import SET_SIZE
from llm4gen.shapes.world import HELD_OUT, caption, parse_prompt, phrasings_for


def test_six_sets_of_fixed_size_with_the_split_and_object_count_in_their_name():
    assert PROMPT_SETS == ("seen_1", "seen_2", "seen_3", "heldout_1", "heldout_2", "heldout_3")
    seeds = set()
    for name in PROMPT_SETS:
        records = prompt_set(name)
        assert len(records) == SET_SIZE >= 30
        split, count = name.split("_")
        for r in records:
            assert r.set == name and r.split == split and r.n_objects == int(count) == len(r.scene.objects)
            combos = {(o.color, o.shape) for o in r.scene.objects}
            assert bool(combos & HELD_OUT) == (split == "heldout")
            assert r.text == caption(r.scene, r.phrasing)
            seeds.add(r.seed)
        # phrasings are cycled: every one that fits the object count is used
        assert {r.phrasing for r in records} == set(phrasings_for(int(count)))
    assert len(seeds) == SET_SIZE * len(PROMPT_SETS)  # no two images share a seed


def test_sets_are_fixed_and_a_prefix_is_the_start_of_the_full_set():
    full = prompt_set("heldout_2")
    assert prompt_set("heldout_2", 5) == full[:5]
    assert [r.to_dict() for r in prompt_set("heldout_2")] == [r.to_dict() for r in full]
    # pinned: changing the world or the sampler changes the benchmark, and that must be deliberate
    first = full[0]
    assert (first.id, first.seed) == ("heldout_2-000", 50000)
    assert first.text == prompt_set("heldout_2", 1)[0].text
    assert [r.text for r in prompt_set("seen_1", 3)] == PINNED_SEEN_1


PINNED_SEEN_1 = ["a large black circle", "a small triangle colored yellow", "a circle that is small and green"]


def test_held_out_single_objects_cover_every_held_out_combination():
    combos = {(r.scene.objects[0].color, r.scene.objects[0].shape) for r in prompt_set("heldout_1")}
    assert combos == set(HELD_OUT)


def test_records_round_trip_and_their_text_parses_to_their_scene():
    for r in prompt_set("seen_3", 10):
        assert PromptRecord.from_dict(json.loads(json.dumps(r.to_dict()))) == r
        parsed = sorted(o.attributes() for o in parse_prompt(r.text).objects)
        assert parsed == sorted(o.attributes() for o in r.scene.objects)


def test_bad_names_and_sizes_are_refused():
    with pytest.raises(ValueError, match="heldout_1"):
        prompt_set("heldout")
    with pytest.raises(ValueError, match="at least 1"):
        prompt_set("seen_1", 0)


def test_command_line_renders_ground_truth_and_scores_it_perfectly(tmp_path, capsys):
    from llm4gen.cli.shapes_benchmark import main

    main(["render", str(tmp_path), "--per-set", "4", "--resolution", "48"])
    rows = [json.loads(line) for line in (tmp_path / "prompts.jsonl").read_text().splitlines()]
    assert len(rows) == 4 * len(PROMPT_SETS) and all((tmp_path / r["file"]).exists() for r in rows)
    assert main(["score", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "scores.json").read_text())
    assert set(results) == set(PROMPT_SETS)
    assert all(r["exact"] == 1.0 and r["n_images"] == 4 for r in results.values())
    assert json.loads((tmp_path / "scores.json").read_text())["heldout_3"]["binding"] == 1.0
    assert "| heldout_3 | 4 | 1.000" in capsys.readouterr().out


def test_prompt_files_hold_one_prompt_a_line_in_record_order(tmp_path):
    from llm4gen.cli.shapes_benchmark import main

    main(["prompts", str(tmp_path), "--per-set", "5", "--sets", "seen_2", "heldout_1"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["heldout_1.jsonl", "heldout_1.txt", "seen_2.jsonl", "seen_2.txt"]
    assert (tmp_path / "seen_2.txt").read_text().splitlines() == [r.text for r in prompt_set("seen_2", 5)]
    records = [PromptRecord.from_dict(json.loads(line)) for line in (tmp_path / "heldout_1.jsonl").read_text().splitlines()]
    assert records == prompt_set("heldout_1", 5)


# ---------------------------------------------------------------- the legacy sets stay as they were

# sha256 of each legacy set's full records (to_dict without the new scene_id, sorted JSON), captured
# before the verbose phrasing and the evidence sets were added
LEGACY_DIGESTS = {
    "seen_1": "9c9ba1423c81b1b371dc4c926b241aadbd263c3cc37ea8b52176a0b2387e64e5",
    "seen_2": "0e05a1a4b5930931fbf5494b5416d2d5300ac146a43483e65e63b306b0b94755",
    "seen_3": "25f1d54f7233b6c1e6b867be733a75a1dd6a1cccfa9173ad6c38ff32f4cc5d99",
    "heldout_1": "84d022ba366aec22b9cde7030b08d2f4c302711cd4874ef01fdd6226ff7d1cc6",
    "heldout_2": "0e125e6751419d11ba577999517988475a976ba894aaa06fd97f7d1421a773ba",
    "heldout_3": "c562335e27b5243dc7297a30836df4aecfa9199313093fcc884039a51a254f92",
}
LEGACY_TEXTS = {
    "seen_2": ["a large orange circle and a large yellow square",
               "a large square colored blue and a small cross colored orange",
               "a cross that is small and black next to a small orange cross"],
    "heldout_3": ["a large black circle, a large red circle and a large purple square",
                  "a small cross colored orange, a large cross colored yellow and a small cross colored black",
                  "a square that is large and purple next to a small orange square and a large white cross"],
}
LEGACY_LAST = {
    "seen_1": ("A picture with one shape on a plain gray background. In the bottom left there is a small cross, "
               "colored orange. Nothing else is in the picture.", 10047, "dense"),
    "heldout_2": ("a triangle that is large and blue next to a small orange square", 50047, "relative"),
}


def test_the_legacy_sets_are_byte_identical_to_before_the_evidence_sets():
    import hashlib

    from llm4gen.evaluation.prompt_sets import ALL_PROMPT_SETS, EVIDENCE_SETS

    assert ALL_PROMPT_SETS[:6] == PROMPT_SETS and not set(EVIDENCE_SETS) & set(PROMPT_SETS)
    for name, digest in LEGACY_DIGESTS.items():
        records = prompt_set(name)
        legacy = [{k: v for k, v in r.to_dict().items() if k != "scene_id"} for r in records]
        assert hashlib.sha256(json.dumps(legacy, sort_keys=True).encode()).hexdigest() == digest, name
        assert all(r.scene_id == f"{name}/{i}" and r.mentions is None and "mentions" not in r.to_dict()
                   for i, r in enumerate(records))
    for name, texts in LEGACY_TEXTS.items():
        assert [r.text for r in prompt_set(name, 3)] == texts
    for name, (text, seed, phrasing) in LEGACY_LAST.items():
        last = prompt_set(name)[-1]
        assert (last.text, last.seed, last.phrasing) == (text, seed, phrasing)


def test_records_written_before_scene_id_still_load():
    record = prompt_set("seen_1", 1)[0]
    old = {k: v for k, v in record.to_dict().items() if k != "scene_id"}
    assert PromptRecord.from_dict(old).scene_id == record.id


# ---------------------------------------------------------------- the evidence sets

def test_phrased_sets_hold_every_short_phrasing_of_each_scene_side_by_side():
    from llm4gen.shapes.world import PHRASINGS

    for name, n_objects in (("phrased_2", 2), ("phrased_3", 3)):
        records = prompt_set(name)
        assert len(records) == 80 == 16 * len(PHRASINGS)
        for start in range(0, 80, 5):
            group = records[start:start + 5]
            assert [r.phrasing for r in group] == list(PHRASINGS) == phrasings_for(n_objects)
            assert len({r.scene_id for r in group}) == 1 and group[0].scene_id == f"{name}/{start // 5}"
            assert all(r.scene == group[0].scene for r in group)
        assert len({r.scene_id for r in records}) == 16
        assert len({json.dumps(r.scene.to_dict()) for r in records}) == 16
        for r in records:
            assert r.set == name and r.split == "seen" and r.n_objects == n_objects == len(r.scene.objects)
            assert not {(o.color, o.shape) for o in r.scene.objects} & HELD_OUT
            assert r.text == caption(r.scene, r.phrasing) and r.mentions is None
            assert sorted(o.attributes() for o in parse_prompt(r.text).objects) == sorted(
                o.attributes() for o in r.scene.objects)


def test_verbose_sets_record_where_each_object_falls_in_clip_window():
    from transformers import CLIPTokenizer

    from llm4gen.embedded.registry import CLIP_TOKENIZER_DIR
    from llm4gen.shapes.world import VERBOSE

    tokenizer = CLIPTokenizer.from_pretrained(str(CLIP_TOKENIZER_DIR))
    for name, n_objects in (("verbose_2", 2), ("verbose_3", 3)):
        records = prompt_set(name)
        assert len(records) == 64 and len({r.scene_id for r in records}) == 64
        outside = []
        for i, r in enumerate(records):
            assert (r.phrasing, r.split, r.n_objects, r.scene_id) == (VERBOSE, "seen", n_objects, f"{name}/{i}")
            assert not {(o.color, o.shape) for o in r.scene.objects} & HELD_OUT
            assert r.text == caption(r.scene, VERBOSE)
            assert r.mentions == mentions_in_clip_window(r.text, tokenizer) and len(r.mentions) == n_objects
            assert sorted((m["color"], m["shape"], m["size"]) for m in r.mentions) == sorted(
                o.attributes() for o in r.scene.objects)
            # the recorded window positions, against the tokenizer read directly
            pieces = tokenizer.convert_ids_to_tokens(tokenizer(r.text, verbose=False)["input_ids"])
            words = [i for i, p in enumerate(pieces) if p.removesuffix("</w>") in
                     {"circle", "square", "triangle", "cross", "small", "large", *(o.color for o in r.scene.objects)}]
            assert [m["last_clip_token"] for m in r.mentions] == [max(words[k:k + 3]) for k in range(0, len(words), 3)]
            assert all(m["in_clip_window"] == (m["last_clip_token"] <= 75) for m in r.mentions)
            outside += [not m["in_clip_window"] for m in r.mentions]
        assert 0.25 <= sum(outside) / len(outside) <= 0.75   # the sets hold objects on both sides of the window
        assert PromptRecord.from_dict(json.loads(json.dumps(records[0].to_dict()))) == records[0]


def test_evidence_sets_are_fixed_with_unique_seeds_and_their_own_scenes():
    from llm4gen.evaluation.prompt_sets import ALL_PROMPT_SETS, EVIDENCE_SETS, SEED_BASE, set_size

    assert EVIDENCE_SETS == ("phrased_2", "phrased_3", "verbose_2", "verbose_3")
    assert [set_size(name) for name in EVIDENCE_SETS] == [80, 80, 64, 64]
    seeds, legacy_scenes, evidence_scenes = [], set(), set()
    for name in ALL_PROMPT_SETS:
        records = prompt_set(name)
        seeds += [r.seed for r in records]
        assert [r.id for r in records] == [f"{name}-{i:03d}" for i in range(len(records))]
        assert {r.seed // SEED_BASE for r in records} == {ALL_PROMPT_SETS.index(name) + 1}
        scenes = {json.dumps(r.scene.to_dict(), sort_keys=True) for r in records}
        (evidence_scenes if name in EVIDENCE_SETS else legacy_scenes).update(scenes)
        if name in EVIDENCE_SETS:
            again = prompt_set(name)
            assert [r.to_dict() for r in again] == [r.to_dict() for r in records]     # deterministic
            assert prompt_set(name, 7) == records[:7]                                 # a prefix
            assert PromptRecord.from_dict(json.loads(json.dumps(records[5].to_dict()))) == records[5]
    assert len(seeds) == len(set(seeds)) == 48 * 6 + 80 * 2 + 64 * 2   # no two images share a seed
    assert not legacy_scenes & evidence_scenes
    first = prompt_set("phrased_2", 1)[0]
    assert (first.id, first.seed, first.scene_id) == ("phrased_2-000", 70000, "phrased_2/0")


def test_shapes_sets_all_means_the_legacy_sets_and_an_evidence_set_can_be_named():
    from llm4gen.evaluation.prompts import shapes_sets

    assert [s.name for s in shapes_sets("all")] == list(PROMPT_SETS)
    (phrased,) = shapes_sets("phrased_2")
    assert len(phrased.prompts) == 80 and phrased.seeds == [r.seed for r in prompt_set("phrased_2")]
    both = shapes_sets("verbose_3,seen_1", limit=4)
    assert [(s.name, len(s.prompts)) for s in both] == [("verbose_3", 4), ("seen_1", 4)]
    with pytest.raises(ValueError, match="phrased_3"):
        shapes_sets("phrased_4")

"""The fixed evaluation prompt sets: fixed content and seeds, the right split and object count."""

import json

import pytest

from datamodules.shapes import HELD_OUT, caption, parse_prompt, phrasings_for
from evaluation import PROMPT_SETS, PromptRecord, prompt_set
from evaluation.prompt_sets import SET_SIZE


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
    from evaluation.__main__ import main

    main(["render", str(tmp_path), "--per-set", "4", "--resolution", "48"])
    rows = [json.loads(line) for line in (tmp_path / "prompts.jsonl").read_text().splitlines()]
    assert len(rows) == 4 * len(PROMPT_SETS) and all((tmp_path / r["file"]).exists() for r in rows)
    results = main(["score", str(tmp_path)])
    assert set(results) == set(PROMPT_SETS)
    assert all(r["exact"] == 1.0 and r["n_images"] == 4 for r in results.values())
    assert json.loads((tmp_path / "scores.json").read_text())["heldout_3"]["binding"] == 1.0
    assert "| heldout_3 | 4 | 1.000" in capsys.readouterr().out

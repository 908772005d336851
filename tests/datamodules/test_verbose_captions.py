"""The verbose phrasing: long, truthful, varied, deterministic, read back exactly, and long enough that
CLIP's 77-token window cuts off about half of the objects of 2- and 3-object scenes."""

import hashlib
import json
import os
import random
import re
import subprocess
import sys
from collections import Counter

import pytest

from llm4gen.datamodules.synthetic import mentions_in_clip_window
from llm4gen.shapes import world as shapes
from llm4gen.shapes.world import (
    CELL_NAMES,
    CLIP_LAST_CONTENT_POSITION,
    COLOR_WORDS,
    PHRASINGS,
    SHAPE_WORDS,
    SIZE_WORDS,
    VERBOSE,
    Scene,
    ShapeObject,
    caption,
    entity_groups,
    object_mentions,
    parse_prompt,
    phrasings_for,
    random_scene,
    render_scene,
    sample_scene,
)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import CLIPTokenizer

    from llm4gen.embedded.registry import CLIP_TOKENIZER_DIR

    return CLIPTokenizer.from_pretrained(str(CLIP_TOKENIZER_DIR))


def scenes(seed, count, n_objects=None, splits=("train", "seen", "heldout")):
    rng = random.Random(seed)
    return [sample_scene(rng, splits[i % len(splits)], n_objects or 1 + (i // len(splits)) % 3) for i in range(count)]


THREE = Scene((ShapeObject("red", "circle", "small", 0, 0.5, (0.1, 0.2)),
               ShapeObject("blue", "square", "large", 3, 0.9, (0.3, 0.4)),
               ShapeObject("orange", "cross", "large", 1, 0.95, (0.5, 0.6))))
# pinned: a verbose caption is a pure function of its scene, in every process and on every machine
PINNED_THREE = (
    "In this image we can see three geometric shapes arranged on a plain gray background. The style is flat "
    "and graphic, with no gradients, textures or shading of any kind. The view is straight on, like looking "
    "at a flat sheet of paper from directly above. A small circle colored red occupies the top left part of "
    "the picture. The lighting is perfectly even, so there are no highlights, reflections or shadows. The "
    "composition is simple and uncluttered, with no decoration of any kind. The bottom right area holds a "
    "square, colored blue, which is large. Each shape sits fully inside its own quadrant, apart from the "
    "others. No frame or border surrounds the picture, and nothing is cut off at its edges. A cross that is "
    "large and orange sits in the top right part of the picture.")


# ---------------------------------------------------------------- kept apart from the short phrasings

def test_verbose_is_a_phrasing_that_the_defaults_leave_out():
    assert list(PHRASINGS) == ["list", "colored", "relative", "beside", "dense"]
    assert phrasings_for(1) == ["list", "colored", "relative", "dense"]
    assert phrasings_for(3) == ["list", "colored", "relative", "beside", "dense"]
    assert phrasings_for(1, include_verbose=True) == ["list", "colored", "relative", "dense", VERBOSE]
    assert phrasings_for(2, include_verbose=True)[-1] == VERBOSE
    assert caption(Scene(THREE.objects[:1]), VERBOSE).count(".") >= 3
    with pytest.raises(ValueError, match="no rng"):
        caption(THREE, "list", rng=random.Random(0))
    with pytest.raises(ValueError, match="cell"):
        caption(Scene((ShapeObject("red", "circle", "small"),)), VERBOSE)


def test_default_training_samples_are_unchanged_by_the_verbose_phrasing():
    """``random_scene`` with the default (and an explicit 0) share draws what it drew before verbose
    captions existed: pinned on records captured before the change."""
    for share in ({}, {"verbose_share": 0.0}):
        rng = random.Random(0)
        samples = [random_scene(rng, 32, **share) for _ in range(200)]
        digest = hashlib.sha256(json.dumps(samples, sort_keys=True).encode()).hexdigest()
        assert digest == "161937a972c535ed97427fb2598a4cf5719fbc70f45db82c76ae6fc2a9e47663"
        assert samples[1]["caption"] == "a small square colored white and a small cross colored orange"
        assert all("mentions" not in s and s["phrasing"] != VERBOSE for s in samples)


def test_a_verbose_share_changes_captions_only_and_records_the_mentions(tokenizer):
    short = [random_scene(random.Random(f"t/{i}"), 32) for i in range(200)]
    mixed = [random_scene(random.Random(f"t/{i}"), 32, verbose_share=0.5) for i in range(200)]
    verbose = [m for m in mixed if m["phrasing"] == VERBOSE]
    assert 70 <= len(verbose) <= 130
    for s, m in zip(short, mixed):
        assert s["objects"] == m["objects"]           # the same scene, drawn the same way
        if m["phrasing"] != VERBOSE:
            assert m == s
        else:
            assert m["caption"] == caption(Scene.from_dict(m), VERBOSE)
            assert m["mentions"] == object_mentions(m["caption"])  # spans; synthetic.py adds CLIP positions
    everything = [random_scene(random.Random(f"t/{i}"), 32, verbose_share=1.0) for i in range(20)]
    assert all(r["phrasing"] == VERBOSE and "last_clip_token" not in r["mentions"][0] for r in everything)
    with pytest.raises(ValueError, match="verbose_share"):
        random_scene(random.Random(0), 32, verbose_share=1.5)


# ---------------------------------------------------------------- deterministic

def test_a_verbose_caption_is_a_pure_function_of_the_scene():
    assert caption(THREE, VERBOSE) == PINNED_THREE
    again = Scene.from_dict(json.loads(json.dumps(THREE.to_dict())))
    assert caption(again, VERBOSE) == PINNED_THREE
    # another object order is another scene (and another caption is allowed), an rng gives others
    assert caption(THREE, VERBOSE, rng=random.Random(1)) != PINNED_THREE
    assert caption(THREE, VERBOSE, rng=random.Random(1)) == caption(THREE, VERBOSE, rng=random.Random(1))
    # no salted hash: another interpreter with another hash seed writes the same caption
    code = ("import json; from llm4gen.shapes.world import Scene, caption; "
            f"print(caption(Scene.from_dict(json.loads({json.dumps(json.dumps(THREE.to_dict()))})), 'verbose'))")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert out.stdout.strip() == PINNED_THREE


# ---------------------------------------------------------------- truthful and varied

WORD = re.compile(r"[a-z]+|[,.;]")


def attribute_like(word):
    return (word in COLOR_WORDS or word in SIZE_WORDS or word in SHAPE_WORDS or word.rstrip("s") in SHAPE_WORDS
            or (word.endswith("es") and word[:-2] in SHAPE_WORDS))


@pytest.mark.parametrize("text", [*shapes._VERBOSE_OPENERS, *(t for t, _ in shapes._VERBOSE_FILLERS)])
def test_filler_never_names_a_colour_shape_or_size(text):
    for count in shapes._VERBOSE_COUNTS.values():
        sentence = text.format(count=count).lower()
        background = "on a plain gray background"
        assert "background" not in sentence.replace(background, "")  # only the form the parser reads
        words = WORD.findall(sentence.replace(background, ""))
        assert not [w for w in words if attribute_like(w)], sentence
        assert "gray" not in words


def test_verbose_captions_are_varied_and_describe_objects_in_random_order():
    openers, fillers, skeletons, places, reordered = Counter(), Counter(), Counter(), Counter(), 0
    forms = Counter()
    filler_texts = [t for t, _ in shapes._VERBOSE_FILLERS]
    for scene in scenes(10, 400):
        text = caption(scene, VERBOSE)
        sentences = re.findall(r"[^.]+\.", text)
        sentences = [s.strip() for s in sentences]
        openers[next(i for i, o in enumerate(shapes._VERBOSE_OPENERS)
                     if re.fullmatch(re.escape(o).replace(r"\{count\}", ".+"), sentences[0]))] += 1
        kinds = []
        for s in sentences[1:]:
            if s in filler_texts:
                fillers[s] += 1
                kinds.append("f")
            else:
                kinds.append("o")
                skeleton = s
                for word in [*COLOR_WORDS, *SIZE_WORDS, *SHAPE_WORDS]:
                    skeleton = re.sub(rf"\b{word}\b", "X", skeleton)
                skeleton = re.sub(r"\b(top|upper|bottom|lower) (left|right) (corner|quadrant|area|part of the picture)",
                                  "W", skeleton)
                skeletons[re.sub(r"\ban? X", "a X", skeleton)] += 1
                shape_at = min(s.index(w) for w in SHAPE_WORDS if re.search(rf"\b{w}\b", s))
                color_at = min(s.index(w) for w in COLOR_WORDS if re.search(rf"\b{w}\b", s))
                forms["pre" if color_at < shape_at else "post"] += 1
        assert kinds.count("o") == len(scene.objects)
        joined = "".join(kinds)
        places["before"] += joined.startswith("f")
        places["after"] += joined.endswith("f")
        places["between"] += "of" in joined.strip("f")
        described = [(m["color"], m["shape"], m["size"]) for m in object_mentions(text)]
        reordered += described != [o.attributes() for o in scene.objects]
    assert len(openers) >= 6 and len(fillers) >= 10 and len(skeletons) >= 5
    assert forms["pre"] > 50 and forms["post"] > 50          # both pre- and post-nominal colours
    assert places["before"] == 400 and places["between"] > 200 and places["after"] > 100
    assert reordered > 150                                    # text order is not scene order


def test_every_object_sentence_names_its_own_cell_and_nothing_false():
    for scene in scenes(11, 300):
        text = caption(scene, VERBOSE)
        by_color = {o.color: o for o in scene.objects}     # colours are distinct within a scene
        for mention in object_mentions(text):
            start = text.rfind(".", 0, mention["entity"]["start"]) + 1
            sentence = text[start:text.index(".", mention["entity"]["end"]) + 1]
            truth = by_color[mention["color"]]
            assert (mention["shape"], mention["size"]) == (truth.shape, truth.size)
            named = [i for i, name in enumerate(CELL_NAMES)
                     if name in sentence or name.replace("top", "upper").replace("bottom", "lower") in sentence]
            assert named == [truth.cell], sentence
        if len(scene.objects) == 1:
            assert "shapes" not in text.replace("geometric shapes", "") and "one another" not in text
        else:
            assert "single geometric shape" not in text and "this one shape" not in text


# ---------------------------------------------------------------- read back exactly

def test_parse_prompt_and_entity_groups_read_every_verbose_caption_exactly():
    from llm4gen.losses.entity_parser import groups_from_json

    checked = Counter()
    for scene in scenes(12, 600):
        text = caption(scene, VERBOSE)
        parsed = parse_prompt(text)
        assert sorted(o.attributes() for o in parsed.objects) == sorted(o.attributes() for o in scene.objects)
        assert parsed.background == "gray"
        groups = entity_groups(text)
        groups_from_json(groups, text)
        for group, obj in zip(groups, parsed.objects):
            assert text[group["entity"]["start"]:group["entity"]["end"]] == group["entity"]["text"] == obj.shape
            words = sorted(text[a["start"]:a["end"]] for a in group["attributes"])
            assert words == sorted([obj.color, obj.size])
        checked[(len(scene.objects), "heldout" if any(shapes.is_held_out(o.color, o.shape) for o in scene.objects)
                 else "seen")] += 1
    assert sum(checked.values()) == 600 and all(checked[(n, "heldout")] > 20 for n in (1, 2, 3))


def test_the_analyzer_scores_the_ground_truth_of_verbose_captions_as_bound():
    from llm4gen.evaluation.shapes import score

    results = [score(render_scene(scene, 32), caption(scene, VERBOSE)).binding for scene in scenes(13, 210)]
    assert sum(r == 1 for r in results) / len(results) >= 0.99


# ---------------------------------------------------------------- CLIP's window

def clip_positions_independently(text, tokenizer):
    """Positions (BOS = 0) of the caption's colour / shape / size tokens, found by re-tokenizing and
    reading the token strings, without offsets: every such word is one CLIP token, and the filler has
    none, so the i-th such token is the i-th such word of the caption."""
    ids = tokenizer(text, verbose=False)["input_ids"]
    pieces = tokenizer.convert_ids_to_tokens(ids)
    vocabulary = {*COLOR_WORDS, *SIZE_WORDS, *SHAPE_WORDS}
    return ids, [i for i, piece in enumerate(pieces) if piece.removesuffix("</w>") in vocabulary]


def check_mentions(text, mentions, tokenizer):
    ids, found = clip_positions_independently(text, tokenizer)
    words = sorted((w for m in mentions for w in (m["entity"], *m["attributes"])), key=lambda w: w["start"])
    assert len(found) == len(words) == 3 * len(mentions)
    position = {(w["start"], w["end"]): p for w, p in zip(words, found)}
    for w, p in zip(words, found):
        assert tokenizer.convert_ids_to_tokens([ids[p]])[0] == w["text"] + "</w>"
    truncated = tokenizer(text, max_length=77, truncation=True, padding="max_length")["input_ids"]
    assert truncated[0] == tokenizer.bos_token_id
    for m in mentions:
        last = max(position[(w["start"], w["end"])] for w in (m["entity"], *m["attributes"]))
        assert m["last_clip_token"] == last
        assert m["in_clip_window"] == (last <= CLIP_LAST_CONTENT_POSITION)
        if m["in_clip_window"]:     # CLIP's encoder gets every token of the object
            assert truncated[last] == ids[last]
    return mentions


def test_object_mentions_give_each_objects_last_clip_token(tokenizer):
    mentions = check_mentions(PINNED_THREE, mentions_in_clip_window(PINNED_THREE, tokenizer), tokenizer)
    assert [(m["color"], m["shape"], m["in_clip_window"]) for m in mentions] == [
        ("red", "circle", True), ("blue", "square", False), ("orange", "cross", False)]
    assert [m["last_clip_token"] for m in mentions] == [59, 115, 155]
    assert object_mentions(PINNED_THREE)[0].keys() == {"color", "shape", "size", "entity", "attributes"}
    short = "a circle that is small and red next to a large blue square"
    assert [m["last_clip_token"] for m in mentions_in_clip_window(short, tokenizer)] == [7, 13]
    for scene in scenes(14, 60):
        text = caption(scene, VERBOSE)
        check_mentions(text, mentions_in_clip_window(text, tokenizer), tokenizer)


def window_statistics(tokenizer, n_objects, count=300, seed=15):
    lengths, outside, first_inside = [], [], []
    for scene in scenes(seed, count, n_objects):
        text = caption(scene, VERBOSE)
        lengths.append(len(tokenizer(text, verbose=False)["input_ids"]))
        mentions = mentions_in_clip_window(text, tokenizer)
        outside += [not m["in_clip_window"] for m in mentions]
        first_inside.append(mentions[0]["in_clip_window"])
    return lengths, outside, first_inside


def test_clip_cuts_off_about_half_of_the_objects_of_two_and_three_object_scenes(tokenizer):
    pooled = []
    for n in (2, 3):
        lengths, outside, first_inside = window_statistics(tokenizer, n)
        pooled += outside
        assert max(lengths) < 200 and min(lengths) > 60
        assert sum(first_inside) / len(first_inside) >= 0.9      # the first object described: CLIP sees it
        assert 0.3 <= sum(outside) / len(outside) <= 0.7
    assert 0.4 <= sum(pooled) / len(pooled) <= 0.6
    lengths, outside, _ = window_statistics(tokenizer, 1)
    assert sum(outside) / len(outside) <= 0.1 and max(lengths) < 120

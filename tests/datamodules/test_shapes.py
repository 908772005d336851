"""The shapes world: held-out split, geometry, captions in every phrasing, and the caption parser."""

import random

import numpy as np
import pytest

from llm4gen.shapes.world import (
    BACKGROUND_RGB,
    CELL_NAMES,
    COLORS,
    HELD_OUT,
    PHRASINGS,
    SEEN,
    SHAPES,
    SIZES,
    Scene,
    ShapeObject,
    caption,
    entity_groups,
    free_space,
    object_bbox,
    parse_prompt,
    phrasings_for,
    random_scene,
    render_scene,
    sample_scene,
    size_threshold,
)


def test_the_world_has_8_colours_4_shapes_2_sizes_and_a_balanced_held_out_split():
    assert len(COLORS) == 8 and set(SHAPES) == {"circle", "square", "triangle", "cross"} and SIZES == ("small", "large")
    assert len(HELD_OUT) == 8 and len(SEEN) == 24 and not HELD_OUT & set(SEEN)
    assert sorted(c for c, _ in HELD_OUT) == sorted(COLORS)            # one held-out shape per colour
    assert all(sum(s == shape for _, s in HELD_OUT) == 2 for shape in SHAPES)
    # every colour and every shape is still seen in training with other partners
    assert {c for c, _ in SEEN} == set(COLORS) and {s for _, s in SEEN} == set(SHAPES)
    assert BACKGROUND_RGB not in COLORS.values()


def test_training_scenes_never_hold_a_held_out_combination_and_held_out_scenes_always_do():
    rng = random.Random(0)
    for _ in range(2000):
        train = sample_scene(rng, "train")
        assert not any((o.color, o.shape) in HELD_OUT for o in train.objects)
        heldout = sample_scene(rng, "heldout")
        assert any((o.color, o.shape) in HELD_OUT for o in heldout.objects)
    samples = [random_scene(rng, 32) for _ in range(500)]
    assert not any((o["color"], o["shape"]) in HELD_OUT for s in samples for o in s["objects"])
    assert {s["phrasing"] for s in samples} == set(PHRASINGS)
    assert {len(s["objects"]) for s in samples} == {1, 2, 3}


def test_scenes_have_distinct_colours_and_cells_and_sizes_in_their_ranges():
    rng = random.Random(1)
    for _ in range(300):
        scene = sample_scene(rng, rng.choice(["train", "heldout"]))
        colors, cells = [o.color for o in scene.objects], [o.cell for o in scene.objects]
        assert len(set(colors)) == len(colors) and len(set(cells)) == len(cells)
        for resolution in (32, 64):
            for o in scene.objects:
                left, top, right, bottom = object_bbox(o, resolution)
                side = right - left
                assert bottom - top == side and 0 <= left and right <= resolution and 0 <= top and bottom <= resolution
                assert (side >= size_threshold(resolution)) == (o.size == "large")
                # inside its own cell, off the cell border: objects never touch
                row, col = divmod(o.cell, 2)
                half = resolution // 2
                assert col * half < left and right < (col + 1) * half and row * half < top and bottom < (row + 1) * half
    with pytest.raises(ValueError, match="split"):
        sample_scene(rng, "test")
    with pytest.raises(ValueError, match="n_objects"):
        sample_scene(rng, "train", 4)


def test_render_draws_each_object_in_its_box_on_gray():
    scene = Scene((ShapeObject("red", "square", "large", 0, 1.0, (0.0, 0.0)),
                   ShapeObject("blue", "circle", "small", 3, 0.5, (1.0, 1.0))))
    image = np.asarray(render_scene(scene, 32))
    left, top, right, bottom = object_bbox(scene.objects[0], 32)
    assert (left, top, right - left) == (1, 1, free_space(32))
    assert (image[top:bottom, left:right] == COLORS["red"]).all()
    l2, t2, r2, b2 = object_bbox(scene.objects[1], 32)
    assert tuple(image[(t2 + b2) // 2, (l2 + r2) // 2]) == COLORS["blue"]
    assert tuple(image[0, 0]) == BACKGROUND_RGB and tuple(image[16, 16]) == BACKGROUND_RGB
    with pytest.raises(ValueError, match="no position"):
        render_scene(Scene((ShapeObject("red", "circle", "small"),)), 32)


TWO = Scene((ShapeObject("red", "circle", "small", 0, 0.5, (0, 0)), ShapeObject("blue", "square", "large", 3, 0.9, (0, 0))))


def test_captions_in_every_phrasing():
    assert caption(TWO, "list") == "a small red circle and a large blue square"
    assert caption(TWO, "colored") == "a small circle colored red and a large square colored blue"
    assert caption(TWO, "relative") == "a circle that is small and red next to a large blue square"
    assert caption(TWO, "beside") == "a large blue square beside a small red circle"
    assert caption(TWO, "dense") == (
        "A picture with two shapes on a plain gray background. In the top left there is a small circle, "
        "colored red. In the bottom right there is a large square, colored blue. The shapes do not touch each other.")
    one = Scene(TWO.objects[:1])
    assert caption(one, "relative") == "a circle that is small and red"
    assert "beside" not in phrasings_for(1) and set(phrasings_for(2)) == set(PHRASINGS)
    with pytest.raises(ValueError, match="at least 2"):
        caption(one, "beside")
    with pytest.raises(ValueError, match="unknown phrasing"):
        caption(TWO, "poem")


def test_every_phrasing_parses_back_to_the_scene_objects():
    rng = random.Random(2)
    for _ in range(300):
        scene = sample_scene(rng, rng.choice(["train", "heldout"]))
        for phrasing in phrasings_for(len(scene.objects)):
            parsed = parse_prompt(caption(scene, phrasing))
            wanted = [o.attributes() for o in scene.objects]
            if phrasing == "beside":
                wanted = wanted[::-1]
            assert [o.attributes() for o in parsed.objects] == wanted, caption(scene, phrasing)


def test_dense_captions_fit_clip_context():
    """The longest dense caption stays within CLIP's 77 tokens, so CLIP sees every object."""
    from transformers import CLIPTokenizer

    from llm4gen.embedded.registry import CLIP_TOKENIZER_DIR

    tokenizer = CLIPTokenizer.from_pretrained(str(CLIP_TOKENIZER_DIR))
    longest = Scene(tuple(ShapeObject("yellow", "triangle", "small", i, 0.5, (0, 0)) for i in (0, 1, 3)))
    text = caption(longest, "dense")
    assert len(text.split()) >= 45
    assert len(tokenizer(text).input_ids) <= 77


@pytest.mark.parametrize("text, objects, background", [
    ("a red circle and a blue square", [("red", "circle", None), ("blue", "square", None)], "gray"),
    ("a green triangle on a yellow background", [("green", "triangle", None)], "yellow"),
    ("a red circle and blue square", [("red", "circle", None), ("blue", "square", None)], "gray"),
    ("a red circle and small blue square", [("red", "circle", None), ("blue", "square", "small")], "gray"),
    ("A big purple cross, a little white plus", [("purple", "cross", "large"), ("white", "cross", "small")], "gray"),
    ("a square which is black next to a circle", [("black", "square", None), (None, "circle", None)], "gray"),
])
def test_parse_plain_prompts(text, objects, background):
    scene = parse_prompt(text)
    assert [o.attributes() for o in scene.objects] == objects and scene.background == background


@pytest.mark.parametrize("text, message", [
    ("a red dog", "belong to no shape"),
    ("a sunny day", "no shape"),
    ("two red circles", "plural"),
    ("a red blue circle", "two colors"),
])
def test_parse_refuses_what_it_cannot_read(text, message):
    with pytest.raises(ValueError, match=message):
        parse_prompt(text)


def test_scene_round_trips_through_json():
    import json

    scene = sample_scene(random.Random(3), "heldout", 3)
    assert Scene.from_dict(json.loads(json.dumps(scene.to_dict()))) == scene
    assert len(CELL_NAMES) == 4


def test_entity_groups_bind_each_shape_to_its_own_colour_and_size_with_exact_spans():
    from llm4gen.losses.entity_parser import groups_from_json

    text = caption(TWO, "relative")  # "a circle that is small and red next to a large blue square"
    groups = entity_groups(text)
    assert [(g["entity"]["text"], [a["text"] for a in g["attributes"]]) for g in groups] == [
        ("circle", ["small", "red"]), ("square", ["large", "blue"])]
    groups_from_json(groups, text)  # every span points at its word in the caption
    dense = caption(TWO, "dense")
    assert [(g["entity"]["text"], [a["text"] for a in g["attributes"]]) for g in entity_groups(dense)] == [
        ("circle", ["small", "red"]), ("square", ["large", "blue"])]
    groups_from_json(entity_groups(dense), dense)
    rng = random.Random(6)
    for _ in range(100):
        scene = sample_scene(rng, "train")
        for phrasing in phrasings_for(len(scene.objects)):
            text = caption(scene, phrasing)
            groups = entity_groups(text)
            groups_from_json(groups, text)
            assert len(groups) == len(scene.objects) and all(len(g["attributes"]) == 2 for g in groups)

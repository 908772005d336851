"""The exact analyzer: ground truth scores ~100%, swapped colours bind nothing, missing and extra
objects are counted, and renders softened the way a small diffusion model draws still score."""

import dataclasses
import random

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from llm4gen.evaluation import aggregate, analyze, parse_prompt, prompt_set, score
from llm4gen.evaluation.shapes import (
    UNASSIGNED,
    ImageScore,
    fill_holes,
    max_matching,
    maximum_assignment,
    palette_labels,
    remove_color_cast,
)
from llm4gen.shapes.world import (
    COLORS,
    SHAPES,
    Scene,
    ShapeObject,
    draw_shape,
    object_bbox,
    render_scene,
    sample_scene,
)


def scenes(n, seed, split=None):
    rng = random.Random(seed)
    return [sample_scene(rng, split or rng.choice(["train", "heldout"])) for _ in range(n)]


def attributes(objects):
    return sorted(o.attributes() for o in objects)


@pytest.mark.parametrize("resolution, n", [(32, 400), (64, 150)])
def test_ground_truth_renders_score_at_least_99_percent(resolution, n):
    results = [score(render_scene(s, resolution), s) for s in scenes(n, seed=resolution)]
    summary = aggregate(results)
    print(f"{resolution}px, {n} scenes: {summary}")
    assert summary["binding"] >= 0.99 and summary["exact"] >= 0.99
    assert summary["missing"] == 0 and summary["extra"] == 0


def test_detected_objects_carry_colour_shape_size_and_box():
    scene = Scene((ShapeObject("red", "triangle", "large", 0, 0.9, (0.5, 0.5)),
                   ShapeObject("blue", "cross", "small", 3, 0.45, (0.0, 1.0))))
    (triangle, cross) = analyze(render_scene(scene, 64))
    assert triangle.attributes() == ("red", "triangle", "large") and triangle.shape_iou == 1.0
    assert cross.attributes() == ("blue", "cross", "small")
    assert triangle.bbox == object_bbox(scene.objects[0], 64) and cross.bbox == object_bbox(scene.objects[1], 64)


def test_every_shape_in_every_colour_and_size_is_read_back():
    for i, (color, shape, size) in enumerate((c, s, z) for c in COLORS for s in SHAPES for z in ("small", "large")):
        obj = ShapeObject(color, shape, size, i % 4, 0.4 if size == "small" else 1.0, (0.5, 0.5))
        for resolution in (32, 48, 64):
            (found,) = analyze(render_scene(Scene((obj,)), resolution))
            assert found.attributes() == (color, shape, size), (resolution, obj, found)


def swap_colors(scene: Scene) -> Scene:
    """Every object takes the next object's colour (a derangement: no object keeps its own)."""
    colors = [o.color for o in scene.objects]
    return Scene(tuple(dataclasses.replace(o, color=colors[(i + 1) % len(colors)])
                       for i, o in enumerate(scene.objects)))


@pytest.mark.parametrize("n_objects", [2, 3])
def test_swapped_colours_get_binding_zero(n_objects):
    rng = random.Random(n_objects)
    for _ in range(40):
        scene = sample_scene(rng, "train", n_objects)
        # distinct shapes, or a swap could hand an object a colour its twin of the same shape had
        if len({o.shape for o in scene.objects}) < n_objects:
            continue
        result = score(render_scene(swap_colors(scene), 32), scene)
        assert result.binding == 0 and result.all_bound == 0 and result.color == 0 and result.any_correct == 0
        assert result.shape == 1 and result.size == 1 and result.missing == result.extra == 0
        # every object's colour leaked from another; a 2-object derangement swaps its pair, a 3-cycle none
        assert result.categories == ["leaked_color"] * n_objects
        assert (result.swapped_pairs, result.drawn_pairs) == ((1, 1) if n_objects == 2 else (0, 3))


def test_swapping_one_pair_of_three_leaves_one_third():
    scene = Scene((ShapeObject("red", "circle", "small", 0, 0.5, (0, 0)),
                   ShapeObject("blue", "square", "large", 1, 0.9, (0, 0)),
                   ShapeObject("green", "cross", "large", 2, 0.9, (0, 0))))
    swapped = Scene((dataclasses.replace(scene.objects[0], color="blue"),
                     dataclasses.replace(scene.objects[1], color="red"), scene.objects[2]))
    result = score(render_scene(swapped, 32), scene)
    assert result.binding == pytest.approx(1 / 3) and result.color == pytest.approx(1 / 3)
    assert result.all_bound == 0 and result.exact == 0 and result.any_correct == 1
    assert result.categories == ["leaked_color", "leaked_color", "bound"]
    assert (result.swapped_pairs, result.drawn_pairs) == (1, 3)


def test_any_correct_needs_one_object_in_its_colour_and_shape_whatever_its_size():
    asked = Scene((ShapeObject("red", "circle", "small", 0, 0.5, (0.5, 0.5)),
                   ShapeObject("blue", "square", "large", 1, 0.9, (0.5, 0.5))))
    wrong_size = Scene((dataclasses.replace(asked.objects[0], size="large", scale=0.9),))
    assert score(render_scene(wrong_size, 32), asked).any_correct == 1
    assert score(render_scene(wrong_size, 32), asked).binding == 0
    wrong_shape = Scene((dataclasses.replace(asked.objects[0], shape="triangle"),))
    assert score(render_scene(wrong_shape, 32), asked).any_correct == 0
    assert score(render_scene(Scene(()), 32), asked).any_correct == 0


def test_missing_and_extra_objects_are_counted_exactly():
    rng = random.Random(7)
    for _ in range(30):
        full = sample_scene(rng, "train", 3)
        for keep in (1, 2, 3):
            drawn = Scene(full.objects[:keep])
            image = render_scene(drawn, 32)
            asked_all = score(image, full)
            assert (asked_all.n_detected, asked_all.missing, asked_all.extra) == (keep, 3 - keep, 0)
            assert asked_all.binding == pytest.approx(keep / 3)
            asked_one = score(image, Scene(full.objects[:1]))
            assert (asked_one.missing, asked_one.extra) == (0, keep - 1)
            assert asked_one.binding == 1 and asked_one.exact == float(keep == 1)


def test_a_wrong_size_or_shape_breaks_binding_only_in_its_category():
    obj = ShapeObject("purple", "square", "large", 0, 0.9, (0.5, 0.5))
    small = score(render_scene(Scene((dataclasses.replace(obj, size="small", scale=0.45),)), 32), Scene((obj,)))
    assert (small.shape, small.color, small.size, small.binding) == (1, 1, 0, 0)
    triangle = score(render_scene(Scene((dataclasses.replace(obj, shape="triangle"),)), 32), Scene((obj,)))
    assert (triangle.shape, triangle.color, triangle.size, triangle.binding) == (0, 0, 0, 0)
    assert triangle.missing == triangle.extra == 0


def test_scoring_from_prompt_text_equals_scoring_from_the_scene():
    for record in prompt_set("heldout_3", 12) + prompt_set("seen_2", 12):
        image = render_scene(record.scene, 32)
        from_text, from_scene = score(image, record.text), score(image, record.scene)
        assert from_text.binding == from_scene.binding == 1
        assert from_text.to_dict() == from_scene.to_dict()


def test_unstated_attributes_match_anything():
    image = render_scene(Scene((ShapeObject("red", "circle", "small", 0, 0.5, (0, 0)),
                                ShapeObject("blue", "square", "large", 3, 0.9, (0, 0)))), 32)
    assert score(image, "a red circle and a blue square").exact == 1
    assert score(image, "a circle and a square").exact == 1
    assert score(image, "a blue circle and a red square").binding == 0


def test_empty_and_noise_images_have_no_objects():
    assert analyze(Image.new("RGB", (32, 32), (128, 128, 128))) == []
    result = score(Image.new("RGB", (32, 32), (128, 128, 128)), "a red circle")
    assert (result.n_detected, result.missing, result.binding) == (0, 1, 0)
    # isolated stray pixels of object colours are too small to be objects
    image = Image.new("RGB", (32, 32), (128, 128, 128))
    for i, color in enumerate(COLORS.values()):
        image.putpixel((3 * i + 1, 3 * i + 2), color)
    assert analyze(image) == []


def test_touching_objects_of_one_colour_merge_and_distinct_colours_stay_apart():
    """An analyzer reading connected components cannot split two touching red squares; two touching
    squares of different colours are two objects."""
    image = Image.new("RGB", (32, 32), (128, 128, 128))
    draw = ImageDraw.Draw(image)
    draw_shape(draw, "square", (2, 2, 14, 14), COLORS["red"])
    draw_shape(draw, "square", (14, 2, 26, 14), COLORS["blue"])
    assert [d.color for d in analyze(image)] == ["red", "blue"]
    draw_shape(draw, "square", (14, 2, 26, 14), COLORS["red"])
    assert len(analyze(image)) == 1


def soften(image: Image.Image, blur: float, noise: float, drift: float, rng: np.random.Generator) -> np.ndarray:
    """What a small diffusion model does to a render: soft edges, pixel noise, a colour cast."""
    array = np.asarray(image.filter(ImageFilter.GaussianBlur(blur)), dtype=np.float32)
    array = array + rng.normal(0, noise, array.shape) + rng.uniform(-drift, drift, 3)
    return np.clip(array, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("resolution, blur, noise, drift, floor", [
    (32, 0.5, 8, 20, 0.97),   # a 32 px image: half-pixel blur (objects are 6-14 px)
    (32, 0.8, 8, 20, 0.93),   # softer: small crosses and triangles start to look round
    (64, 1.0, 8, 20, 0.97),   # the same relative softness at 64 px
    (64, 0.5, 16, 30, 0.95),  # heavier noise and colour cast
])
def test_softened_renders_still_score(resolution, blur, noise, drift, floor):
    rng = np.random.default_rng(0)
    results = [score(soften(render_scene(s, resolution), blur, noise, drift, rng), s)
               for s in scenes(120, seed=3, split="train")]
    summary = aggregate(results)
    print(f"{resolution}px blur {blur} noise {noise} drift {drift}: {summary}")
    assert summary["binding"] >= floor and summary["exact"] >= floor - 0.05


def test_colour_drift_within_the_threshold_keeps_the_colour_and_beyond_it_drops_the_pixels():
    rgb = np.array([[[220 + 25, 30 + 25, 30 - 25], [200, 100, 100], [128, 128, 128]]], dtype=np.float32)
    labels = palette_labels(rgb)
    assert labels[0, 0] == list(COLORS).index("red")
    assert labels[0, 1] == UNASSIGNED
    assert labels[0, 2] == len(COLORS)  # the background


def test_aggregate_means_over_images_overall_and_per_object_count():
    def s(n, binding, extra=0):
        return ImageScore(n, n + extra, 0, extra, float(extra == 0), 1.0, binding, 1.0, binding,
                          float(binding == 1), float(binding == 1 and extra == 0), float(binding > 0))
    summary = aggregate([s(1, 1.0), s(1, 0.0), s(2, 0.5, extra=1), s(2, 1.0)])
    assert summary["n_images"] == 4
    assert summary["binding"] == pytest.approx(0.625) and summary["all_bound"] == pytest.approx(0.5)
    assert summary["extra"] == pytest.approx(0.25) and summary["exact"] == pytest.approx(0.5)
    assert summary["any_correct"] == pytest.approx(0.75)
    assert summary["by_n_objects"][1]["binding"] == pytest.approx(0.5)
    assert summary["by_n_objects"][2]["binding"] == pytest.approx(0.75)
    assert summary["by_n_objects"][2]["n_images"] == 2
    with pytest.raises(ValueError, match="at least one"):
        aggregate([])


def test_max_matching_is_one_to_one():
    wanted = [("red", "circle"), ("red", "circle")]
    assert max_matching(wanted, [("red", "circle")]) == 1
    assert max_matching(wanted, [("red", "circle"), ("red", "circle"), ("blue", "circle")]) == 2
    # an augmenting path is needed: the greedy choice for the first would block the second
    assert max_matching([(None, "circle"), ("red", "circle")], [("red", "circle"), ("blue", "circle")]) == 2


def test_maximum_assignment_returns_who_takes_what():
    # rows 0 and 1 both want column 0; an augmenting path moves row 0 to column 1
    assert maximum_assignment([[0, 1], [0]]) == {0: 1, 1: 0}
    assert maximum_assignment([[0], [0], [1, 0]]) == {0: 0, 2: 1}
    assert maximum_assignment([[], [2]]) == {1: 2} and maximum_assignment([]) == {}


def test_bad_images_are_refused():
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        analyze(np.zeros((3, 32, 32), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        analyze(np.full((8, 8, 3), 2.0, dtype=np.float32))
    assert analyze(np.asarray(render_scene(scenes(1, 0)[0], 32), dtype=np.float32) / 255)  # floats in [0, 1]


def test_parse_prompt_is_used_for_text():
    assert parse_prompt("a small red circle").objects[0].attributes() == ("red", "circle", "small")


def test_fill_holes_fills_enclosed_regions_only():
    ring = np.ones((5, 5), dtype=bool)
    ring[2, 2] = False
    assert fill_holes(ring).all()
    cup = ring.copy()
    cup[0:3, 2] = False  # the hole opens to the top edge
    assert (fill_holes(cup) == cup).all()


def test_a_global_colour_cast_is_removed_and_a_foreign_background_left_alone():
    scene = sample_scene(random.Random(4), "train", 3)
    rgb = np.asarray(render_scene(scene, 32), dtype=np.float32)
    tinted = rgb + np.array([45.0, -30.0, 25.0])  # 60 from gray: many object colours move out of reach
    assert np.allclose(remove_color_cast(tinted), rgb)
    assert score(np.clip(tinted, 0, 255).astype(np.uint8), scene).exact == 1
    red = np.zeros_like(rgb) + np.array(COLORS["red"], dtype=np.float32)
    assert np.array_equal(remove_color_cast(red), red)  # far from gray: not a tint of the background


def test_tensors_and_prompt_records_are_accepted():
    import torch

    record = prompt_set("heldout_2", 1)[0]
    image = render_scene(record.scene, 32)
    tensor = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)  # (3, H, W)
    assert analyze(tensor) == analyze(image)
    assert score(image, record).to_dict() == score(image, record.scene).to_dict()

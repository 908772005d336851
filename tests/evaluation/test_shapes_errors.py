"""What ``binding`` lumps together, told apart: each prompt object is bound, drawn at the wrong size,
given another prompt object's colour (a leak: the binding failure), a colour nobody asked for, another
object's shape, a shape of its own making, or missing; colour swaps are counted per pair of drawn
objects. Every case is a rendered scene, edited, scored against the scene as asked."""

import dataclasses
import json
import random

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from llm4gen.evaluation.report import bar_plot, markdown_table
from llm4gen.evaluation.scorers import ImageRecord
from llm4gen.evaluation.shapes import (
    OUTCOMES,
    DetectedObject,
    ImageScore,
    ObjectOutcome,
    aggregate,
    analyze,
    classify_objects,
    count_swaps,
    max_weight_assignment,
    maximum_assignment,
    score,
    score_objects,
)
from llm4gen.evaluation.shapes_scorer import ShapesScorer
from llm4gen.shapes.world import (
    COLORS,
    SHAPES,
    SIZE_SCALES,
    Scene,
    ShapeObject,
    object_bbox,
    render_scene,
    sample_scene,
)

RESOLUTIONS = (32, 64)
RED_CIRCLE = ShapeObject("red", "circle", "small", 0, 0.5, (0.5, 0.5))
BLUE_SQUARE = ShapeObject("blue", "square", "large", 1, 0.9, (0.5, 0.5))
GREEN_CROSS = ShapeObject("green", "cross", "large", 2, 0.9, (0.5, 0.5))
TWO = Scene((RED_CIRCLE, BLUE_SQUARE))
THREE = Scene((RED_CIRCLE, BLUE_SQUARE, GREEN_CROSS))


def drawn(*objects: ShapeObject) -> Scene:
    return Scene(tuple(objects))


def edit(obj: ShapeObject, **changes) -> ShapeObject:
    """``obj`` with other attributes; a new size also gets a scale in that size's range."""
    if "size" in changes and "scale" not in changes:
        changes["scale"] = 0.9 if changes["size"] == "large" else 0.45
    return dataclasses.replace(obj, **changes)


def scored(image_scene: Scene, asked, resolution: int) -> ImageScore:
    return score(render_scene(image_scene, resolution), asked)


# ---------------------------------------------------------------- one category each

@pytest.mark.parametrize("resolution", RESOLUTIONS)
def test_the_ground_truth_is_bound_with_its_own_detections(resolution):
    result = scored(TWO, TWO, resolution)
    assert result.categories == ["bound", "bound"] and result.binding == 1
    assert (result.swapped_pairs, result.drawn_pairs) == (0, 1)
    outcomes = classify_objects(TWO, result.detected)
    assert all(isinstance(o, ObjectOutcome) for o in outcomes)
    assert [result.detected[o.detection].attributes() for o in outcomes] == [o.attributes() for o in TWO.objects]


@pytest.mark.parametrize("resolution", RESOLUTIONS)
def test_right_colour_and_shape_at_the_wrong_size_is_wrong_size(resolution):
    result = scored(drawn(edit(RED_CIRCLE, size="large"), BLUE_SQUARE), TWO, resolution)
    assert result.categories == ["wrong_size", "bound"]
    assert result.binding == 0.5 and (result.swapped_pairs, result.drawn_pairs) == (0, 1)


@pytest.mark.parametrize("resolution", RESOLUTIONS)
def test_another_objects_colour_on_ones_shape_is_leaked_color_and_one_sided_is_no_swap(resolution):
    result = scored(drawn(edit(RED_CIRCLE, color="blue"), BLUE_SQUARE), TWO, resolution)
    assert result.categories == ["leaked_color", "bound"]
    assert (result.swapped_pairs, result.drawn_pairs) == (0, 1)
    # the size plays no part once the colour is wrong
    result = scored(drawn(edit(RED_CIRCLE, color="blue", size="large"), BLUE_SQUARE), TWO, resolution)
    assert result.categories == ["leaked_color", "bound"]


@pytest.mark.parametrize("resolution", RESOLUTIONS)
def test_a_colour_no_object_asks_for_is_foreign_color(resolution):
    result = scored(drawn(edit(RED_CIRCLE, color="green"), BLUE_SQUARE), TWO, resolution)
    assert result.categories == ["foreign_color", "bound"]
    assert (result.swapped_pairs, result.drawn_pairs) == (0, 1)


@pytest.mark.parametrize("resolution", RESOLUTIONS)
def test_another_objects_shape_in_ones_colour_is_leaked_shape(resolution):
    result = scored(drawn(edit(RED_CIRCLE, shape="square"), BLUE_SQUARE), TWO, resolution)
    assert result.categories == ["leaked_shape", "bound"]
    assert (result.swapped_pairs, result.drawn_pairs) == (0, 1)


@pytest.mark.parametrize("resolution", RESOLUTIONS)
def test_a_shape_no_object_asks_for_is_misdrawn_shape(resolution):
    for shape in ("triangle", "cross"):
        result = scored(drawn(edit(RED_CIRCLE, shape=shape), BLUE_SQUARE), TWO, resolution)
        assert result.categories == ["misdrawn_shape", "bound"], shape


def draw_blob(scene: Scene, obj: ShapeObject, resolution: int) -> Image.Image:
    """``scene`` rendered, plus ``obj`` drawn as a thick diagonal band across its box: no shape fits it."""
    image = render_scene(scene, resolution)
    left, top, right, bottom = object_bbox(obj, resolution)
    ImageDraw.Draw(image).line([(left + 1, top + 1), (right - 2, bottom - 2)], fill=COLORS[obj.color],
                               width=round(0.3 * (right - left)))
    return image


@pytest.mark.parametrize("resolution", RESOLUTIONS)
def test_a_blob_with_no_readable_shape_is_misdrawn_shape(resolution):
    blob = edit(RED_CIRCLE, size="large")
    image = draw_blob(drawn(BLUE_SQUARE), blob, resolution)
    assert sorted((d.color, d.shape) for d in analyze(image)) == [("blue", "square"), ("red", None)]
    result = score(image, TWO)
    assert result.categories == ["misdrawn_shape", "bound"]
    assert (result.swapped_pairs, result.drawn_pairs) == (0, 1)


@pytest.mark.parametrize("resolution", RESOLUTIONS)
def test_an_object_not_drawn_is_missing_object(resolution):
    result = scored(drawn(BLUE_SQUARE), TWO, resolution)
    assert result.categories == ["missing_object", "bound"] and result.missing == 1
    assert (result.swapped_pairs, result.drawn_pairs) == (0, 0)
    assert classify_objects(TWO, result.detected)[0] == ObjectOutcome("missing_object", None)
    # a detection wrong in both colour and shape is no evidence of the object: it stays extra
    result = scored(drawn(edit(RED_CIRCLE, color="yellow", shape="triangle"), BLUE_SQUARE), TWO, resolution)
    assert result.categories == ["missing_object", "bound"] and result.extra == 0 and result.n_detected == 2
    assert scored(drawn(), TWO, resolution).categories == ["missing_object", "missing_object"]


# ---------------------------------------------------------------- swaps and conventions

@pytest.mark.parametrize("resolution", RESOLUTIONS)
def test_a_colour_swap_is_leaked_color_twice_and_one_swapped_pair(resolution):
    swapped = drawn(edit(RED_CIRCLE, color="blue"), edit(BLUE_SQUARE, color="red"))
    result = scored(swapped, TWO, resolution)
    assert result.categories == ["leaked_color", "leaked_color"] and result.binding == 0
    assert result.swapped_pairs == result.drawn_pairs == 1
    # a shape swap draws the same objects: the shape noun identifies the object, so it reads the same
    shape_swap = drawn(edit(RED_CIRCLE, shape="square"), edit(BLUE_SQUARE, shape="circle"))
    result = scored(shape_swap, TWO, resolution)
    assert result.categories == ["leaked_color", "leaked_color"] and result.swapped_pairs == 1


@pytest.mark.parametrize("resolution", RESOLUTIONS)
def test_the_shape_stages_run_before_the_colour_stages(resolution):
    """One red square for "a red circle and a blue square": the square has the square's shape in the
    circle's colour, so it is the square with a leaked colour, and the circle is missing."""
    result = scored(drawn(edit(BLUE_SQUARE, color="red")), TWO, resolution)
    assert result.categories == ["missing_object", "leaked_color"]
    assert (result.swapped_pairs, result.drawn_pairs) == (0, 0)


@pytest.mark.parametrize("resolution", RESOLUTIONS)
def test_three_objects_one_swapped_pair_and_a_misdrawn_shape(resolution):
    image = drawn(edit(RED_CIRCLE, color="blue"), edit(BLUE_SQUARE, color="red"), edit(GREEN_CROSS, shape="triangle"))
    result = scored(image, THREE, resolution)
    assert result.categories == ["leaked_color", "leaked_color", "misdrawn_shape"]
    assert (result.swapped_pairs, result.drawn_pairs) == (1, 3)
    assert result.binding == 0


@pytest.mark.parametrize("resolution", RESOLUTIONS)
def test_three_objects_in_a_colour_cycle_leak_every_colour_and_swap_no_pair(resolution):
    cycle = drawn(edit(RED_CIRCLE, color="blue"), edit(BLUE_SQUARE, color="green"), edit(GREEN_CROSS, color="red"))
    result = scored(cycle, THREE, resolution)
    assert result.categories == ["leaked_color"] * 3
    assert (result.swapped_pairs, result.drawn_pairs) == (0, 3)


@pytest.mark.parametrize("resolution", RESOLUTIONS)
def test_three_objects_each_wrong_in_its_own_way(resolution):
    image = drawn(edit(BLUE_SQUARE, color="yellow"), edit(GREEN_CROSS, size="small"))  # the circle is left out
    result = scored(image, THREE, resolution)
    assert result.categories == ["missing_object", "foreign_color", "wrong_size"]
    assert (result.swapped_pairs, result.drawn_pairs) == (0, 1)
    image = drawn(RED_CIRCLE, edit(BLUE_SQUARE, shape="cross"), edit(GREEN_CROSS, color="red"))
    result = scored(image, THREE, resolution)
    assert result.categories == ["bound", "leaked_shape", "leaked_color"]
    assert (result.swapped_pairs, result.drawn_pairs) == (0, 3)


# ---------------------------------------------------------------- unstated attributes (None)

@pytest.mark.parametrize("resolution", RESOLUTIONS)
def test_attributes_a_parsed_prompt_leaves_out_match_anything(resolution):
    sizes_swapped = drawn(edit(RED_CIRCLE, size="large"), edit(BLUE_SQUARE, size="small"))
    result = scored(sizes_swapped, "a red circle and a blue square", resolution)
    assert result.categories == ["bound", "bound"]
    assert scored(sizes_swapped, TWO, resolution).categories == ["wrong_size", "wrong_size"]
    swapped = drawn(edit(RED_CIRCLE, color="blue"), edit(BLUE_SQUARE, color="red"))
    result = scored(swapped, "a red circle and a blue square", resolution)
    assert result.categories == ["leaked_color", "leaked_color"] and result.swapped_pairs == result.drawn_pairs == 1
    # an object whose colour is unstated takes its shape in any colour: never leaked or foreign
    result = scored(drawn(edit(RED_CIRCLE, color="blue"), BLUE_SQUARE), "a large circle and a blue square", resolution)
    assert result.categories == ["wrong_size", "bound"]
    result = scored(drawn(edit(RED_CIRCLE, color="yellow"), BLUE_SQUARE), "a circle and a blue square", resolution)
    assert result.categories == ["bound", "bound"]
    # nor can a pair with an unstated colour be swapped
    result = scored(swapped, "a circle and a square", resolution)
    assert result.categories == ["bound", "bound"] and (result.swapped_pairs, result.drawn_pairs) == (0, 1)
    # an unstated colour is no leak source: yellow on the square is foreign
    result = scored(drawn(RED_CIRCLE, edit(BLUE_SQUARE, color="yellow")), "a circle and a blue square", resolution)
    assert result.categories == ["bound", "foreign_color"]


def detection(color, shape, size):
    return DetectedObject(color, shape, size, (0, 0, 4, 4), 16, 1.0)


def test_an_unstated_shape_is_never_a_wrong_shape():
    asked = Scene((ShapeObject("red", None, "small"), ShapeObject("blue", "square", None)))
    assert [o.category for o in classify_objects(asked, [detection("red", "triangle", "large"),
                                                         detection("blue", None, "small")])] == [
        "wrong_size", "misdrawn_shape"]
    # a shape-None object: a green triangle has "its shape", in a colour nobody asked for
    assert classify_objects(asked, [detection("green", "triangle", "small")])[0] == ObjectOutcome("foreign_color", 0)
    # and a blue detection of any shape is the red thing's leaked colour
    assert classify_objects(asked, [detection("blue", "circle", "small")]) == [
        ObjectOutcome("leaked_color", 0), ObjectOutcome("missing_object", None)]


def test_an_objects_own_colour_is_never_a_leak_nor_a_swap_even_if_another_shares_it():
    asked = Scene((ShapeObject("red", "circle", None), ShapeObject("red", "square", None)))
    outcomes = classify_objects(asked, [detection("red", "circle", "small"), detection("red", "circle", "large")])
    assert outcomes == [ObjectOutcome("bound", 0), ObjectOutcome("leaked_shape", 1)]
    assert count_swaps(asked, [detection("red", "circle", "small"), detection("red", "square", "large")],
                       [ObjectOutcome("bound", 0), ObjectOutcome("bound", 1)]) == (0, 1)


def test_each_stage_is_a_maximum_matching_over_what_is_left():
    """The greedy choice (the first circle to the first object) would leave the second object without
    its bound detection; a maximum matching binds both, and the leftover detection is no one's."""
    asked = Scene((ShapeObject(None, "circle", None), ShapeObject("red", "circle", "small")))
    found = [detection("red", "circle", "small"), detection("blue", "circle", "large"),
             detection("red", "cross", "large")]
    assert classify_objects(asked, found) == [ObjectOutcome("bound", 1), ObjectOutcome("bound", 0)]
    assert score_objects(asked, found).binding == 1


def category_of(obj: ShapeObject, found: DetectedObject, scene: Scene):
    """The stage a (prompt object, detection) pair fits, restated with None as a wildcard; None: none."""
    same = lambda wanted, value: wanted is None or wanted == value  # noqa: E731
    others = [o for o in scene.objects if o is not obj]
    if same(obj.color, found.color) and same(obj.shape, found.shape):
        return "bound" if same(obj.size, found.size) else "wrong_size"
    if same(obj.shape, found.shape):    # so the colour is stated and wrong
        return "leaked_color" if found.color in {o.color for o in others} - {None} else "foreign_color"
    if same(obj.color, found.color):    # so the shape is stated and wrong
        return "leaked_shape" if found.shape in {o.shape for o in others} - {None} else "misdrawn_shape"
    return None


def assignments(scene: Scene, found: list, i: int = 0, used: frozenset = frozenset()):
    """Every one-to-one partial assignment of prompt objects to detections they fit a stage with."""
    if i == len(scene.objects):
        yield []
        return
    for rest in assignments(scene, found, i + 1, used):
        yield [None] + rest
    for j, d in enumerate(found):
        if j not in used and category_of(scene.objects[i], d, scene) is not None:
            for rest in assignments(scene, found, i + 1, used | {j}):
                yield [j] + rest


def stage_counts(scene: Scene, found: list, chosen: list) -> tuple:
    categories = [category_of(o, found[j], scene) if j is not None else "missing_object"
                  for o, j in zip(scene.objects, chosen)]
    return tuple(categories.count(c) for c in OUTCOMES[:-1])


def test_the_assignment_has_the_most_objects_per_stage_in_stage_order_by_brute_force():
    """On random small prompts (unstated attributes included) and detections (unreadable shapes
    included): each stage is a maximum matching over what earlier stages left, and of all such staged
    assignments the one with the lexicographically largest counts, whatever the order of detections."""
    rng = random.Random(11)
    colors, shapes, sizes = ["red", "blue", "green", None], ["circle", "square", None], ["small", "large", None]
    for _ in range(400):
        scene = Scene(tuple(ShapeObject(rng.choice(colors), rng.choice(shapes), rng.choice(sizes))
                            for _ in range(rng.randint(1, 3))))
        found = [detection(rng.choice(colors[:3] + ["yellow"]), rng.choice(shapes), rng.choice(sizes[:2]))
                 for _ in range(rng.randint(0, 4))]
        outcomes = classify_objects(scene, found)
        chosen = [o.detection for o in outcomes]
        restated = [category_of(obj, found[j], scene) if j is not None else "missing_object"
                    for obj, j in zip(scene.objects, chosen)]
        assert [o.category for o in outcomes] == restated
        best = max(stage_counts(scene, found, a) for a in assignments(scene, found))
        assert stage_counts(scene, found, chosen) == best, (scene, found, outcomes)
        for k, category in enumerate(OUTCOMES[:-1]):  # stage k: maximum over what stages < k left
            earlier = {o.detection for o in outcomes if o.category in OUTCOMES[:k]}
            rows = [i for i, o in enumerate(outcomes) if o.category not in OUTCOMES[:k]]
            fits = [[j for j, d in enumerate(found)
                     if j not in earlier and category_of(scene.objects[i], d, scene) == category] for i in rows]
            assert len(maximum_assignment(fits)) == best[k]
        reversed_outcomes = classify_objects(scene, found[::-1])
        assert sorted(o.category for o in reversed_outcomes) == sorted(o.category for o in outcomes)
        assert score_objects(scene, found).binding == best[0] / len(scene.objects)


def test_max_weight_assignment_finds_the_heaviest_one_to_one_assignment():
    rng = random.Random(5)
    for _ in range(300):
        n, m = rng.randint(0, 4), rng.randint(0, 5)
        weights = [[rng.choice([0, 0, 1, 2, 5, 25]) for _ in range(m)] for _ in range(n)]
        assignment = max_weight_assignment(weights)
        assert len(set(assignment.values())) == len(assignment)
        assert all(weights[i][j] > 0 for i, j in assignment.items())

        def best(i, used):
            if i == n:
                return 0
            return max([best(i + 1, used)] + [weights[i][j] + best(i + 1, used | {j})
                                               for j in range(m) if j not in used and weights[i][j] > 0])
        assert sum(weights[i][j] for i, j in assignment.items()) == best(0, frozenset())


# ---------------------------------------------------------------- binding is the share of bound

def perturb(scene: Scene, rng: random.Random) -> Scene:
    """Each object kept, recoloured (another object's colour or a new one), reshaped, resized or dropped."""
    objects = []
    for obj in scene.objects:
        change = rng.choice(["keep", "color", "shape", "size", "drop", "color"])
        if change == "color":
            objects.append(edit(obj, color=rng.choice([c for c in COLORS if c != obj.color])))
        elif change == "shape":
            objects.append(edit(obj, shape=rng.choice([s for s in SHAPES if s != obj.shape])))
        elif change == "size":
            size = "small" if obj.size == "large" else "large"
            objects.append(edit(obj, size=size, scale=round(rng.uniform(*SIZE_SCALES[size]), 4)))
        elif change == "keep":
            objects.append(obj)
    return Scene(tuple(objects))


def fits_its_category(category: str, obj: ShapeObject, found: DetectedObject, scene: Scene) -> bool:
    """The categories restated attribute by attribute (every object of these scenes states all three)."""
    others = [o for o in scene.objects if o is not obj]
    same_color, same_shape, same_size = found.color == obj.color, found.shape == obj.shape, found.size == obj.size
    return {
        "bound": same_color and same_shape and same_size,
        "wrong_size": same_color and same_shape and not same_size,
        "leaked_color": same_shape and not same_color and found.color in {o.color for o in others},
        "foreign_color": same_shape and not same_color and found.color not in {o.color for o in others},
        "leaked_shape": same_color and not same_shape and found.shape in {o.shape for o in others},
        "misdrawn_shape": same_color and not same_shape and found.shape not in {o.shape for o in others},
    }[category]


@pytest.mark.parametrize("resolution, n", [(32, 300), (64, 100)])
def test_binding_is_the_share_of_bound_objects_on_perturbed_renders(resolution, n):
    rng, noise = random.Random(resolution), np.random.default_rng(resolution)
    seen = set()
    for k in range(n):
        scene = sample_scene(rng, rng.choice(["train", "heldout"]))
        image = render_scene(perturb(scene, rng), resolution)
        if k % 3 == 0:  # soft edges and noise, as a generator draws
            array = np.asarray(image.filter(ImageFilter.GaussianBlur(0.5 * resolution / 32)), dtype=np.float32)
            image = np.clip(array + noise.normal(0, 6, array.shape), 0, 255).astype(np.uint8)
        result = score(image, scene)
        assert len(result.categories) == len(scene.objects) and set(result.categories) <= set(OUTCOMES)
        assert result.binding == result.categories.count("bound") / len(scene.objects)
        outcomes = classify_objects(scene, result.detected)
        assert [o.category for o in outcomes] == result.categories
        matched = [o.detection for o in outcomes if o.detection is not None]
        assert len(matched) == len(set(matched)) == sum(c != "missing_object" for c in result.categories)
        for obj, outcome in zip(scene.objects, outcomes):
            if outcome.detection is not None:
                assert fits_its_category(outcome.category, obj, result.detected[outcome.detection], scene)
        n_drawn = len(matched)
        assert result.drawn_pairs == n_drawn * (n_drawn - 1) // 2 and 0 <= result.swapped_pairs <= result.drawn_pairs
        assert result.swapped_pairs <= result.categories.count("leaked_color") // 2
        seen.update(result.categories)
    assert seen == set(OUTCOMES)  # the perturbations reach every category


# ---------------------------------------------------------------- aggregate and the scorer

def test_aggregate_gives_category_shares_summing_to_one_and_swap_rate_as_a_ratio_of_sums():
    swapped = drawn(edit(RED_CIRCLE, color="blue"), edit(BLUE_SQUARE, color="red"))
    cycle = drawn(edit(RED_CIRCLE, color="blue"), edit(BLUE_SQUARE, color="green"), edit(GREEN_CROSS, color="red"))
    results = [scored(swapped, TWO, 32),                          # leaked x2, 1 of 1 pair swapped
               scored(cycle, THREE, 32),                          # leaked x3, 0 of 3 pairs swapped
               scored(drawn(RED_CIRCLE), Scene((RED_CIRCLE,)), 32),  # bound, no pair
               scored(drawn(BLUE_SQUARE), TWO, 32)]               # missing + bound, no pair drawn
    summary = aggregate(results)
    assert summary["leaked_color"] == pytest.approx((1 + 1 + 0 + 0) / 4)
    assert summary["bound"] == pytest.approx((0 + 0 + 1 + 0.5) / 4)
    assert summary["missing_object"] == pytest.approx(0.5 / 4)
    assert [summary[c] for c in ("wrong_size", "foreign_color", "leaked_shape", "misdrawn_shape")] == [0, 0, 0, 0]
    assert summary["swap_rate"] == pytest.approx(1 / 4)  # (1 + 0) / (1 + 3), not the mean of 1/1 and 0/3
    assert summary["missing"] == pytest.approx(1 / 4) and summary["binding"] == pytest.approx(summary["bound"])
    by_n = summary["by_n_objects"]
    assert by_n[1]["bound"] == 1 and by_n[1]["swap_rate"] is None
    assert by_n[2]["leaked_color"] == pytest.approx(0.5) and by_n[2]["missing_object"] == pytest.approx(0.25)
    assert by_n[2]["swap_rate"] == 1 and by_n[3]["swap_rate"] == 0
    for group in (summary, *by_n.values()):
        assert sum(group[c] for c in OUTCOMES) == pytest.approx(1)
    assert aggregate([results[2]])["swap_rate"] is None


def test_aggregate_of_scores_without_categories_has_no_shares():
    bare = ImageScore(1, 1, 0, 0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0)
    summary = aggregate([bare])
    assert summary["binding"] == 1 and all(summary[c] is None for c in OUTCOMES) and summary["swap_rate"] is None
    with pytest.raises(ValueError, match="categories"):
        aggregate([dataclasses.replace(bare, categories=["bound", "bound"])])


def test_the_scorer_reports_the_shares_and_a_null_swap_rate_the_tables_show_as_a_dash(tmp_path):
    def records(scenes_and_prompts):
        out = []
        for i, (image_scene, prompt) in enumerate(scenes_and_prompts):
            path = tmp_path / f"{len(list(tmp_path.iterdir())):03d}.png"
            render_scene(image_scene, 32).save(path)
            out.append(ImageRecord(i, 0, prompt, 0, path))
        return out

    one = records([(drawn(RED_CIRCLE), "a small red circle"), (drawn(edit(RED_CIRCLE, color="green")), "a red circle")])
    values, details = ShapesScorer().score(None, one)
    assert values["shapes_binding"] == 0.5 and values["shapes_bound"] == 0.5 and values["shapes_foreign_color"] == 0.5
    assert values["shapes_missing_object"] == 0 and values["shapes_swap_rate"] is None
    assert {f"shapes_{c}" for c in (*OUTCOMES, "swap_rate", "all_bound", "exact", "any_correct")} <= set(values)
    assert details[1]["categories"] == ["foreign_color"] and details[1]["drawn_pairs"] == 0
    assert json.loads(json.dumps(values))["shapes_swap_rate"] is None  # JSON null
    json.dumps(details)

    two = records([(drawn(edit(RED_CIRCLE, color="blue"), edit(BLUE_SQUARE, color="red")),
                    "a small red circle and a large blue square")])
    values_two, details_two = ShapesScorer().score(None, two)
    assert values_two["shapes_swap_rate"] == 1 and values_two["shapes_leaked_color"] == 1
    assert (details_two[0]["swapped_pairs"], details_two[0]["drawn_pairs"]) == (1, 1)

    runs = {"run": json.loads(json.dumps({"seen_1": values, "seen_2": values_two}))}
    table = markdown_table(runs).splitlines()
    header = [cell.strip() for cell in table[0].split("|")[1:-1]]
    row = [cell.strip() for cell in table[2].split("|")[1:-1]]
    assert row[header.index("seen_1 shapes_swap_rate ↑")] == "-"
    assert row[header.index("seen_2 shapes_swap_rate ↑")] == "1.00"
    assert row[header.index("seen_1 shapes_foreign_color ↑")] == "0.50"
    assert "|  |" in markdown_table({"a": {"s": {"x": 1.0}}, "b": {"s": {}}})  # not scored: blank
    assert bar_plot(runs, tmp_path / "plot" / "compare.png").is_file()

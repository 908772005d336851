"""Entity parser: exact groups (texts and character spans) for captions of every kind."""

import re

import pytest

from llm4gen.losses.entity_parser import (
    COLOUR_NOUNS,
    MATERIAL_NOUNS,
    EntityGroup,
    EntityParser,
    SpacyModelNotFoundError,
    Word,
    entity_words,
    groups_from_json,
    groups_to_json,
)

DENSE_LIVING_ROOM = (
    "The image shows a cozy living room with a large gray sofa placed against a white brick wall. "
    "On the sofa sit two fluffy cushions and a folded blue blanket. In front of the sofa there is a "
    "round wooden coffee table holding a glass vase with bright yellow flowers and a stack of old "
    "books. A tall floor lamp with a beige shade stands in the corner, and sunlight streams through a "
    "large window with thin white curtains."
)
DENSE_STREET = (
    "A busy city street at night is filled with people walking past tall buildings. Small shops have "
    "bright neon signs, and a red double-decker bus drives down the wet road, its headlights "
    "reflecting on the shiny pavement. A young woman in a long black coat holds a transparent "
    "umbrella while a man wearing a leather jacket stands at the crosswalk. The sky is dark and "
    "cloudy, and the air looks cold and misty."
)

# caption -> [(entity, [attributes])]; a word is its text, or (text, n) for its n-th occurrence (0-based)
CASES = [
    ("a cat", [("cat", [])]),
    ("a red and white bus", [("bus", ["red", "white"])]),
    ("the car is red", [("car", ["red"])]),
    ("the walls are painted pale blue", [("walls", ["pale", "blue"])]),
    (
        "a leather bag next to a glass vase and a stone bridge",
        [("bag", ["leather"]), ("vase", ["glass"]), ("bridge", ["stone"])],
    ),
    (
        "a fire truck and a teddy bear on a wooden table",
        [("fire truck", []), ("teddy bear", []), ("table", ["wooden"])],
    ),
    (
        "a heart-shaped balloon with polka-dot pattern",
        [("balloon", ["heart-shaped"]), ("pattern", ["polka-dot"])],
    ),
    ("glowing signs above two black cats", [("signs", ["glowing"]), ("cats", ["black"])]),
    ("an orange cat and a pink flamingo", [("cat", ["orange"]), ("flamingo", ["pink"])]),
    ("a black-and-white photo of a t-shirt", [("photo", ["black-and-white"]), ("t-shirt", [])]),
    ("a polka-dot dress", [("dress", ["polka-dot"])]),
    ("a cat that is black", [("cat", ["black"])]),
    ("the car and the bus are red", [("car", ["red"]), ("bus", ["red"])]),
    ("a dog's red collar", [("dog", []), ("collar", ["red"])]),
    ("a brown leather sofa", [("sofa", ["brown", "leather"])]),
    ("a long-haired dog sleeping on a fluffy rug", [("dog", ["long-haired"]), ("rug", ["fluffy"])]),
    ("three red apples", [("apples", ["red"])]),
    (
        "the sky is bright blue and the grass is green",
        [("sky", ["bright", "blue"]), ("grass", ["green"])],
    ),
    ("a rubber duck floating in a plastic tub", [("duck", ["rubber"]), ("tub", ["plastic"])]),
    (
        "a shiny silver car parked near glowing neon signs",
        [("car", ["shiny", "silver"]), ("neon signs", ["glowing"])],
    ),
    ("an ice cream cone", [("ice cream cone", [])]),
    ("two dark green bottles", [("bottles", ["dark", "green"])]),
    (
        "a cup of hot coffee on the left side of a marble counter in front of a window",
        [("cup", []), ("coffee", ["hot"]), ("counter", ["marble"]), ("window", [])],
    ),
    (
        "the old man is wearing a gray wool coat and a straw hat",
        [("man", ["old"]), ("coat", ["gray", "wool"]), ("hat", ["straw"])],
    ),
    ("a gold ring and a silk scarf", [("ring", ["gold"]), ("scarf", ["silk"])]),
    ("A metal chair and a wooden table.", [("chair", ["metal"]), ("table", ["wooden"])]),
    ("a striped cat with bright green eyes", [("cat", ["striped"]), ("eyes", ["bright", "green"])]),
    (
        "a smiling girl holding a small red umbrella",
        [("girl", ["smiling"]), ("umbrella", ["small", "red"])],
    ),
    ("a car parked near a house", [("car", []), ("house", [])]),
    ("many other cups on several tables", [("cups", []), ("tables", [])]),
    ("it is red", []),
    ("一只红色的猫", []),
    ("...!?", []),
    ("", []),
    ("   ", []),
    (
        DENSE_LIVING_ROOM,
        [
            ("image", []),
            ("living room", ["cozy"]),
            (("sofa", 0), ["large", "gray"]),
            ("wall", [("white", 0), "brick"]),
            (("sofa", 1), []),
            ("cushions", ["fluffy"]),
            ("blanket", ["folded", "blue"]),
            (("sofa", 2), []),
            ("coffee table", ["round", "wooden"]),
            ("vase", ["glass"]),
            ("flowers", ["bright", "yellow"]),
            ("stack", []),
            ("books", ["old"]),
            ("floor lamp", ["tall"]),
            ("shade", ["beige"]),
            ("corner", []),
            ("sunlight", []),
            ("window", [("large", 1)]),
            ("curtains", ["thin", ("white", 1)]),
        ],
    ),
    (
        DENSE_STREET,
        [
            ("city street", ["busy"]),
            ("night", []),
            ("people", []),
            ("buildings", ["tall"]),
            ("shops", ["Small"]),
            ("neon signs", ["bright"]),
            ("bus", ["red", "double-decker"]),
            ("road", ["wet"]),
            ("headlights", []),
            ("pavement", ["shiny"]),
            ("woman", ["young"]),
            ("coat", ["long", "black"]),
            ("umbrella", ["transparent"]),
            ("man", []),
            ("jacket", ["leather"]),
            ("crosswalk", []),
            ("sky", ["dark", "cloudy"]),
            ("air", ["cold", "misty"]),
        ],
    ),
]

NUMERAL_CASES = [
    ("three red apples", [("apples", ["three", "red"])]),
    ("three red apples and 2 green pears", [("apples", ["three", "red"]), ("pears", ["2", "green"])]),
    ("glowing signs above two black cats", [("signs", ["glowing"]), ("cats", ["two", "black"])]),
]


def word_at(caption: str, spec) -> Word:
    """The n-th whole-word occurrence of a text in the caption, as a Word with its exact span."""
    text, nth = spec if isinstance(spec, tuple) else (spec, 0)
    matches = list(re.finditer(r"(?<!\w)" + re.escape(text) + r"(?!\w)", caption))
    assert len(matches) > nth, f"test bug: {text!r} #{nth} not in {caption!r}"
    match = matches[nth]
    return Word(text, match.start(), match.end())


def expected_groups(caption, spec) -> list[EntityGroup]:
    return [
        EntityGroup(word_at(caption, entity), tuple(word_at(caption, a) for a in attributes))
        for entity, attributes in spec
    ]


@pytest.fixture(scope="module")
def parser():
    return EntityParser()


@pytest.fixture(scope="module")
def numeral_parser():
    return EntityParser(include_numerals=True)


def test_dense_captions_are_dense():
    assert len(DENSE_LIVING_ROOM.split()) >= 70 and len(DENSE_STREET.split()) >= 70


@pytest.mark.parametrize("caption,spec", CASES, ids=[c[:40] or "empty" for c, _ in CASES])
def test_parse_gives_exact_groups(parser, caption, spec):
    assert parser.parse(caption) == expected_groups(caption, spec)


@pytest.mark.parametrize("caption,spec", NUMERAL_CASES, ids=[c for c, _ in NUMERAL_CASES])
def test_numerals_are_attributes_only_when_asked(numeral_parser, caption, spec):
    assert numeral_parser.parse(caption) == expected_groups(caption, spec)


def test_parse_many_matches_parse(parser):
    captions = [caption for caption, _ in CASES]
    assert parser.parse_many(captions) == [expected_groups(c, s) for c, s in CASES]


def test_parse_many_accepts_a_generator_and_small_batches():
    parser = EntityParser(batch_size=2)
    captions = (c for c, _ in CASES[:5])
    assert parser.parse_many(captions) == [expected_groups(c, s) for c, s in CASES[:5]]


def test_spans_point_at_their_text(parser):
    for caption, _ in CASES:
        for group in parser.parse(caption):
            for word in (group.entity, *group.attributes):
                assert caption[word.start : word.end] == word.text


def test_missing_model_is_a_clear_error_naming_model_and_package():
    with pytest.raises(SpacyModelNotFoundError, match=r"no_such_model_xyz.*pip install no-such-model-xyz"):
        EntityParser(model="no_such_model_xyz")


def test_non_string_caption_is_rejected(parser):
    with pytest.raises(TypeError, match="must be a str"):
        parser.parse(None)
    with pytest.raises(TypeError, match="must be a str"):
        parser.parse_many(["a cat", 3])


def test_bad_batch_size_is_rejected():
    with pytest.raises(ValueError, match="batch_size"):
        EntityParser(batch_size=0)


def test_unneeded_components_are_not_run(parser):
    assert "ner" not in parser.nlp.pipe_names and "lemmatizer" not in parser.nlp.pipe_names
    assert "parser" in parser.nlp.pipe_names


def test_material_list_holds_the_t2i_compbench_texture_words():
    for word in ("rubber", "plastic", "metallic", "wooden", "fabric", "fluffy", "leather", "glass"):
        assert word in MATERIAL_NOUNS
    # words that start kind-of-thing compounds stay out of the lists
    for word in ("ice", "cream", "olive", "coral", "fire", "teddy"):
        assert word not in MATERIAL_NOUNS | COLOUR_NOUNS


def test_json_round_trip(parser):
    caption = "a red and white bus next to a leather bag"
    groups = parser.parse(caption)
    data = groups_to_json(groups)
    assert data[0] == {
        "entity": {"text": "bus", "start": 16, "end": 19},
        "attributes": [{"text": "red", "start": 2, "end": 5}, {"text": "white", "start": 10, "end": 15}],
    }
    assert groups_from_json(data, caption) == groups
    assert groups_from_json([]) == []


def test_json_of_another_caption_is_rejected(parser):
    data = groups_to_json(parser.parse("a red bus"))
    with pytest.raises(ValueError, match="another caption"):
        groups_from_json(data, "a blue car")
    with pytest.raises(ValueError, match="malformed entity group"):
        groups_from_json([{"attributes": []}])


def test_entity_words_are_distinct_and_in_caption_order():
    red = Word("red", 14, 17)
    car, bus = Word("car", 4, 7), Word("bus", 8, 11)
    groups = [EntityGroup(car, (red,)), EntityGroup(bus, (red,))]
    assert entity_words(groups) == [car, bus, red]
    assert entity_words([]) == []


def test_the_shapes_grammar_parser_reads_every_training_phrasing_exactly():
    import random

    from llm4gen.datamodules.collate import entity_parser
    from llm4gen.shapes.world import random_scene

    parser = entity_parser("shapes")
    rng = random.Random(0)
    for _ in range(200):
        record = random_scene(rng, 32)
        groups = parser.parse(record["caption"])
        assert sorted(g.entity.text for g in groups) == sorted(o["shape"] for o in record["objects"])
        for group in groups:
            assert record["caption"][group.entity.start:group.entity.end] == group.entity.text
        wanted = sorted((o["shape"], tuple(sorted((o["color"], o["size"])))) for o in record["objects"])
        assert sorted((g.entity.text, tuple(sorted(a.text for a in g.attributes))) for g in groups) == wanted
    assert parser.parse("") == [] and parser.parse("a photo of a dog") == []

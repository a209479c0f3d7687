"""ShapesWorld v1 constants: the contract in SHAPESWORLD.md, in one place.

Geometry is in 64-px units; renderers and checkers scale it by R/64.
"""

BASE_RES = 64

BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (0, 0, 0),
    "white": (255, 255, 255),
    "gray": (128, 128, 128),
}

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 60),
    "blue": (30, 70, 230),
    "yellow": (240, 200, 20),
    "purple": (140, 50, 200),
    "orange": (250, 130, 20),
}

SHAPES = ("circle", "square", "triangle", "cross")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}
SINGULARS = {v: k for k, v in PLURALS.items()}

# Box side in px for each size; digits have one fixed glyph box.
SIZES = {"small": 12, "large": 22}
SIZE_WORDS = {"small": ("small", "tiny", "little"), "large": ("large", "big")}
WORD_SIZE = {w: s for s, words in SIZE_WORDS.items() for w in words}

DIGIT_CELL = 3  # each lit glyph cell is a 3x3 px block
DIGIT_BOX = (5 * DIGIT_CELL, 7 * DIGIT_CELL)  # (w, h) = 15x21

DIGIT_GLYPHS: dict[int, tuple[str, ...]] = {
    0: ("01110", "10001", "10011", "10101", "11001", "10001", "01110"),
    1: ("00100", "01100", "00100", "00100", "00100", "00100", "01110"),
    2: ("01110", "10001", "00001", "00010", "00100", "01000", "11111"),
    3: ("11111", "00010", "00100", "00010", "00001", "10001", "01110"),
    4: ("00010", "00110", "01010", "10010", "11111", "00010", "00010"),
    5: ("11111", "10000", "11110", "00001", "00001", "10001", "01110"),
    6: ("00110", "01000", "10000", "11110", "10001", "10001", "01110"),
    7: ("11111", "00001", "00010", "00100", "01000", "01000", "01000"),
    8: ("01110", "10001", "10001", "01110", "10001", "10001", "01110"),
    9: ("01110", "10001", "10001", "01111", "00001", "00010", "01100"),
}

# Placement: boxes lie inside [MARGIN, 64 - MARGIN); two boxes keep GAP px apart on some axis.
MARGIN = 2
GAP = 2
MAX_OBJECTS = 4
SUPERSAMPLE = 4

RELATIONS = ("left", "right", "above", "below")
RELATION_WORDS = {
    "left": ("to the left of", "left of", "on the left of"),
    "right": ("to the right of", "right of", "on the right of"),
    "above": ("above", "over", "on top of"),
    "below": ("below", "under", "beneath"),
}
WORD_RELATION = {w: r for r, words in RELATION_WORDS.items() for w in words}
OPPOSITE = {"left": "right", "right": "left", "above": "below", "below": "above"}  # "a rel b" is "b OPPOSITE[rel] a"


def phrase_for(phrase: str, relation: str) -> str:
    """The phrase of `relation` in the place `phrase` has among its own relation's ("to the left of" ->
    "to the right of", "over" -> "under"; the last where the other has fewer)."""
    words = RELATION_WORDS[relation]
    return words[min(RELATION_WORDS[WORD_RELATION[phrase]].index(phrase), len(words) - 1)]
RELATION_MIN_OFFSET = 12  # px along the named axis, generator side

NUMBERS = {"two": 2, "three": 3, "four": 4}
NUMBER_WORDS = {v: k for k, v in NUMBERS.items()}

CATEGORIES = (
    "single_object",
    "colors",
    "size",
    "background",
    "two_objects",
    "counting",
    "position",
    "attribute_binding",
    "text",
)


def mix_categories(mix: str) -> tuple[str, ...]:
    """The category turn order of a training mix such as "two_objects=2,counting=2".

    Scenes take categories in turn, so a category listed k times gets k shares; categories the
    mix does not name keep one share. "" is the standard mix (every category once)."""
    weights = dict.fromkeys(CATEGORIES, 1)
    for part in filter(None, (p.strip() for p in mix.split(","))):
        name, sep, k = part.partition("=")
        if name not in weights:
            raise ValueError(f"unknown category {name!r} in the mix; choose from {', '.join(CATEGORIES)}")
        if not sep or not k.strip().isdigit() or not 0 <= int(k) <= 16:
            raise ValueError(f"mix weight of {name!r} must be a whole number 0-16, got {k!r}")
        weights[name] = int(k)
    order = tuple(c for c in CATEGORIES for _ in range(weights[c]))
    if not order:
        raise ValueError("the mix leaves no category")
    return order

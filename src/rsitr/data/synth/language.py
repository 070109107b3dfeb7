"""The caption language of the synthetic benchmark: vocabulary, phrases and the sentences builders
compose, each with the machine-checkable claims it states (see :class:`Caption`).

A number word (``one`` ... ``twelve``) in front of a noun, optionally with a colour word
(``"three red cars"``) or followed by ``"with <colour> roofs"``, is the exact number of such
objects in the whole image; larger counts are said as "many".
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from rsitr.data.synth.scene import Obj, Scene, common_region, pick

CAPTIONS_PER_IMAGE = 5


NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve")

# kind -> [(singular, plural), ...]: the nouns captions use for each countable kind
NOUNS: dict[str, list[tuple[str, str]]] = {
    "car": [("car", "cars"), ("vehicle", "vehicles")],
    "building": [("building", "buildings")],
    "house": [("house", "houses")],
    "tree": [("tree", "trees")],
    "ship": [("ship", "ships"), ("boat", "boats"), ("vessel", "vessels")],
    "airplane": [("airplane", "airplanes"), ("plane", "planes"), ("aircraft", "aircraft")],
    "tank": [("storage tank", "storage tanks"), ("oil tank", "oil tanks"), ("tank", "tanks")],
    "field": [("field", "fields"), ("parcel", "parcels"), ("plot", "plots")],
    "umbrella": [("umbrella", "umbrellas"), ("parasol", "parasols")],
    "container": [("container", "containers")],
}


REGION_PHRASES: dict[tuple[int, int], tuple[str, ...]] = {
    (0, 0): ("in the top left corner", "at the upper left"),
    (1, 0): ("at the top", "in the upper part"),
    (2, 0): ("in the top right corner", "at the upper right"),
    (0, 1): ("on the left side", "on the left"),
    (1, 1): ("in the center", "in the middle"),
    (2, 1): ("on the right side", "on the right"),
    (0, 2): ("in the bottom left corner", "at the lower left"),
    (1, 2): ("at the bottom", "in the lower part"),
    (2, 2): ("in the bottom right corner", "at the lower right"),
}

GENERIC_NOISE = (
    "a picture taken on a sunny day .",
    "this photo was uploaded to a website .",
    "a close up photo of a cat sleeping on a sofa .",
    "some text printed on a white page .",
    "a blurry photograph of something .",
    "people are walking in a shopping mall .",
    "a plate of food on a wooden table .",
    "an old map hanging on a wall .",
)


@dataclass
class Caption:
    """A caption and the facts it states. Claims:
    ("count", kind, color|None, n)            exactly n such objects in the image
    ("region", kind, color|None, (col, row))  every such object's centre in that 3x3 cell
    ("side", kind, color|None, landmark, s)   every such object on side s of the landmark
    ("landmark", name, key, value)            scene.landmarks[name][key] == value
    """

    text: str
    claims: list[tuple] = field(default_factory=list)


def number_word(n: int) -> str:
    return NUMBER_WORDS[n] if 0 <= n < len(NUMBER_WORDS) else "many"


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _noun(kind: str, n: int, rng: np.random.Generator) -> str:
    sing, plur = pick(rng, NOUNS[kind])
    return sing if n == 1 else plur


def count_phrase(kind: str, n: int, rng: np.random.Generator, color: str | None = None) -> tuple[str, list[tuple]]:
    """"three red cars" / "a white ship" / "many cars", and its claims (exact counts only)."""
    noun = _noun(kind, n, rng)
    adj = f"{color} " if color else ""
    if n == 1:
        first = (adj or noun)
        det = "one" if rng.random() < 0.3 else _article(first)
        return f"{det} {adj}{noun}", [("count", kind, color, 1)]
    if n <= 12:
        return f"{number_word(n)} {adj}{noun}", [("count", kind, color, n)]
    return f"many {adj}{noun}", []


def verb_be(n: int) -> str:
    return "is" if n == 1 else "are"


def region_phrase(cell: tuple[int, int], rng: np.random.Generator) -> str:
    return pick(rng, REGION_PHRASES[cell])


def color_counts(objs: list[Obj]) -> dict[str, int]:
    out: dict[str, int] = {}
    for o in objs:
        out[o.color] = out.get(o.color, 0) + 1  # type: ignore[index]
    return dict(sorted(out.items(), key=lambda kv: (-kv[1], kv[0])))


def band_word(lm: dict, rng) -> str:
    if lm["orient"] == "vertical":
        return pick(rng, ("from top to bottom", "vertically"))
    return pick(rng, ("from left to right", "horizontally"))


def side_phrase(side: str, name: str) -> str:
    return {"left": f"to the left of the {name}", "right": f"to the right of the {name}",
            "top": f"above the {name}", "bottom": f"below the {name}"}[side]


EDGE_PHRASE = {"left": "on the left side", "right": "on the right side", "top": "at the top", "bottom": "at the bottom"}


def count_sentence(scene: Scene, kind: str, rng, tail: str | tuple[str, ...], color: str | None = None,
                   none: str | None = None) -> Caption | None:
    """"three red cars are <tail> ." with its count claims. ``tail`` may be a tuple of alternatives
    (one is picked, only when the sentence is said). When the scene has no such object: the
    sentence ``none`` with the claim that there are zero, or None (nothing to say) without it."""
    n = scene.count(kind, color)
    if n == 0:
        return Caption(none, [("count", kind, None, 0)]) if none is not None else None
    if isinstance(tail, tuple):
        tail = pick(rng, tail)
    phrase, claims = count_phrase(kind, n, rng, color)
    return Caption(f"{phrase} {verb_be(n)} {tail} .", claims)


def region_sentence(scene: Scene, kind: str, rng, color: str | None, lead: str = "") -> Caption | None:
    objs = scene.of(kind, color)
    if not objs:
        return None
    cell = common_region(objs)
    if cell is None:
        return None
    phrase, claims = count_phrase(kind, len(objs), rng, color)
    return Caption(f"{lead}{phrase} {verb_be(len(objs))} {region_phrase(cell, rng)} .", claims + [("region", kind, color, cell)])


def colour_breakdown(scene: Scene, kind: str, rng, verb: str) -> Caption | None:
    counts = color_counts(scene.of(kind))
    if not counts or any(n > 12 for n in counts.values()):
        return None
    parts, claims = [], []
    for col, n in list(counts.items())[:3]:
        p, c = count_phrase(kind, n, rng, col)
        parts.append(p)
        claims += c
    text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    total = sum(counts.values())
    return Caption(f"{text} {verb_be(total if len(parts) > 1 else counts[next(iter(counts))])} {verb} .", claims)


# The sentences any tile of a class may get (1 or 2 of an image's 5 captions): they state nothing
# checkable. The order matters (captions are chosen by a permutation of this list).
GENERIC_CAPTIONS: dict[str, tuple[str, ...]] = {
    "airport": (
        "an airport with a runway .",
        "this is an airport seen from above .",
        "an aerial image of an airport .",
    ),
    "bareland": (
        "a piece of bare land .",
        "an area of bare land .",
        "bare land seen from above .",
        "this is a piece of empty land .",
    ),
    "beach": (
        "a beach next to the sea .",
        "yellow sand along the blue sea .",
        "this is a beach seen from above .",
        "waves reach a long sandy beach .",
    ),
    "farmland": (
        "farmland divided into rectangular parcels .",
        "farmland seen from above .",
        "many pieces of farmland .",
        "this is a farmland area with striped fields .",
    ),
    "forest": (
        "a dense forest .",
        "many green trees grow densely together .",
        "this is a piece of forest seen from above .",
        "lots of trees form a green forest .",
    ),
    "industrial": (
        "an industrial area with several factories .",
        "large buildings in an industrial area .",
        "this is an industrial zone .",
        "an aerial image of an industrial area .",
    ),
    "junction": (
        "an intersection of two roads .",
        "a road junction surrounded by green grass .",
        "this is a road intersection seen from above .",
        "roads meet at a junction .",
    ),
    "lake": (
        "a lake surrounded by green grass and trees .",
        "blue water of a lake .",
        "this is a lake seen from above .",
        "a pond in a green meadow .",
    ),
    "parking": (
        "a parking lot with cars .",
        "cars are parked in a parking lot .",
        "this is a parking lot seen from above .",
        "a large parking area with white lines .",
    ),
    "port": (
        "a port with ships and piers .",
        "boats in a harbour .",
        "this is a port seen from above .",
        "ships are docked at a port .",
    ),
    "residential": (
        "a residential area with houses and trees .",
        "houses in a residential area .",
        "this is a residential area seen from above .",
        "houses with green trees around them .",
    ),
    "river": (
        "a river passes through green land .",
        "a river with trees on its banks .",
        "this is a river seen from above .",
        "blue water flows in a river .",
    ),
    "stadium": (
        "a stadium with a playground .",
        "a large stadium seen from above .",
        "this is a sports stadium .",
        "a playground with a running track .",
    ),
    "storagetanks": (
        "some storage tanks .",
        "round storage tanks seen from above .",
        "this is an oil depot with storage tanks .",
        "an area with cylindrical tanks .",
    ),
}


def generic_captions(scene: Scene) -> list[str]:
    """The generic captions of a scene: its class's :data:`GENERIC_CAPTIONS`, and for an airport
    one sentence about whether planes are parked."""
    out = list(GENERIC_CAPTIONS[scene.cls])
    if scene.cls == "airport":
        out.append("planes are parked at the airport ." if scene.count("airplane") else "an airport without planes .")
    return out


def choose_captions(details: list[Caption | None], generic: list[str], rng: np.random.Generator) -> list[Caption]:
    """An image's :data:`CAPTIONS_PER_IMAGE` captions: 1 or 2 generic sentences, the rest drawn
    from the detailed ones (``None`` entries, sentences a builder could not say, are dropped), in a
    random order."""
    details = [c for c in details if c is not None]
    n_generic = 1 if rng.random() < 0.6 else 2
    n_detail = min(len(details), CAPTIONS_PER_IMAGE - n_generic)
    pick_d = sorted(rng.choice(len(details), size=n_detail, replace=False).tolist()) if n_detail else []
    gen_order = rng.permutation(len(generic)).tolist()
    caps = [details[i] for i in pick_d]
    seen = {c.text for c in caps}
    for i in gen_order:
        if len(caps) >= CAPTIONS_PER_IMAGE:
            break
        if generic[i] not in seen:
            caps.append(Caption(generic[i], []))
            seen.add(generic[i])
    order = rng.permutation(len(caps)).tolist()
    return [caps[i] for i in order]


def tokens_of(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+(?:-[a-z0-9]+)*", text.lower())

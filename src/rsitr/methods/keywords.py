"""Keywords of remote-sensing captions: vocabulary, extraction, and one-word swaps (iEBAKER's KER).

A *keyword* is a word of a caption that carries a key concept the image must confirm: an
object or scene noun ("storage tanks", "harbour"), a count ("three", "many"), a colour ("red"),
a spatial relation ("left", "near") or a size/shape attribute ("round", "large"). Two captions
that differ in one such word describe different images; KER trains the model to tell them apart.

Vocabulary
----------
* :func:`build_vocab` counts, over the training captions, in how many captions each word occurs
  and keeps the ``size`` most frequent words that can be keywords (at least ``min_count``
  captions); colours, counts and relations from the built-in lists are kept whenever they occur
  at least ``min_count`` times, because they are few and exactly what KER is about.
* :func:`load_vocab` reads a vocabulary file: one word per line (the first whitespace-separated
  field; ``#`` comments and blank lines ignored), e.g. the iEBAKER tag vocabularies
  (``rsitmd_tag_vocab_512.txt``: the 512 most frequent words of RSITMD's captions).
* A vocabulary is a plain ``list[str]`` (JSON-able: the method stores it in its options, so a
  checkpoint carries it). Each word's *category* is a function of the word alone
  (:func:`category_of`), so it needs no storage.

Categories (:func:`category_of`) are decided by small built-in word lists, then by suffix:
``colour``, ``count`` (``"one"`` is ``count-one``: a singular count is only swapped with another
singular word), ``relation`` (``relation-dir`` for directions: left/right/top/..., swapped
among themselves; ``relation-near`` for proximity/arrangement: near/beside/around/...),
``attribute`` (size and shape), ``noun`` / ``noun-pl`` (plural by suffix), and ``other``
(verbs, adverbs, function words - extracted as keywords but never swapped). The rules are
English heuristics (no tagger is available offline); a vocabulary word they misjudge only costs
a weaker negative, never a crash.

Swaps
-----
:func:`swap_keyword` replaces *one* keyword occurrence of a caption by another vocabulary word of
the same swap group (never by itself, by a listed synonym of itself, or by a word already in the
caption), keeping the rest of the string byte for byte (case of the first letter kept). The result
is a *hard negative*: grammatical, one key concept away from the original. Synonym groups
(:data:`SYNONYMS`, e.g. car/vehicle, ship/boat/vessel) stop swaps that would not change the
meaning (a false negative); extend them with ``extra_synonyms``.
"""
from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from rsitr.utils.errors import DataError

log = logging.getLogger(__name__)

WORD = re.compile(r"[A-Za-z]+(?:-[A-Za-z]+)*")

COLOURS = frozenset(
    "red white blue black grey gray yellow green orange brown purple pink silver golden khaki cream "
    "beige dark light pale bright colorful colourful reddish greenish bluish dark-green".split()
)
COUNT_ONE = frozenset({"one", "single", "lone"})
COUNTS = frozenset(
    "two three four five six seven eight nine ten eleven twelve many several few numerous multiple "
    "lots dozens countless".split()
)
RELATION_DIR = frozenset(
    "left right top bottom upper lower above below north south east west middle center centre "
    "front behind inside outside".split()
)
RELATION_NEAR = frozenset(
    "near nearby next beside besides around surrounded surrounding between along across among "
    "adjacent opposite close far parallel".split()
)
ATTRIBUTES = frozenset(
    "large small big huge tiny little long short wide narrow tall high low dense densely sparse "
    "sparsely round square rectangular circular oval triangular curved straight winding irregular "
    "regular empty crowded busy quiet thick thin deep shallow vast compact neat orderly scattered "
    "old new flat".split()
)
# never swapped: function words, common caption verbs and fillers
OTHER = frozenset(
    "a an the this that these those there here it its is are was were be been being has have had "
    "of in on at to from by with without and or but as for into onto over under some any each every "
    "another other such very also well almost rather quite mainly especially together which who "
    "whose where while can could see seen look looks like seems make made runs run lies lie flows "
    "passes pass stands stand grows grow surrounds divides divide connects connect contains "
    "includes extends forms form covers cover separates intersect meet cast beat rise stop part "
    "parts piece pieces kind kinds way place picture image photo view aerial shot taken various "
    "lot lots number full half whole through both than then when what all most more less not no only "
    "just same different their them they we you our up down out off about after before because so if "
    "upon within toward towards will would may might must should does do did done get gets got".split()
)
SYNONYMS: tuple[frozenset[str], ...] = tuple(
    frozenset(g.split())
    for g in (
        "car cars vehicle vehicles", "ship ships boat boats vessel vessels", "airplane airplanes plane planes aircraft",
        "field fields parcel parcels plot plots farmland", "umbrella umbrellas parasol parasols",
        "grey gray", "center centre middle central", "top upper above", "bottom lower below", "near nearby next beside besides close adjacent",
        "around surrounded surrounding", "large big huge vast", "small little tiny", "dense densely crowded", "sparse sparsely scattered",
        "many numerous lots several multiple", "colorful colourful", "lake lakes pond ponds", "road roads street streets",
        "woods forest forests", "bareland wasteland", "sea ocean", "harbor harbour port",
    )
)

SWAPPABLE = ("colour", "count", "count-one", "relation-dir", "relation-near", "attribute", "noun", "noun-pl")


def words(text: str) -> list[str]:
    """Lower-cased words of a caption (letters and inner hyphens)."""
    return [m.group(0).lower() for m in WORD.finditer(text)]


def _plural(w: str) -> bool:
    return len(w) > 3 and w.endswith("s") and not w.endswith(("ss", "us", "is"))


def category_of(word: str) -> str:
    """The keyword category of a (lower-case) word; see the module doc."""
    w = word.lower()
    if w in COLOURS:
        return "colour"
    if w in COUNT_ONE:
        return "count-one"
    if w in COUNTS:
        return "count"
    if w in RELATION_DIR:
        return "relation-dir"
    if w in RELATION_NEAR:
        return "relation-near"
    if w in ATTRIBUTES:
        return "attribute"
    if w in OTHER or len(w) < 3 or not w.isalpha() or w.endswith(("ing", "ed", "ly")):
        return "other"
    return "noun-pl" if _plural(w) else "noun"


def is_keyword_candidate(word: str) -> bool:
    """Whether a word may enter a built vocabulary (anything but function words and fillers)."""
    return category_of(word) != "other"


# -- vocabulary --------------------------------------------------------------------------------
def build_vocab(captions: Iterable[str], size: int = 512, min_count: int = 2) -> list[str]:
    """The keyword vocabulary of a caption corpus: the ``size`` words that occur in the most
    captions (document frequency, ties by word), among words that can be keywords and occur in at
    least ``min_count`` captions. Deterministic."""
    if size <= 0:
        raise ValueError(f"vocabulary size must be positive, got {size}")
    df: Counter[str] = Counter()
    for c in captions:
        df.update(set(words(c)))
    cands = [(w, n) for w, n in df.items() if n >= min_count and is_keyword_candidate(w)]
    cands.sort(key=lambda t: (-t[1], t[0]))
    return [w for w, _ in cands[:size]]


def load_vocab(path: str | Path, size: int | None = None) -> list[str]:
    """Read a vocabulary file (one word per line; first field; ``#`` comments and blank lines
    skipped); keep the first ``size`` words when given. Words are lower-cased, duplicates dropped."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"keyword vocabulary file not found: {p}")
    out: list[str] = []
    seen: set[str] = set()
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        w = line.split()[0].lower()
        if not WORD.fullmatch(w):
            raise DataError(f"{p}:{n}: not a word: {line!r}")
        if w not in seen:
            seen.add(w)
            out.append(w)
        if size is not None and len(out) >= size:
            break
    if not out:
        raise DataError(f"{p}: the keyword vocabulary is empty")
    return out


def save_vocab(vocab: Sequence[str], path: str | Path) -> None:
    from rsitr.utils.io import atomic_write_text

    atomic_write_text(Path(path), "".join(f"{w}\n" for w in vocab))


# -- extraction and swaps -----------------------------------------------------------------------
class KeywordIndex:
    """A vocabulary with its categories, swap groups and synonym lookup (built once, reused)."""

    def __init__(self, vocab: Sequence[str], extra_synonyms: Iterable[Iterable[str]] = ()):
        self.vocab = [w.lower() for w in vocab]
        self.index = {w: i for i, w in enumerate(self.vocab)}
        self.category = {w: category_of(w) for w in self.vocab}
        groups: dict[str, list[str]] = {}
        for w in self.vocab:
            c = self.category[w]
            if c in SWAPPABLE:
                groups.setdefault(c, []).append(w)
        self.groups = groups
        syn: dict[str, set[str]] = {}
        for g in list(SYNONYMS) + [frozenset(x.lower() for x in g) for g in extra_synonyms]:
            for w in g:
                syn.setdefault(w, set()).update(g)
        self.synonyms = syn

    def __len__(self) -> int:
        return len(self.vocab)

    def keywords(self, caption: str) -> list[tuple[int, int, str, str]]:
        """Keyword occurrences in ``caption``: ``(start, end, word, category)`` character spans."""
        out = []
        for m in WORD.finditer(caption):
            w = m.group(0).lower()
            if w in self.index:
                out.append((m.start(), m.end(), w, self.category[w]))
        return out

    def swappable(self, caption: str) -> list[tuple[int, int, str, str]]:
        """Keyword occurrences that have at least one valid replacement."""
        present = set(words(caption))
        return [k for k in self.keywords(caption) if self._choices(k[2], k[3], present)]

    def _choices(self, word: str, cat: str, present: set[str]) -> list[str]:
        if cat not in self.groups:
            return []
        banned = self.synonyms.get(word, set()) | {word} | present
        return [w for w in self.groups[cat] if w not in banned]

    def swap(self, caption: str, rng: np.random.Generator) -> tuple[str, str, str] | None:
        """Replace one random swappable keyword occurrence by a random word of its group;
        returns ``(new_caption, old_word, new_word)`` or None when the caption has none."""
        present = set(words(caption))
        occ = [(k, ch) for k in self.keywords(caption) if (ch := self._choices(k[2], k[3], present))]
        if not occ:
            return None
        (start, end, word, _), choices = occ[int(rng.integers(len(occ)))]
        new = choices[int(rng.integers(len(choices)))]
        orig = caption[start:end]
        if orig[:1].isupper():
            new_text = new[:1].upper() + new[1:]
        else:
            new_text = new
        return caption[:start] + new_text + caption[end:], word, new

    def mask(self, caption: str, rng: np.random.Generator, mask_token: str) -> tuple[str, int] | None:
        """Replace one random keyword occurrence by ``mask_token``; returns ``(masked, vocab id)``."""
        occ = self.keywords(caption)
        if not occ:
            return None
        start, end, word, _ = occ[int(rng.integers(len(occ)))]
        return caption[:start] + mask_token + caption[end:], self.index[word]


def swap_keyword(caption: str, vocab: Sequence[str] | KeywordIndex, rng: np.random.Generator | int = 0) -> tuple[str, str, str] | None:
    """Convenience wrapper of :meth:`KeywordIndex.swap`."""
    idx = vocab if isinstance(vocab, KeywordIndex) else KeywordIndex(vocab)
    gen = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    return idx.swap(caption, gen)


def extract_keywords(caption: str, vocab: Sequence[str] | KeywordIndex) -> list[str]:
    """The keywords of ``caption`` (in order, with repeats)."""
    idx = vocab if isinstance(vocab, KeywordIndex) else KeywordIndex(vocab)
    return [k[2] for k in idx.keywords(caption)]

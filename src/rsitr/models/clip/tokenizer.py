"""CLIP's byte-level BPE tokenizer (rsitr's own implementation).

Produces the same token ids as OpenAI CLIP's and open_clip's tokenizer (checked against
open_clip in ``tests/test_clip_tokenizer.py``), using the BPE vocabulary shipped in
``assets/bpe_simple_vocab_16e6.txt.gz`` (MIT, OpenAI; see ``assets/NOTICE.md``).

The pipeline, step by step:

1. Clean: ``ftfy.fix_text``, HTML entities unescaped twice (``&amp;amp;`` -> ``&``), runs of
   whitespace collapsed to one space, ends stripped, lower-cased.
2. Split into pieces with CLIP's pattern: the two special-token strings, the English
   contractions ``'s 't 're 've 'm 'll 'd``, runs of letters, single digits, and runs of
   anything that is neither whitespace, a letter nor a digit. Whitespace is dropped.
3. Each piece's UTF-8 bytes are written with a reversible byte -> character table (printable
   Latin-1 characters stand for themselves, the other 68 bytes for U+0100..U+0143), the last
   symbol gets the end-of-word marker ``</w>``, and adjacent symbols are merged, always
   the lowest-ranked merge present first, until no listed merge applies.
4. A sequence is ``<start_of_text> ids... <end_of_text>`` padded with 0 to the context length;
   a longer one is cut to the context length and its last position set to ``<end_of_text>``
   (open_clip's truncation).
"""
from __future__ import annotations

import functools
import gzip
import html
from collections.abc import Iterable, Sequence
from pathlib import Path

import ftfy
import regex
import torch

from rsitr.utils.errors import RsitrError

DEFAULT_BPE_PATH = Path(__file__).resolve().parent / "assets" / "bpe_simple_vocab_16e6.txt.gz"
DEFAULT_CONTEXT_LENGTH = 77

SOT_TOKEN = "<start_of_text>"
EOT_TOKEN = "<end_of_text>"
END_OF_WORD = "</w>"

# 49408 ids = 256 byte symbols + 256 end-of-word byte symbols + 48894 merges + 2 specials.
N_MERGES = 49152 - 256 - 2
VOCAB_SIZE = 2 * 256 + N_MERGES + 2
PAD_ID = 0

# CLIP's split pattern (matched case-insensitively, as the reference does).
_CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")
_PIECES = (
    regex.escape(SOT_TOKEN),
    regex.escape(EOT_TOKEN),
    *_CONTRACTIONS,
    r"\p{L}+",  # a run of letters
    r"\p{N}",  # one digit / numeric character
    r"[^\s\p{L}\p{N}]+",  # a run of punctuation and symbols
)
SPLIT_PATTERN = regex.compile("|".join(_PIECES), regex.IGNORECASE)


@functools.lru_cache(maxsize=1)
def byte_to_symbol() -> dict[int, str]:
    """The reversible byte -> one-character table of byte-level BPE.

    Bytes whose Latin-1 character is printable and not a space (``!``..``~``, ``¡``..``¬``,
    ``®``..``ÿ``) map to that character; the remaining 68 bytes (controls, space, DEL, NBSP,
    soft hyphen, ...) map, in byte order, to the characters starting at U+0100.
    """
    printable = set(range(0x21, 0x7F)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    table: dict[int, str] = {}
    spare = 0x100
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(spare)
            spare += 1
    return table


def clean_text(text: str) -> str:
    """CLIP's text cleaning: mojibake fix, double HTML unescape, whitespace collapse, lower case."""
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text))
    return " ".join(text.split()).lower()


def _read_merges(path: Path) -> list[tuple[str, str]]:
    try:
        with gzip.open(path, "rt", encoding="utf-8") as fh:
            lines = fh.read().split("\n")
    except FileNotFoundError as exc:
        raise RsitrError(f"{path}: CLIP BPE vocabulary not found (reinstall rsitr: the package ships it)") from exc
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise RsitrError(f"{path}: not a readable gzip'ed BPE merge list ({exc})") from exc
    # line 0 is a version header; CLIP uses exactly the next N_MERGES lines
    body = lines[1 : 1 + N_MERGES]
    merges: list[tuple[str, str]] = []
    for n, line in enumerate(body, start=2):
        parts = line.split()
        if len(parts) != 2:
            raise RsitrError(f"{path}: line {n} is not a merge pair: {line!r}")
        merges.append((parts[0], parts[1]))
    if len(merges) != N_MERGES:
        raise RsitrError(f"{path}: expected {N_MERGES} merges, found {len(merges)}")
    return merges


class ClipTokenizer:
    """CLIP BPE tokenizer; ids identical to open_clip's ``SimpleTokenizer`` (clean='lower').

    ``encode`` gives the ids of one text without special tokens, ``decode`` turns ids back into
    text (end-of-word markers become spaces), and calling the tokenizer on one text or a list
    gives a padded ``LongTensor [B, context_length]`` with start/end tokens.
    """

    pad_id = PAD_ID
    vocab_size = VOCAB_SIZE

    def __init__(
        self,
        bpe_path: str | Path | None = None,
        context_length: int = DEFAULT_CONTEXT_LENGTH,
        max_cache: int = 100_000,
    ) -> None:
        self.bpe_path = Path(bpe_path) if bpe_path is not None else DEFAULT_BPE_PATH
        self.context_length = int(context_length)
        self.max_cache = int(max_cache)

        self._byte_to_sym = byte_to_symbol()
        self._sym_to_byte = {s: b for b, s in self._byte_to_sym.items()}
        merges = _read_merges(self.bpe_path)

        # Vocabulary order: single byte symbols (ordered by their character, which is the
        # printable bytes first, then the remapped ones), the same with the end-of-word marker,
        # one entry per merge in rank order, then the two special tokens.
        base = sorted(self._byte_to_sym.values())
        vocab = base + [s + END_OF_WORD for s in base] + [a + b for a, b in merges] + [SOT_TOKEN, EOT_TOKEN]
        self._token_to_id: dict[str, int] = {}
        for i, tok in enumerate(vocab):
            self._token_to_id[tok] = i  # a repeated string keeps its last id, like the reference
        self._id_to_token: dict[int, str] = {i: t for t, i in self._token_to_id.items()}
        self._rank: dict[tuple[str, str], int] = {}
        for r, pair in enumerate(merges):
            self._rank.setdefault(pair, r)

        self.sot_id = self._token_to_id[SOT_TOKEN]
        self.eot_id = self._token_to_id[EOT_TOKEN]
        self._specials = {SOT_TOKEN: (self.sot_id,), EOT_TOKEN: (self.eot_id,)}
        self._cache: dict[str, tuple[int, ...]] = {}

    # open_clip spelling, for code written against it
    @property
    def sot_token_id(self) -> int:
        return self.sot_id

    @property
    def eot_token_id(self) -> int:
        return self.eot_id

    # ------------------------------------------------------------------ BPE
    def _merge(self, piece: str) -> tuple[int, ...]:
        """Ids of one pre-tokenized piece (already written with byte symbols)."""
        hit = self._cache.get(piece)
        if hit is not None:
            return hit
        symbols = list(piece)
        symbols[-1] += END_OF_WORD
        rank = self._rank
        while len(symbols) > 1:
            best_rank = None
            best = None
            for pair in zip(symbols, symbols[1:]):
                r = rank.get(pair)
                if r is not None and (best_rank is None or r < best_rank):
                    best_rank, best = r, pair
            if best is None:
                break
            left, right = best
            joined = left + right
            out: list[str] = []
            i, n = 0, len(symbols)
            while i < n:
                if i + 1 < n and symbols[i] == left and symbols[i + 1] == right:
                    out.append(joined)
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            symbols = out
        ids = tuple(self._token_to_id[s] for s in symbols)
        if len(self._cache) >= self.max_cache:
            self._cache.clear()
        self._cache[piece] = ids
        return ids

    # ------------------------------------------------------------------ public API
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (cleaned), without start/end tokens and without truncation."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        ids: list[int] = []
        b2s = self._byte_to_sym
        for piece in SPLIT_PATTERN.findall(clean_text(text)):
            special = self._specials.get(piece)
            if special is not None:
                ids.extend(special)
                continue
            ids.extend(self._merge("".join(b2s[b] for b in piece.encode("utf-8"))))
        return ids

    def decode(self, ids: Iterable[int] | torch.Tensor, skip_special_tokens: bool = False) -> str:
        """Text of ``ids``; every end-of-word marker becomes a space (as in the reference).

        With ``skip_special_tokens`` a start token is dropped and decoding stops at the first end
        token, so a padded row of :meth:`__call__` decodes to its text.
        """
        if isinstance(ids, torch.Tensor):
            ids = ids.reshape(-1).tolist()
        parts: list[str] = []
        for i in ids:
            i = int(i)
            if skip_special_tokens:
                if i == self.eot_id:
                    break
                if i == self.sot_id:
                    continue
            tok = self._id_to_token.get(i)
            if tok is None:
                raise ValueError(f"token id {i} is outside the vocabulary (0..{self.vocab_size - 1})")
            parts.append(tok)
        text = "".join(parts)
        raw = bytes(self._sym_to_byte[c] for c in text)
        return raw.decode("utf-8", errors="replace").replace(END_OF_WORD, " ")

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> torch.Tensor:
        """``LongTensor [B, context_length]``: start token, ids, end token, zero padding.

        A text longer than the context is truncated and its last position holds the end token.
        """
        if isinstance(texts, str):
            texts = [texts]
        length = self.context_length if context_length is None else int(context_length)
        if length < 2:
            raise ValueError(f"context_length must be at least 2 (start and end tokens), got {length}")
        out = torch.full((len(texts), length), self.pad_id, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = [self.sot_id, *self.encode(text), self.eot_id]
            if len(ids) > length:
                ids = ids[:length]
                ids[-1] = self.eot_id
            out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out


@functools.lru_cache(maxsize=1)
def default_tokenizer() -> ClipTokenizer:
    """The shared tokenizer over the packaged vocabulary (built once, on first use)."""
    return ClipTokenizer()


def tokenize(texts: str | Sequence[str], context_length: int = DEFAULT_CONTEXT_LENGTH) -> torch.Tensor:
    """CLIP tokenization of one text or a list: ``LongTensor [B, context_length]``, open_clip's ids."""
    return default_tokenizer()(texts, context_length=context_length)


__all__ = [
    "ClipTokenizer",
    "DEFAULT_BPE_PATH",
    "DEFAULT_CONTEXT_LENGTH",
    "PAD_ID",
    "SPLIT_PATTERN",
    "VOCAB_SIZE",
    "byte_to_symbol",
    "clean_text",
    "default_tokenizer",
    "tokenize",
]

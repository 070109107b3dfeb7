"""The Karpathy JSON format, as RSICD, RSITMD, UCM-Captions and Sydney-Captions ship it, and
NWPU-Captions' class-keyed variant.

``{"images": [{"filename", "split", "sentences": [{"raw", "tokens"}, ...], "filepath"?}]}``: any
number of sentences per image; a sentence without ``raw`` falls back to its joined ``tokens``;
``filepath`` is prefixed to the file name when present. NWPU-Captions:
``{"<class>": [{"filename", "split", "raw", "raw_1", ..., "raw_4"}]}`` (images under ``<class>/``),
with the class key as the scene label.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from rsitr.data.captions.base import ParseContext, RawImage, named_entries
from rsitr.data.captions.registry import CaptionFormat, register_format
from rsitr.utils.errors import DataError


def _join(prefix: str, name: str) -> str:
    return f"{prefix.rstrip('/')}/{name}" if prefix else name


@register_format("karpathy")
class Karpathy(CaptionFormat):
    container = "json"
    expects = "a Karpathy object with 'images'"

    def recognises(self, path: Path, obj: Any) -> bool:
        if not isinstance(obj, dict):
            return False
        if isinstance(obj.get("images"), list):
            return True
        # NWPU-Captions' class-keyed variant
        return bool(obj) and all(isinstance(v, list) and v and isinstance(v[0], dict) and "filename" in v[0] for v in obj.values())

    def parse(self, path: Path, obj: Any, ctx: ParseContext) -> list[RawImage]:
        if not isinstance(obj, dict):
            raise DataError(f"{path}: a Karpathy annotation is a JSON object with an 'images' list")
        if "images" not in obj:
            return _parse_nwpu(path, obj, ctx)
        images = obj["images"]
        if not isinstance(images, list):
            raise DataError(f"{path}: 'images' must be a list")
        bad = ctx.bad
        out: list[RawImage] = []
        untokenised = 0
        for it, name, where in named_entries(images, "filename", lambda i: f"{path}: images[{i}]", bad):
            written = _join(str(it.get("filepath") or "").strip(), name)
            r = RawImage(image_id=written, written=written, split=it.get("split"), split_field="split" in it, where=where)
            sents = it.get("sentences")
            if not isinstance(sents, list):
                bad(f"{where}: 'sentences' missing or not a list")
                continue
            for k, s in enumerate(sents):
                if isinstance(s, dict) and "raw" not in s and isinstance(s.get("tokens"), list):
                    untokenised += 1
                    s = {"raw": " ".join(map(str, s["tokens"]))}
                r.captions.append((f"{where} sentences[{k}]", s.get("raw") if isinstance(s, dict) else s))
            out.append(r)
        if untokenised:
            ctx.info.notes.append(f"{untokenised} sentences had no 'raw' text; their tokens were joined")
        return out


def _parse_nwpu(path: Path, obj: dict, ctx: ParseContext) -> list[RawImage]:
    """NWPU-Captions: {class: [{filename, split, raw, raw_1..raw_4}]}."""
    out: list[RawImage] = []
    for cls, items in obj.items():
        if not isinstance(items, list):
            raise DataError(f"{path}: key {cls!r}: expected a list of images")
        for i, it in enumerate(items):
            where = f"{path}: {cls}[{i}]"
            if not isinstance(it, dict) or not isinstance(it.get("filename"), str) or not it["filename"].strip():
                ctx.bad(f"{where}: entry has no 'filename'")
                continue
            keys = sorted((k for k in it if k == "raw" or re.fullmatch(r"raw_\d+", k)),
                          key=lambda k: 0 if k == "raw" else int(k[4:]))
            r = RawImage(image_id=_join(cls, it["filename"].strip()), written=_join(cls, it["filename"].strip()),
                         split=it.get("split"), split_field="split" in it, label=str(cls), where=where)
            r.captions = [(f"{where} {k}", it[k]) for k in keys]
            out.append(r)
    return out

"""The PIR/HarMA JSON list: ``[{"image": "test/parking_229.tif", "caption": str | [str, ...]}]``.

Entries of one image are merged (RSITMD's train file: 17,175 entries -> 3,435 images); the split
comes from the path prefix ``train/``, ``val/``, ``test/`` unless ``split=`` is given.
``label_name`` is kept as the scene label.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from rsitr.data.captions.base import ParseContext, RawImage, named_entries
from rsitr.data.captions.registry import CaptionFormat, register_format
from rsitr.data.types import KNOWN_SPLITS
from rsitr.utils.errors import DataError


@register_format("pir")
class Pir(CaptionFormat):
    container = "json"
    expects = "a PIR/HarMA list of {'image', 'caption'} entries"

    def recognises(self, path: Path, obj: Any) -> bool:
        return isinstance(obj, list) and bool(obj) and isinstance(obj[0], dict) and "image" in obj[0] and "caption" in obj[0]

    def parse(self, path: Path, obj: Any, ctx: ParseContext) -> list[RawImage]:
        if not isinstance(obj, list):
            raise DataError(f"{path}: a PIR/HarMA annotation is a JSON list of {{'image', 'caption'}} entries")
        bad, split = ctx.bad, ctx.split
        by_id: dict[str, RawImage] = {}
        for it, img, where in named_entries(obj, "image", lambda i: f"{path}: entry {i}", bad):
            if "caption" not in it:
                bad(f"{where}: entry has no 'caption'")
                continue
            r = by_id.get(img)
            if r is None:
                prefix = img.replace("\\", "/").split("/", 1)[0] if "/" in img.replace("\\", "/") else None
                guess = prefix if split is None and prefix in KNOWN_SPLITS else None
                label = it.get("label_name") if isinstance(it.get("label_name"), str) else None
                r = by_id[img] = RawImage(image_id=img, written=img, split=guess, split_field=False, label=label, where=where)
            caps = it["caption"] if isinstance(it["caption"], list) else [it["caption"]]
            r.captions.extend((f"{where} caption[{k}]" if isinstance(it["caption"], list) else where, c) for k, c in enumerate(caps))
        if len(by_id) < len(obj):
            ctx.info.notes.append(f"{len(obj)} entries merged into {len(by_id)} images")
        return list(by_id.values())

"""Cache folders: what rsitr keeps to reuse, listed and pruned (``rsitr cache ls|prune``).

Two kinds of items live in cache folders, each named by a content key, so they pile up as
weights, datasets and code change (a trunk cache of RSICD is 2-3 GB; an exported text tower
~90 MB per trained model):

- trunk-feature caches ``img-<key>.pt`` / ``txt-<key>.pt`` (:mod:`rsitr.models.trunk_cache`; a run's
  ``cache_dir``), each with a ``.json`` description beside it, and the stored passes of distillation
  teachers over them ``tch-<key>.pt`` (:mod:`rsitr.train.distill`, same folder);
- exported ONNX graphs ``<part>-<key>.onnx`` (:mod:`rsitr.models.engine`; ``$RSITR_ONNX_CACHE``,
  default ``~/.cache/rsitr/onnx``), each with its ``.json`` export record.

An item's last use is the modification time of its main file: the readers call
:func:`mark_used` on every load. :func:`prune` removes the items not used for a given time and
the temporaries of writers that died (``.NAME.PID.*.tmp``, the pid gone); it touches nothing else
in the folder, whatever it holds.
"""
from __future__ import annotations

import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TypeVar

from rsitr.utils.errors import RsitrError
from rsitr.utils.io import atomic_path, atomic_write_json, pid_alive, temporary_of

log = logging.getLogger(__name__)
T = TypeVar("T")

# the names the writers give (a content key of 16-64 hex digits); nothing else is ever pruned
_ITEMS = (
    (re.compile(r"^(img|txt)-[0-9a-f]{16,64}\.pt$"), "trunk cache"),
    (re.compile(r"^tch-[0-9a-f]{16,64}\.pt$"), "teacher pass"),
    (re.compile(r"^[a-z][a-z0-9_]*-[0-9a-f]{16,64}\.onnx$"), "onnx graph"),
)


@dataclass
class CacheItem:
    path: Path
    kind: str  # "trunk cache" | "teacher pass" | "onnx graph"
    size: int  # bytes, the description beside it included
    last_used: float  # epoch seconds
    description: dict[str, Any] = field(default_factory=dict)  # the .json beside it ({} when absent or unreadable)

    @property
    def sidecar(self) -> Path:
        return self.path.with_suffix(".json")

    def summary(self) -> str:
        """One line on what the item holds, from its description."""
        d = self.description
        if not d:
            return "(no description: written before rsitr recorded them)"
        if self.kind == "teacher pass":
            return (f"{d.get('backbone', '?')} teacher (mode {d.get('mode', '?')}, sha256 {str(d.get('teacher_sha256', '?'))[:12]}), "
                    f"{d.get('views', '?')} views x {d.get('entries', '?')} images / {d.get('captions', '?')} captions")
        if self.kind == "onnx graph":
            return f"{d.get('backbone', '?')} {d.get('part', '?')}, torch {d.get('torch', '?')}" + ("" if d.get("exact", True) else ", not exact (unused)")
        bits = [str(d.get("backbone", "?")), str(d.get("what", "?"))]
        if d.get("what") == "image":
            bits.append(f"view {d.get('view')}" + (f" seed {d['seed']}" if d.get("seed") is not None else ""))
        if d.get("cut"):
            bits.append(f"cut {d['cut']}")
        bits.append(f"{d.get('entries', '?')} images" + (f" / {d['captions']} captions" if d.get("what") == "text" else ""))
        if d.get("dataset"):
            bits.append(str(d["dataset"]))
        return ", ".join(bits)


def mark_used(path: str | os.PathLike) -> None:
    """Record that a cache item was used now (its mtime; best effort: a read-only cache still serves)."""
    try:
        os.utime(path)
    except OSError:
        pass


class StaleItem(RsitrError):
    """Raised by a loader of :func:`load_or_compute`: the stored item is readable but not the one
    wanted (another shape, a record saying it cannot be used); the message says how."""


def load_or_compute(path: Path | None, what: str, *, load: Callable[[Path], T], compute: Callable[[], T],
                    save: Callable[[T, Path], None], describe: Callable[[T], dict | None] | None = None) -> T:
    """The one policy of every item rsitr keeps in a cache folder to reuse (trunk caches, teacher
    passes, exported ONNX graphs):

    - ``path`` None (no cache folder): ``compute()``.
    - an item at ``path``: ``load(path)``, its use recorded (:func:`mark_used`). An item that cannot
      be used (``load`` raises :class:`RsitrError`: unreadable, truncated, of another shape) costs
      a recomputation, never the run: one warning names it and why, and it is replaced.
    - computed: stored at ``path`` atomically (``save(value, temporary)``, renamed in place), then
      ``describe(value)`` as the ``.json`` beside it (what ``rsitr cache ls`` shows). A folder it
      cannot be stored in (read-only, full, a folder where the file goes) costs the next run a
      recomputation, never this one: one warning, and the value is used.
    """
    if path is not None and path.is_file():
        try:
            value = load(path)
        except RsitrError as exc:
            log.warning("%s; computing it again (it will be replaced)", _one_line(exc))
        else:
            mark_used(path)
            log.debug("%s read from %s", what, path)
            return value
    value = compute()
    if path is not None:
        try:
            with atomic_path(path) as tmp:
                save(value, tmp)
            description = describe(value) if describe is not None else None
            if description is not None:
                atomic_write_json(path.with_suffix(".json"), description)
        except (OSError, RuntimeError) as exc:  # torch.save reports a failed write as RuntimeError
            log.warning("the %s is not stored in %s (%s); later runs will compute it again", what, path.parent, _one_line(exc))
    return value


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def _is_item_name(name: str) -> bool:
    """``name`` is a cache item's file or its description."""
    names = [name[: -len(".json")] + ext for ext in (".pt", ".onnx")] if name.endswith(".json") else [name]
    return any(rx.match(n) for n in names for rx, _ in _ITEMS)


def scan(folder: str | os.PathLike) -> list[CacheItem]:
    """The cache items of ``folder``, least recently used first. A missing folder has none; a
    path that is not a folder is an error."""
    folder = Path(folder).expanduser()
    if not folder.exists():
        return []
    if not folder.is_dir():
        raise RsitrError(f"{folder}: not a folder")
    items = []
    for p in folder.iterdir():
        kind = next((k for rx, k in _ITEMS if rx.match(p.name)), None)
        if kind is None or not p.is_file():
            continue
        try:
            st = p.stat()
        except OSError:  # removed meanwhile
            continue
        side, desc, size = p.with_suffix(".json"), {}, st.st_size
        if side.is_file():
            size += side.stat().st_size
            try:
                desc = json.loads(side.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError):
                desc = {}
            if not isinstance(desc, dict):
                desc = {}
        items.append(CacheItem(p, kind, size, st.st_mtime, desc))
    return sorted(items, key=lambda it: (it.last_used, it.path.name))


def dead_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Temporary files of cache items of ``folder`` whose writer (the pid in the name) is gone."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        return []
    out = []
    for p in folder.iterdir():
        owner = temporary_of(p.name)
        if owner and _is_item_name(owner[0]) and p.is_file() and not pid_alive(owner[1]):
            out.append(p)
    return sorted(out)


@dataclass
class PruneResult:
    removed: list[CacheItem]
    temporaries: list[Path]
    kept: list[CacheItem]
    freed: int  # bytes

    def to_dict(self) -> dict[str, Any]:
        return {"removed": [str(it.path) for it in self.removed], "temporaries": [str(p) for p in self.temporaries],
                "kept": len(self.kept), "freed_bytes": self.freed}


def prune(folder: str | os.PathLike, unused_for: float, *, dry_run: bool = False, now: float | None = None) -> PruneResult:
    """Remove the items of ``folder`` not used for ``unused_for`` seconds (with their descriptions)
    and the temporaries of dead writers. ``dry_run``: say what would go, remove nothing."""
    if unused_for < 0:
        raise RsitrError(f"the unused time must be >= 0, got {unused_for}")
    now = time.time() if now is None else now
    items = scan(folder)
    old = [it for it in items if now - it.last_used >= unused_for]
    kept = [it for it in items if now - it.last_used < unused_for]
    temps = dead_temporaries(folder)
    freed = sum(it.size for it in old)
    for p in temps:
        try:
            freed += p.stat().st_size
        except OSError:
            pass
    if not dry_run:
        for it in old:
            # the main file first: a half-pruned item is then an orphan description, never a cache without one
            for p in (it.path, it.sidecar):
                try:
                    p.unlink()
                except FileNotFoundError:
                    pass
        for p in temps:
            try:
                p.unlink()
            except FileNotFoundError:
                pass
    return PruneResult(old, temps, kept, freed)


def human_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def render(folder: str | os.PathLike, items: list[CacheItem], now: float | None = None) -> str:
    """A markdown table of ``items`` (of ``folder``): kind, size, days since last use, file, what it holds."""
    now = time.time() if now is None else now
    lines = [f"### {folder}: {len(items)} item{'s' if len(items) != 1 else ''}, {human_size(sum(it.size for it in items))}", "",
             "| kind | size | unused (days) | file | holds |", "|---|---:|---:|---|---|"]
    for it in items:
        lines.append(f"| {it.kind} | {human_size(it.size)} | {max(0.0, now - it.last_used) / 86400:.1f} | {it.path.name} | {it.summary()} |")
    return "\n".join(lines)

"""The caption-format registry: one :class:`CaptionFormat` per format, registered by name with
``@register_format(name)``; :func:`list_formats` gives the names in registration order, which is
also the order detection asks them in (the first that recognises a file wins, so a stricter
format registers before a looser one: iEBAKER's ``filename,title`` before the simple CSV)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, ClassVar

from rsitr.data.captions.base import ParseContext, RawImage
from rsitr.data.captions.files import looks_json, read_csv, read_json
from rsitr.utils.errors import DataError

CONTAINERS = ("json", "csv")


class CaptionFormat:
    """One annotation format. ``container`` says how the file is read: ``"json"`` (content: the
    parsed JSON value) or ``"csv"`` (content: the lower-cased header and the (line, row) pairs of
    :func:`~rsitr.data.captions.files.read_csv`)."""

    name: ClassVar[str] = ""
    container: ClassVar[str] = "json"
    expects: ClassVar[str] = ""  # how an error names what this format looks like

    def recognises(self, path: Path, content: Any) -> bool:
        """Whether ``content`` (read from ``path``) is in this format."""
        raise NotImplementedError

    def parse(self, path: Path, content: Any, ctx: ParseContext) -> list[RawImage]:
        """The images the file lists, before split, caption and path checks."""
        raise NotImplementedError


_FORMATS: dict[str, CaptionFormat] = {}


def register_format(name: str) -> Callable[[type[CaptionFormat]], type[CaptionFormat]]:
    """Class decorator: register a :class:`CaptionFormat` subclass under ``name``."""
    def register(cls: type[CaptionFormat]) -> type[CaptionFormat]:
        if name in _FORMATS:
            raise ValueError(f"caption format {name!r} is already registered")
        if cls.container not in CONTAINERS:
            raise ValueError(f"caption format {name!r}: container must be one of {CONTAINERS}, got {cls.container!r}")
        cls.name = name
        _FORMATS[name] = cls()
        return cls

    return register


def list_formats() -> list[str]:
    """Names of the registered formats, in registration (= detection) order."""
    return list(_FORMATS)


def get_format(name: str) -> CaptionFormat:
    try:
        return _FORMATS[name]
    except KeyError:
        raise DataError(f"format={name!r}: must be auto or one of {', '.join(_FORMATS)}") from None


def container_of(path: Path) -> str:
    return "json" if looks_json(path) else "csv"


def read_content(path: Path, container: str) -> Any:
    return read_json(path) if container == "json" else read_csv(path)


def recognise(path: Path, container: str, content: Any) -> CaptionFormat:
    """The first registered format of ``container`` that recognises the content, else a
    DataError saying what was found and what each format expects."""
    candidates = [f for f in _FORMATS.values() if f.container == container]
    for fmt in candidates:
        if fmt.recognises(path, content):
            return fmt
    expected = " or ".join(f.expects for f in candidates)
    if container == "json":
        raise DataError(f"{path}: unrecognised JSON layout ({type(content).__name__}); expected {expected}")
    raise DataError(f"{path}: unrecognised CSV header {content[0]}; expected {expected}")


def detect_format(path: str | Path) -> str:
    """The caption format of an annotation file (see :mod:`rsitr.data.captions`)."""
    path = Path(path)
    container = container_of(path)
    return recognise(path, container, read_content(path, container)).name

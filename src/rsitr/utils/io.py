"""Atomic file writes: nothing is ever written half (write to a temporary name, then rename)."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from glob import escape as glob_escape
import tempfile
from pathlib import Path
from typing import Any, Iterator


def _umask() -> int:
    """The process umask (read from /proc where there is one: setting it to read it back is not
    thread-safe)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def output_error_message(path: str | os.PathLike, why: "OSError | str") -> str:
    """``PATH: cannot write (reason)``, one line, for an output path that cannot be written."""
    reason = why if isinstance(why, str) else (why.strerror or str(why) or type(why).__name__)
    where = ""
    if isinstance(why, OSError) and why.filename is not None and Path(str(why.filename)) != Path(path):
        where = f" at {why.filename}"  # the part of the path that failed (a parent that is a file...)
    return f"{path}: cannot write ({reason}{where})".replace("\n", " ")


class OutputError(OSError):
    """An output file or folder that cannot be written; its message is one line naming the path
    (the CLI prints it as is, as it prints :class:`~rsitr.utils.errors.RsitrError`)."""

    def __init__(self, path: str | os.PathLike, why: "OSError | str") -> None:
        super().__init__(output_error_message(path, why))
        self.path = Path(path)


def make_output_dir(path: str | os.PathLike) -> Path:
    """Create the output folder ``path`` (and its parents); one :class:`OutputError` naming it when
    it cannot be (an existing file, a read-only file system, a parent that is a file)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(path, "exists and is not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(path, exc) from exc
    return path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is renamed onto ``path``.

    On an exception the temporary file is removed and ``path`` is left untouched.
    """
    path = Path(path)
    if path.is_dir():
        raise OutputError(path, "is a folder, not a file")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_orphans(path)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise OutputError(path, exc) from exc
    mode = 0o666 & ~_umask()
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        try:
            # mkstemp creates 0600, and so does a writer that replaces the file (safetensors'
            # save_file): the file gets, once written, the mode a plain open() would give it (0644
            # under the usual umask 022), so that an index built by one user can be served by another
            os.chmod(tmp_path, mode)
            with open(tmp_path, "rb+") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp_path, path)
        except OSError as exc:
            raise OutputError(path, exc) from exc
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[^.]*\.tmp$")


def temporary_of(filename: str) -> tuple[str, int] | None:
    """``(target name, writer pid)`` of an :func:`atomic_path` temporary's file name
    (``.NAME.PID.RANDOM.tmp``), else None."""
    m = _TEMPORARY.match(filename)
    return (m["name"], int(m["pid"])) if m else None


def _remove_orphans(path: Path) -> None:
    """Temporaries of ``path`` left by a writer that was killed (its pid, in the name, is gone)."""
    for tmp in path.parent.glob(f".{glob_escape(path.name)}.*.tmp"):
        owner = temporary_of(tmp.name)
        if owner is None or owner[0] != path.name or pid_alive(owner[1]):
            continue
        try:
            tmp.unlink()
        except OSError:
            pass


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (one of another user counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def cached_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file, computed once per process for a given (resolved path, size, mtime): a
    file pinned by its digest and then loaded (a distillation teacher, a tower's weights) is read
    for hashing once."""
    p = Path(path).resolve()
    st = p.stat()
    key = (str(p), st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        _SHA_CACHE[key] = sha256_file(p)
    return _SHA_CACHE[key]


def read_json(path: str | os.PathLike, what: str = "JSON file") -> Any:
    """Parse a JSON file; an unreadable or invalid file is an ``RsitrError`` naming it and ``what``
    it should have been."""
    from rsitr.utils.errors import RsitrError

    p = Path(path)
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RsitrError(f"{p}: unreadable {what} ({exc})") from exc


def read_yaml(path: str | os.PathLike, what: str = "YAML file") -> Any:
    """Parse a YAML file (an empty file is None); an unreadable file, one that is not UTF-8 text
    or not valid YAML is an ``RsitrError`` of one line naming it, ``what`` it should have been and,
    for a syntax error, the line and column."""
    return parse_yaml(read_text(path, what), path, what)


def read_text(path: str | os.PathLike, what: str = "text file") -> str:
    """A UTF-8 text file; unreadable or not UTF-8: an ``RsitrError`` of one line naming it and ``what``."""
    from rsitr.utils.errors import RsitrError

    p = Path(path)
    try:
        return p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RsitrError(f"{p}: unreadable {what} ({' '.join(str(exc).split())})") from None


def parse_yaml(text: str, path: str | os.PathLike, what: str = "YAML file") -> Any:
    """``text`` (read from ``path``) parsed as YAML; a syntax error is one line naming ``path``, the
    line and column, and ``what`` it should have been."""
    import yaml

    from rsitr.utils.errors import RsitrError

    p = Path(path)
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        why = getattr(exc, "problem", None) or str(exc)
        raise RsitrError(f"{p}: not valid YAML{where}: {' '.join(str(why).split())} ({what})") from None


def jsonable(value: Any) -> Any:
    """``value`` as plain JSON-able Python: mappings (keys as strings), lists (from lists and
    tuples), numbers, strings, booleans, None; numpy arrays and scalars converted, anything else
    (paths...) as its string. Used for what goes into checkpoints, manifests and reports."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    import numpy as np

    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    return str(value)

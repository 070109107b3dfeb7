"""The package version (one place; ``rsitr.__version__`` re-exports it), and the commit of the
checkout the code runs from (what cards and bench records name as the code of a number)."""
from __future__ import annotations

import subprocess
from pathlib import Path

__version__ = "0.1.0"


def git_commit(where: str | Path | None = None) -> str | None:
    """The commit of the checkout ``where`` (default: the one this rsitr's code runs from, whatever the
    working directory), with ``-dirty`` when it has uncommitted changes; None outside a checkout."""
    where = Path(__file__).resolve().parent if where is None else where  # the package's folder
    try:
        head = subprocess.run(["git", "-C", str(where), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(where), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=10)
        return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


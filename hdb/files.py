"""Writing a file or a folder whole, or not at all: what a killed or failed run leaves is never mistaken for done."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

PARTIAL_SUFFIX = ".partial"


def write_atomically(path: str | Path, write: Callable[[Path], None]) -> None:
    """Make the file or folder `path` by `write(partial)`, then a rename of `partial` to `path`.

    `partial` is `path` with ".partial" appended, beside it (an earlier run's is removed first). Until the
    rename, `path` is untouched: an existing one is replaced only once `write` has succeeded, and a `write`
    that raises leaves nothing of its attempt behind. A kill leaves at most the `partial`.
    """
    path = Path(path)
    partial = path.with_name(path.name + PARTIAL_SUFFIX)
    _remove(partial)
    try:
        write(partial)
        if path.is_dir():
            shutil.rmtree(path)  # a rename replaces a file in one step, but a folder only once the old one is gone
        partial.replace(path)
    except BaseException:
        _remove(partial)
        raise


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)

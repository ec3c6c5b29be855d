"""What lets a long toy run go on where it stopped (`hdb toy --resume`): each phase's output kept in the run's work
folder and read back instead of made again. Stage 1 resumes by itself (hdb.preoptimize skips the identities it has
weights for); `kept` keeps the rest: the base, the recogniser, each hypernetwork and each held-out person's scores.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")
DONE = "done"  # the file a phase's folder gets last: what is there is whole
FIGURES = "figures.json"


def kept(folder: Path, make: Callable[[], T], save: Callable[[T, Path], None], load: Callable[[Path], T]) -> T:
    """`load(folder)` where an earlier run finished this phase there; otherwise the phase made afresh (`make`, in an
    emptied `folder`, which it may use) and saved (`save`), then marked done."""
    if (folder / DONE).is_file():
        return load(folder)
    shutil.rmtree(folder, ignore_errors=True)  # a phase stopped half way: its leftovers must not mix in
    folder.mkdir(parents=True)
    made = make()
    save(made, folder)
    (folder / DONE).touch()
    return made


def save_json(figures: dict, folder: Path) -> None:
    """A phase's figures, for `load_json`."""
    (folder / FIGURES).write_text(json.dumps(figures))


def load_json(folder: Path) -> dict:
    return json.loads((folder / FIGURES).read_text())

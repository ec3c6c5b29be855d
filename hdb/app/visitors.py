"""Every file the app keeps for its visitors, and each visitor's session: nothing is shared between sessions."""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from hdb.errors import HdbError
from hdb.personal_file import PersonalWeights

EXAMPLE_NAMES = ("obama.jpg", "grace_hopper.jpg", "astronaut.png")  # shipped photos, shared by every visitor
SESSIONS = "hdb_sessions"  # inside Gradio's cache: what is served from there is served in place, never copied
ORPHAN_SECONDS = 600  # an upload no visitor has named in an event by then is removed (the page names it at once)
DEPARTED_SECONDS = 2 * 3600  # how long a departed visitor is remembered (past Gradio's hour-long session expiry)


class VisitorLeft(HdbError):
    """The visitor this work was for has left: nothing more is written for them."""


class VisitorFiles:
    """Every file the app keeps for visitors, under one folder the app owns: <temp>/hdb_app/<pid>-<started>/.

    gradio/ is Gradio's cache: uploads and served pictures, which Gradio empties of files older than an hour.
    gradio/hdb_sessions/<visitor>/<random>/ holds one group of files made for a visitor (their aligned face, a
    batch of pictures, their personal file with its LoRA exports). Gradio serves them in place, and a folder's
    random name is the capability to read it: a link to one picture names no other file. A visitor keeps only the
    latest group of each kind.

    Which files each visitor sent is kept here, in memory, never in a served file: when a visitor leaves (the
    page's unload) or their session expires, their folder goes, and so does every file they sent, unless another
    visitor sent the very same file (Gradio keeps one copy of identical uploads) or it is a shipped example.
    Nothing is written for a visitor who has left. Uploads that no visitor ever names in an event are removed
    after ORPHAN_SECONDS (`sweep_orphans`). The whole folder goes when the app stops, and at start the folders of
    app processes that no longer run are swept. Every method takes one lock: handlers run in threads at once.
    """

    def __init__(self, parent: Path | None = None, examples: list[Path] | None = None) -> None:
        self.parent = parent or Path(tempfile.gettempdir()) / "hdb_app"
        self.swept = self.sweep()
        self.root = self.parent / _owner(os.getpid())
        self.sessions.mkdir(parents=True, exist_ok=True)
        self.example_digests = {_digest(path) for path in examples or []}  # examples by content, not by name
        self.lock = threading.Lock()
        self.sent: dict[str, set[Path]] = {}  # visitor -> the files they sent
        self.groups: dict[tuple[str, str], Path] = {}  # (visitor, kind) -> the folder of their latest group
        self.departed: dict[str, float] = {}  # visitor -> when they left

    @property
    def gradio_cache(self) -> Path:
        return self.root / "gradio"

    @property
    def sessions(self) -> Path:
        return self.gradio_cache / SESSIONS

    def sweep(self) -> list[Path]:
        """Remove what app processes that have stopped left behind; returns what was removed.

        A folder is named by its process's id and start time: a process id that a new process reuses does not
        keep a dead app's folder alive.
        """
        stale = [folder for folder in self.parent.glob("*") if folder.is_dir() and not _runs(folder.name)]
        for folder in stale:
            shutil.rmtree(folder, ignore_errors=True)
        return stale

    def write(self, session_hash: str, kind: str, writers: dict[str, Callable[[Path], object]]) -> list[Path]:
        """Write one group of files for a visitor (name -> a function that writes that path), in a folder of its
        own, replacing their previous group of this `kind`. Refused (VisitorLeft) once the visitor has left: a job
        that outlives its visitor writes nothing."""
        visitor = _visitor(session_hash)
        with self.lock:
            if visitor in self.departed:
                raise VisitorLeft("Your session has ended; reload the page to start again")
            folder = self.sessions / visitor / secrets.token_urlsafe(16)
            folder.mkdir(parents=True)
            try:
                for name, write in writers.items():
                    write(folder / name)
            except BaseException as error:
                shutil.rmtree(folder, ignore_errors=True)
                if isinstance(error, OSError):  # a full disk, say: the visitor hears it in one line
                    raise HdbError(f"Could not save your files on the server ({error.strerror or error})") from None
                raise
            previous = self.groups.get((visitor, kind))
            self.groups[(visitor, kind)] = folder
        if previous is not None:
            shutil.rmtree(previous, ignore_errors=True)
        return [folder / name for name in writers]

    def note_upload(self, session_hash: str, path: str | Path) -> None:
        """Remember a file this visitor sent (a photo, a personal file), to delete it when they leave.

        A file made for a visitor is never taken as an upload: a link to it may have been shared, and another
        visitor must not read it into their session (or delete it when they leave)."""
        path = Path(path)
        if path.resolve().is_relative_to(self.sessions.resolve()):
            raise HdbError(f"{path.name} was not uploaded here; upload the file itself")
        visitor = _visitor(session_hash)
        with self.lock:
            if visitor not in self.departed:
                self.sent.setdefault(visitor, set()).add(path)

    def forget(self, session_hash: str) -> None:
        """A visitor left: delete what was made for them and what they sent, but what another visitor sent too or
        the examples; from now on nothing is written for them."""
        visitor = _visitor(session_hash)
        with self.lock:
            now = time.time()
            self.departed = {v: t for v, t in self.departed.items() if now - t < DEPARTED_SECONDS}
            self.departed[visitor] = now
            theirs = self.sent.pop(visitor, set())
            others = set().union(*self.sent.values())
            for kind in [k for v, k in self.groups if v == visitor]:
                del self.groups[(visitor, kind)]
            for path in theirs - others:
                self._remove_upload(path)
            shutil.rmtree(self.sessions / visitor, ignore_errors=True)

    def sweep_orphans(self, older_than: float = ORPHAN_SECONDS) -> list[Path]:
        """Remove uploads no visitor has named in an event for `older_than` seconds (posted without an event, or
        by a visitor who never went on); returns them. The page names an upload as soon as it arrives."""
        with self.lock:
            named = set().union(*self.sent.values())
            deadline = time.time() - older_than
            candidates = [
                path
                for path in self.gradio_cache.rglob("*")
                if not path.is_relative_to(self.sessions) and path.is_file() and path not in named
            ]
            orphans = [path for path in candidates if _modified(path) < deadline]
            return [path for path in orphans if self._remove_upload(path)]

    def _remove_upload(self, path: Path) -> bool:
        """Delete an upload in Gradio's cache (never a file made for a visitor, never an example); called locked."""
        inside = path.is_relative_to(self.gradio_cache) and not path.is_relative_to(self.sessions)
        if not inside or not path.is_file() or _digest(path) in self.example_digests:
            return False
        path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # Gradio's one-file folder for the upload
            path.parent.rmdir()
        return True

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def _visitor(session_hash: str) -> str:
    # the browser chooses the session hash: hashed, it can only ever name a folder in sessions/
    return hashlib.sha256(session_hash.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _modified(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:  # removed meanwhile
        return float("inf")


def _start_time(pid: int) -> str | None:
    """When process `pid` started (clock ticks since boot, Linux), '' where that cannot be read, None if it is gone."""
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return None
    except PermissionError:  # another user's process
        pass
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def _owner(pid: int) -> str:
    return f"{pid}-{_start_time(pid) or 0}"


def _runs(name: str) -> bool:
    """Whether the app process that made folder `name` (`<pid>-<start time>`) still runs."""
    pid, _, started = name.partition("-")
    if not pid.isdigit():
        return True  # not an app folder: leave it alone
    return _owner(int(pid)) == name if started else False  # old-style folders (a bare pid) are swept


@dataclass
class Session:
    """One visitor's person: nothing here is visible to another session."""

    key: str  # Gradio's session hash: names the visitor's files (VisitorFiles)
    weights: PersonalWeights | None = None
    references: list | None = None  # face descriptors of the visitor's photos, for the identity scores

"""Every file the app keeps for its visitors, and each visitor's session: nothing is shared between sessions."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from hdb.personal_file import PersonalWeights

EXAMPLE_NAMES = ("obama.jpg", "grace_hopper.jpg", "astronaut.png")  # shipped photos, shared by every visitor
UPLOADS_FILE = "uploads.jsonl"  # in a visitor's folder: the files they sent, one JSON string a line
SESSIONS = "hdb_sessions"  # inside Gradio's cache: what is served from there is served in place, never copied


class VisitorFiles:
    """Every file the app keeps for visitors, under one folder the app owns: <temp>/hdb_app/<pid>-<started>/.

    gradio/ is Gradio's cache: uploads and served pictures, which Gradio empties of files older than an hour.
    gradio/hdb_sessions/<hash of the session>/ holds a visitor's personal file, LoRA exports and the list of
    files they sent. It sits inside the cache so that Gradio serves the downloads from there instead of
    copying them into the cache. When the visitor leaves (the page's unload) or their session expires, the
    folder goes, and so does every file they sent, unless another session sent the very same file (Gradio
    keeps one copy of identical uploads) or it is one of the shipped example photos. The whole folder goes
    when the app stops, and at start the folders of app processes that no longer run are swept. Everything
    lives on disk, so a forked ZeroGPU worker's writes are seen by the main process that cleans up.
    """

    def __init__(self, parent: Path | None = None, examples: list[Path] | None = None) -> None:
        self.parent = parent or Path(tempfile.gettempdir()) / "hdb_app"
        self.swept = self.sweep()
        self.root = self.parent / _owner(os.getpid())
        self.sessions.mkdir(parents=True, exist_ok=True)
        self.example_digests = {_digest(path) for path in examples or []}  # examples by content, not by name

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

    def folder(self, session_hash: str) -> Path:
        folder = self._session_folder(session_hash)
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def _session_folder(self, session_hash: str) -> Path:
        # the browser chooses the session hash: hashed again, it can only ever name a folder in sessions/
        return self.sessions / hashlib.sha256(session_hash.encode()).hexdigest()[:32]

    def note_upload(self, session_hash: str, path: str | Path) -> None:
        """Remember a file this visitor sent (a photo, a personal file), to delete it when they leave."""
        with (self.folder(session_hash) / UPLOADS_FILE).open("a", encoding="utf-8") as uploads:
            uploads.write(json.dumps(str(path)) + "\n")  # escaped: no file name can break the line apart

    def _uploads(self, folder: Path) -> set[Path]:
        path = folder / UPLOADS_FILE
        lines = path.read_text(encoding="utf-8").split("\n") if path.is_file() else []
        return {Path(json.loads(line)) for line in lines if line}

    def forget(self, session_hash: str) -> None:
        """Delete a visitor's files and the files they sent, except those another session or the examples use."""
        folder = self._session_folder(session_hash)
        theirs = self._uploads(folder)
        others = set().union(*(self._uploads(f) for f in self.sessions.iterdir() if f.is_dir() and f != folder))
        for path in theirs - others:
            if path.is_relative_to(self.root) and path.is_file() and _digest(path) not in self.example_digests:
                path.unlink(missing_ok=True)
                with contextlib.suppress(OSError):  # Gradio's one-file folder for the upload
                    path.parent.rmdir()
        shutil.rmtree(folder, ignore_errors=True)

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


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

    key: str  # Gradio's session hash: names the visitor's folder (VisitorFiles.folder)
    folder: Path
    weights: PersonalWeights | None = None
    references: list | None = None  # face descriptors of the visitor's photos, for the identity scores

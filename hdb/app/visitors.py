"""Every file the app keeps for its visitors, and each visitor's session: nothing is shared between sessions."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from hdb.personal_file import PersonalWeights

EXAMPLE_NAMES = ("obama.jpg", "grace_hopper.jpg", "astronaut.png")  # shipped photos, shared by every visitor
UPLOADS_FILE = "uploads.txt"  # in a visitor's folder: the photos they uploaded, deleted with it


class VisitorFiles:
    """Every file the app keeps for visitors, under one folder the app owns: <temp>/hdb_app/<process id>/.

    sessions/<hash of the session>/ holds a visitor's personal file, LoRA exports and the list of photos they
    uploaded; all of it goes when the visitor leaves (the page's unload) or their session expires.
    gradio/ is Gradio's cache (uploads, served pictures), which Gradio empties of files older than an
    hour. The whole folder goes when the app stops, and at start the folders of app processes that no
    longer run (killed, crashed) are swept. Everything lives on disk, so a forked ZeroGPU worker's
    writes are seen by the main process that cleans up.
    """

    def __init__(self, parent: Path | None = None) -> None:
        self.parent = parent or Path(tempfile.gettempdir()) / "hdb_app"
        self.swept = self.sweep()
        self.root = self.parent / str(os.getpid())
        (self.root / "sessions").mkdir(parents=True, exist_ok=True)

    @property
    def gradio_cache(self) -> Path:
        return self.root / "gradio"

    def sweep(self) -> list[Path]:
        """Remove what app processes that have stopped left behind; returns what was removed."""
        # our own process id's folder too: we have not made it yet, so an earlier process (same id) left it
        stale = [
            folder
            for folder in self.parent.glob("*")
            if folder.name.isdigit() and (int(folder.name) == os.getpid() or not _process_runs(int(folder.name)))
        ]
        for folder in stale:
            shutil.rmtree(folder, ignore_errors=True)
        return stale

    def folder(self, session_hash: str) -> Path:
        folder = self._session_folder(session_hash)
        folder.mkdir(exist_ok=True)
        return folder

    def _session_folder(self, session_hash: str) -> Path:
        # the browser chooses the session hash: hashed again, it can only ever name a folder in sessions/
        return self.root / "sessions" / hashlib.sha256(session_hash.encode()).hexdigest()[:32]

    def note_upload(self, session_hash: str, photo: str) -> None:
        with (self.folder(session_hash) / UPLOADS_FILE).open("a") as uploads:
            uploads.write(photo + "\n")

    def forget(self, session_hash: str) -> None:
        """Delete a visitor's files and the photos they uploaded (the shared example photos stay)."""
        folder = self._session_folder(session_hash)
        uploads = folder / UPLOADS_FILE
        for line in uploads.read_text().splitlines() if uploads.is_file() else []:
            path = Path(line)
            if path.is_relative_to(self.root) and path.name not in EXAMPLE_NAMES:
                path.unlink(missing_ok=True)
        shutil.rmtree(folder, ignore_errors=True)

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def _process_runs(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


@dataclass
class Session:
    """One visitor's person: nothing here is visible to another session."""

    key: str  # Gradio's session hash: names the visitor's folder (VisitorFiles.folder)
    folder: Path
    weights: PersonalWeights | None = None
    references: list | None = None  # face descriptors of the visitor's photos, for the identity scores

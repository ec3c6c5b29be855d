"""Writing a file or a folder whole, or not at all: what a killed or failed run leaves is never mistaken for done."""

from __future__ import annotations

import shutil
import socket
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from hdb.errors import HdbError

if TYPE_CHECKING:
    from accelerate import Accelerator, PartialState

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


def check_shared_folder(state: PartialState | Accelerator, folder: Path) -> None:
    """Under several processes, refuse to start unless every one of them sees what the main process writes in
    `folder`: the training stages decide what is left to do, and where to resume, from the files there.

    The main process writes a random token; after a barrier each process looks for it. All of them learn who could
    not (so all of them stop, none waits for the others at a later barrier), and the probe file goes again.
    """
    if state.num_processes == 1:
        return
    from accelerate.utils import broadcast_object_list, gather_object

    folder.mkdir(parents=True, exist_ok=True)
    token = broadcast_object_list([uuid.uuid4().hex if state.is_main_process else None])[0]
    probe = folder / f".hdb-shared-{token}"
    if state.is_main_process:
        probe.write_text(token)
    state.wait_for_everyone()
    seen = probe.is_file() and probe.read_text() == token
    everyone = gather_object([(state.process_index, socket.gethostname(), seen)])  # after every process looked
    if state.is_main_process:
        probe.unlink(missing_ok=True)
    state.wait_for_everyone()
    blind = [f"process {index} on {host}" for index, host, saw in everyone if not saw]
    if blind:
        raise HdbError(
            f"{folder} is not shared by every process: {', '.join(blind)} cannot see the files the main process "
            "writes there. The stages decide what is left to do, and where to resume, from those files: put the "
            "output folder on a filesystem every node mounts (NFS, Lustre, ...)"
        )

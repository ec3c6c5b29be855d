"""Files as the OS gives them: read only when regular, written whole or not at all (what a killed or failed run
leaves is never mistaken for done), named in messages in a way that always prints.

A Linux file name is bytes, and need not be UTF-8: Python hands its undecodable bytes over as surrogate escapes
(os.fsdecode), which Python's own `open` takes back, but which other libraries (safetensors) and a strict terminal
refuse. So files are read and written with Python's `open` here, and messages show names through `shown`.
"""

from __future__ import annotations

import os
import shutil
import socket
import stat
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from hdb.errors import HdbError

if TYPE_CHECKING:
    from accelerate import Accelerator, PartialState

PARTIAL_SUFFIX = ".partial"


def shown(path: str | os.PathLike) -> str:
    """`path` (or a message that names one) as printed, which never fails on any terminal: a byte of a file name
    that is not UTF-8 as \\xff (the name as the OS has it), any other lone surrogate as \\ud800."""
    try:
        raw = os.fsencode(path)
    except UnicodeEncodeError:  # a lone surrogate that is no escaped byte: not from the OS
        return os.fspath(path).encode("utf-8", "backslashreplace").decode("utf-8")
    return raw.decode(sys.getfilesystemencoding(), "backslashreplace")


def special_kind(path: Path) -> str:
    """What `path` is when it exists and is neither a regular file nor a folder: "a FIFO", "a socket", "a device";
    else ''. Reading one waits for a writer forever, or never ends; writing one replaces it, or blocks."""
    try:
        mode = path.stat().st_mode
    except OSError:  # missing (or unreachable: whoever opens it says why)
        return ""
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return ""
    return "a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "a device"


def check_regular_file(path: Path) -> None:
    """Refuse, in one line, an existing `path` that is a FIFO, socket or device (a missing one is its reader's to
    report, a folder its writer's)."""
    kind = special_kind(path)
    if kind:
        raise HdbError(f"{shown(path)} is not a regular file ({kind})")


def read_regular_file(path: str | Path, max_bytes: int, what: str) -> bytes:
    """The bytes of the regular file `path`, at most `max_bytes` of them; anything else is one HdbError that names
    the file: missing, a folder, a FIFO or a device, or too large. `what` names such a file: "Personal weights file".
    """
    path = Path(path)
    name, kind = shown(path.name), what[0].lower() + what[1:]
    try:  # without blocking: a FIFO opens at once, and is then refused
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise HdbError(f"{what} not found: {name}") from None
    except OSError as error:
        raise HdbError(f"Cannot read {name}: {error.strerror or error}") from None
    with open(descriptor, "rb") as file:
        status = os.fstat(descriptor)
        if stat.S_ISDIR(status.st_mode):
            raise HdbError(f"{name} is a folder, not a {kind}")
        if not stat.S_ISREG(status.st_mode):
            raise HdbError(f"{name} is not a regular file ({special_kind(path) or 'a special file'})")
        if status.st_size > max_bytes:
            raise HdbError(f"{name} is {status.st_size:,} bytes; {kind}s are at most {max_bytes:,}")
        try:
            data = file.read(max_bytes + 1)  # bounded, should it grow meanwhile
        except OSError as error:
            raise HdbError(f"Cannot read {name}: {error.strerror or error}") from None
    if len(data) > max_bytes:
        raise HdbError(f"{name} is over {max_bytes:,} bytes; {kind}s are at most that")
    return data


def write_file(path: str | Path, data: bytes) -> Path:
    """Write `data` to the file `path` whole or not at all (`write_atomically`), making its folder if needed.

    Any failure (a full disk, a read-only folder, ...) is one HdbError naming the file and the reason. A FIFO,
    socket or device at `path` is refused, not replaced.
    """
    path = Path(path)
    check_regular_file(path)
    if path.is_dir():  # which `write_atomically` would replace whole
        raise HdbError(f"Could not write {shown(path)}: it is a folder")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, lambda partial: partial.write_bytes(data))
    except OSError as error:
        raise HdbError(f"Could not write {shown(path)}: {error.strerror or error}") from None
    return path


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

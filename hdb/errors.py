"""The one exception type users see: a clear, one-line message, never a stack trace."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


class HdbError(Exception):
    """A problem the user can act on (bad input, missing model, mismatched file, ...)."""


def check_choice(what: str, value: object, choices: Iterable[str]) -> None:
    """Refuse `value` unless it is one of `choices`, naming them: "Unknown optimizer 'sgd'; choose one of ..."."""
    choices = list(choices)
    if value not in choices:
        raise HdbError(f"Unknown {what} {value!r}; choose one of {', '.join(choices)}")


def from_hub_or_directory(
    kind: str, name: str, loader: Callable[[str], T], argument: str | None = None, offline: str = ""
) -> T:
    """`loader(local directory or hub id)`, with the ways that fails offline turned into one clear HdbError.

    `kind` names the model in messages ("base model", "CLIP model"); `argument`, the library argument that takes
    a directory instead (the command line shows it as its flag); `offline`, what else to try without a network.
    """
    local = Path(name).expanduser()
    if not local.exists() and (name.startswith((".", "/", "~")) or name.count("/") > 1):
        raise HdbError(
            f"{kind[0].upper()}{kind[1:]} directory {name} does not exist (a hub id looks like 'owner/name')"
        )
    try:
        return loader(str(local) if local.exists() else name)
    except (OSError, ValueError) as error:  # offline, unknown or malformed hub id, incomplete directory
        if (
            local.exists()
        ):  # e.g. a weights file missing, or only pickled .bin weights (never loaded: they can run code)
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise HdbError(f"Could not load {kind} from directory {name}: {first_line}") from None
        raise HdbError(
            f"Could not load {kind} {name!r}: it is not a complete local directory and could not be fetched from the "
            f"Hugging Face Hub ({type(error).__name__}). On a connected machine run "
            f"`hf download {name} --local-dir DIR`, then pass "
            + (f"`{argument}=DIR`." if argument else "DIR instead.")
            + (f" {offline}" if offline else "")
        ) from None

"""What a setting is called where: its name in the library, its flag on the command line.

`hdb.cli` builds its options with these flags.
"""

from __future__ import annotations

# Settings whose flag is not `--` and their name with dashes
RENAMED_FLAGS = {
    "relaxed_rank": "--rank",
    "learning_rate": "--lr",
    "freeze_encoder": "--train-encoder",  # sets it to False
    "baselines": "--no-baselines",  # sets it to False
    "path": "--dataset",  # DatasetSource's
}
# Fields of the option dataclasses that no command offers: each command sets them itself
NOT_ON_THE_COMMAND_LINE = frozenset({"instance_token", "lidb", "progress", "sample_steps", "first_images"})


def flag_for(setting: str) -> str:
    """The command line's flag for a setting: `--` and its name with dashes, unless RENAMED_FLAGS says otherwise."""
    return RENAMED_FLAGS.get(setting, "--" + setting.replace("_", "-"))

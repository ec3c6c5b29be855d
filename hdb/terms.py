"""What a setting is called where: its name in the library, its flag on the command line; in the app, unsaid.

Library messages name a setting as a Python caller writes it, in backticks: `gradient_checkpointing=True`,
`optimizer='adamw8bit'`, a smaller `batch_size`; and a library function likewise:
`hdb.models.save_tiny_pipeline(DIR)`. The command line shows each as its flag or its command
(`cli_terms`). The app's visitors change no settings, so advice that names one is left out for them
(`for_visitors`). `hdb.cli` builds its options with the same flags: one table serves both.
"""

from __future__ import annotations

import re
from dataclasses import fields

from hdb.config import DatasetSource, DecoderConfig, HypernetTrainConfig, PersonalizeConfig, PreoptimizeConfig
from hdb.options import BenchOptions

# Settings whose flag is not `--` and their name with dashes
RENAMED_FLAGS = {
    "relaxed_rank": "--rank",
    "learning_rate": "--lr",
    "freeze_encoder": "--train-encoder",  # sets it to False
    "baselines": "--no-baselines",  # sets it to False
    "path": "--dataset",  # DatasetSource's
    "weights_dir": "--weights",  # train_hypernetwork's
    "out_dir": "--out",  # preoptimize's and train_hypernetwork's
}
# Fields of the option dataclasses that no command offers: each command sets them itself (train_prediction: the
# toy's ablation, for library callers), or offers the fields of the dataclass they hold (decoder: DecoderConfig's)
NOT_ON_THE_COMMAND_LINE = frozenset(
    {"instance_token", "lidb", "decoder", "progress", "first_images", "train_prediction"}
)
# Arguments of library functions, not config fields, that the commands offer as flags too
ARGUMENTS = ("base", "hypernet", "dtype", "device", "rank", "weights_dir", "out_dir")
# Library functions a message may point to -> the command that runs each
COMMANDS = {"hdb.models.save_tiny_pipeline": "tiny-model"}
# ... and what the demo (`python app.py`, `hdb demo`) offers in their place: it runs no other command
APP_SWITCHES = {"hdb.models.save_tiny_pipeline": "--tiny"}


def flag_for(setting: str) -> str:
    """The command line's flag for a setting: `--` and its name with dashes, unless RENAMED_FLAGS says otherwise."""
    return RENAMED_FLAGS.get(setting, "--" + setting.replace("_", "-"))


# Every setting that some command offers -> its flag
FLAGS = {
    field.name: flag_for(field.name)
    for config in (
        PersonalizeConfig,
        PreoptimizeConfig,
        HypernetTrainConfig,
        DecoderConfig,
        BenchOptions,
        DatasetSource,
    )
    for field in fields(config)
    if field.name not in NOT_ON_THE_COMMAND_LINE
} | {name: flag_for(name) for name in ARGUMENTS}

_QUOTES = "'\""  # around a string value: `optimizer='adamw8bit'` is --optimizer adamw8bit
_SETTING = re.compile(r"`(\w+)(?:=([^`]*))?`")  # `name` or `name=value`
_CALL = re.compile(r"`([\w.]+)\(([^`]*)\)`")  # `module.function(arguments)`


def cli_terms(message: str) -> str:
    """`message` as the command line says it: each setting as its flag, each library function as its command.

    "Lower memory with `gradient_checkpointing=True`, `optimizer='adamw8bit'`" becomes "Lower memory with
    --gradient-checkpointing, --optimizer adamw8bit". A boolean's flag is the one that sets the value
    the message asks for (a message only ever asks for the value away from the default).
    """

    def as_flag(match: re.Match) -> str:
        name, value = match.groups()
        if name not in FLAGS:
            return match.group(0)
        if value is None or value in ("True", "False"):
            return FLAGS[name]
        return f"{FLAGS[name]} {value.strip(_QUOTES)}"

    def as_command(match: re.Match) -> str:
        function, arguments = match.groups()
        if function not in COMMANDS:
            return match.group(0)
        words = ["python -m hdb", COMMANDS[function], *arguments.replace("'", "").split(", ")]
        return f"`{' '.join(word for word in words if word)}`"

    return _SETTING.sub(as_flag, _CALL.sub(as_command, message))


def app_terms(message: str) -> str:
    """`message` as the demo's own command line says it: the tiny pipeline is its `--tiny`, settings its flags."""

    def as_switch(match: re.Match) -> str:
        return f"`{APP_SWITCHES[match.group(1)]}`" if match.group(1) in APP_SWITCHES else match.group(0)

    return cli_terms(_CALL.sub(as_switch, message))


def for_visitors(message: str) -> str:
    """`message` for the app's visitors, who change no settings: its sentences that name one are left out.

    "The GPU ran out of memory while finetuning. Lower memory with `gradient_checkpointing=True`, ..."
    becomes "The GPU ran out of memory while finetuning." A message that is all such advice stays whole.
    """
    sentences = re.split(r"(?<=\.)\s+(?=[A-Z])", message)
    kept = [sentence for sentence in sentences if not _names_a_setting(sentence)]
    return " ".join(kept) if kept else message


def _names_a_setting(text: str) -> bool:
    return any(match.group(1) in FLAGS for match in _SETTING.finditer(text)) or any(
        match.group(1) in COMMANDS for match in _CALL.finditer(text)
    )

"""Start the demo: `python app.py` (Spaces runs it), `python -m hdb.app`, or `hdb.app.main()`.

    python app.py                       # SD1.5 from the hub (or HDB_BASE), GPU if there is one
    python app.py --tiny                # tiny random pipeline: the whole flow offline, in seconds, on a CPU
    python app.py --compile             # a dedicated GPU: compile the model in the background at start

Every option is also an environment variable (HDB_BASE, HDB_HYPERNET, HDB_DEVICE, HDB_DTYPE, HDB_QUANTIZE,
HDB_OPTIMIZER, HDB_TINY, HDB_COMPILE), which is how a Hugging Face Space sets them.
"""

from __future__ import annotations

import argparse
import os
import signal
from dataclasses import fields
from pathlib import Path

from hdb.arguments import config_option
from hdb.config import PersonalizeConfig, shown_value
from hdb.console import quiet_libraries
from hdb.errors import HdbError
from hdb.options import HYPERNET_HELP, QUANTIZE_HELP, AppOptions, ModelOptions
from hdb.terms import app_terms, flag_for


def parse_args(argv: list[str] | None = None, prog: str | None = None) -> argparse.Namespace:
    """The app's options; `prog`: how its usage line names the command (`hdb demo`; default: the script's name).
    Declared in hdb.options (ModelOptions, AppOptions) and hdb.config, each read from its environment variable when
    one is set (a Space's settings), else from its declaration's default."""
    parser = argparse.ArgumentParser(prog=prog, description="hdb demo (Gradio)")
    config_option(parser, ModelOptions, "base", **_from_environment(ModelOptions, "base"))
    parser.add_argument("--hypernet", default=os.environ.get("HDB_HYPERNET"), help=HYPERNET_HELP)
    config_option(parser, ModelOptions, "device", **_from_environment(ModelOptions, "device"))
    config_option(parser, ModelOptions, "dtype", **_from_environment(ModelOptions, "dtype"))
    optimizer = _from_environment(PersonalizeConfig, "optimizer", ("HDB_OPTIMIZER",))
    config_option(parser, PersonalizeConfig, "optimizer", **optimizer)
    quantize = _from_environment(ModelOptions, "quantize")
    config_option(parser, ModelOptions, "quantize", help=f"{QUANTIZE_HELP}; not on ZeroGPU", **quantize)
    for option in fields(AppOptions):
        config_option(parser, AppOptions, option.name, **_from_environment(AppOptions, option.name))
    return parser.parse_args(argv)


def _from_environment(config: type, name: str, variables: tuple[str, ...] = ()) -> dict[str, object]:
    """`{"default": value}` from the first of the setting's environment variables that is set (its declaration's
    `env`, else `variables`), checked as the setting is; {} when none is set. A switch is on unless "", "0", "false"."""
    setting = {f.name: f for f in fields(config)}[name]
    for variable in setting.metadata.get("env", variables):
        text = os.environ.get(variable)
        if text is None:
            continue
        default = setting.default
        value: object = text not in ("", "0", "false") if isinstance(default, bool) else text
        try:
            if isinstance(default, int) and not isinstance(default, bool):
                value = int(text)
            config(**{name: value})  # its range and choices
        except (ValueError, HdbError) as error:
            reason = error if isinstance(error, HdbError) else "not a whole number"
            raise HdbError(f"{variable}={shown_value(text)} cannot set {flag_for(name)}: {reason}") from None
        return {"default": value}
    return {}


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    options = parse_args(argv, prog)
    quiet_libraries()  # the terminal is for the app's own lines, as with `hdb demo`
    # The import order is ZeroGPU's: gradio first (`spaces` refuses to be imported while gradio is importing),
    # then `spaces`, which patches torch, before anything touches CUDA or builds a model.
    import gradio  # noqa: F401

    from hdb.app.engine import Engine, import_spaces

    spaces = import_spaces()
    from hdb.app.page import EXAMPLE_PHOTOS, build_demo, serve
    from hdb.app.visitors import VisitorFiles

    try:
        engine = Engine(options, spaces)
    except HdbError as error:
        raise SystemExit(f"error: {app_terms(str(error))}") from None
    files = VisitorFiles(examples=[Path(photo) for photo in EXAMPLE_PHOTOS])
    os.environ["GRADIO_TEMP_DIR"] = str(files.gradio_cache)  # this process is the app's: its cache goes with it

    def stop(*_: object) -> None:
        """A stopped container or Space: every visitor file goes, then the process ends at once with success.
        (sys.exit here would unwind the main thread while a job's threads run, and the C++ runtime aborts.)"""
        files.remove()
        os._exit(0)

    signal.signal(signal.SIGTERM, stop)
    try:
        # on a Space, visitors' addresses come from Hugging Face's proxy (hdb.app.line); SPACE_ID is set there
        behind_spaces_proxy = bool(os.environ.get("SPACE_ID"))
        serve(build_demo(engine, files), files, options.host, options.port, options.share, behind_spaces_proxy)
    finally:
        files.remove()

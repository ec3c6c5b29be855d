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
from pathlib import Path

from hdb.config import APP_COMPILE_MODE, DEFAULT_BASE, DTYPE_CHOICES, OPTIMIZERS, QUANTIZATIONS, QUANTIZE_HELP
from hdb.console import quiet_libraries
from hdb.errors import HdbError
from hdb.terms import app_terms


def parse_args(argv: list[str] | None = None, prog: str | None = None) -> argparse.Namespace:
    """The app's options; `prog`: how its usage line names the command (`hdb demo`; default: the script's name)."""
    env = os.environ.get

    def env_flag(name: str) -> bool:  # a switch set by an environment variable: anything but "", "0", "false"
        return env(name, "") not in ("", "0", "false")

    parser = argparse.ArgumentParser(prog=prog, description="hdb demo (Gradio)")
    parser.add_argument("--base", default=env("HDB_BASE", DEFAULT_BASE), help="base model: hub id or local directory")
    parser.add_argument("--hypernet", default=env("HDB_HYPERNET"), help="trained hypernetwork: hub id or directory")
    parser.add_argument("--device", default=env("HDB_DEVICE", "auto"))
    parser.add_argument("--dtype", default=env("HDB_DTYPE", "auto"), choices=DTYPE_CHOICES)
    parser.add_argument("--optimizer", default=env("HDB_OPTIMIZER", OPTIMIZERS[0]), choices=OPTIMIZERS)
    parser.add_argument(
        "--quantize",
        default=env("HDB_QUANTIZE", QUANTIZATIONS[0]),
        choices=QUANTIZATIONS,
        help=f"{QUANTIZE_HELP}; not on ZeroGPU",
    )
    parser.add_argument("--tiny", action="store_true", default=env_flag("HDB_TINY"))
    parser.add_argument(
        "--compile",
        action="store_true",
        default=env_flag("HDB_COMPILE"),
        help=f"dedicated GPU: torch.compile ({APP_COMPILE_MODE}) while the page is already served; not on ZeroGPU",
    )
    parser.add_argument(
        "--host", default=env("GRADIO_SERVER_NAME", "127.0.0.1"), help="0.0.0.0 to serve the network (Spaces set it)"
    )
    parser.add_argument("--port", type=int, default=int(env("HDB_PORT", env("GRADIO_SERVER_PORT", "7860"))))
    parser.add_argument("--share", action="store_true")
    return parser.parse_args(argv)


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

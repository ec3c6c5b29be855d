"""`python -m hdb ...`: the command line. Each subcommand is a thin wrapper over a library function."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from pathlib import Path

from hdb.errors import HdbError


def _quiet_libraries() -> None:
    """Keep the terminal for hdb's own progress: no library load bars or import-time chatter."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # "kernels-community" notice on CPU import
    warnings.filterwarnings("ignore", category=FutureWarning)
    import diffusers
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()


# ----------------------------------------------------------------------------- subcommands


def cmd_tiny_model(args: argparse.Namespace) -> None:
    from hdb.models import save_tiny_pipeline

    out = save_tiny_pipeline(args.out_dir, args.arch, args.seed)
    print(f"tiny {args.arch} pipeline with random weights written to {out}")


def cmd_info(args: argparse.Namespace) -> None:
    from hdb.personal_file import describe

    print(describe(args.file))


def cmd_export(args: argparse.Namespace) -> None:
    import torch

    from hdb.export import export_lora
    from hdb.personal_file import load_personal

    dtype = {"fp32": torch.float32, "fp16": torch.float16}[args.dtype]
    path = export_lora(load_personal(args.file), args.output, args.format, dtype)
    print(f"{args.format} LoRA written to {path} ({path.stat().st_size:,} bytes)")


# ----------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m hdb", description="HyperDreamBooth: personalise Stable Diffusion from one face photo.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    tiny = sub.add_parser("tiny-model", help="write a tiny random-weight pipeline (offline tests and demos)")
    tiny.add_argument("out_dir", type=Path)
    tiny.add_argument("--arch", choices=["sd15", "sdxl"], default="sd15")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(run=cmd_tiny_model)

    info = sub.add_parser("info", help="print what a personal weights file holds")
    info.add_argument("file", type=Path)
    info.set_defaults(run=cmd_info)

    export = sub.add_parser("export", help="export a personal file as a standard LoRA (diffusers or kohya keys)")
    export.add_argument("file", type=Path)
    export.add_argument("--format", choices=["diffusers", "kohya"], default="diffusers")
    export.add_argument("-o", "--output", type=Path, required=True, help="output .safetensors file")
    export.add_argument("--dtype", choices=["fp32", "fp16"], default="fp32")
    export.set_defaults(run=cmd_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_libraries()
    try:
        args.run(args)
    except HdbError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0

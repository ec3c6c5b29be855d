"""The terminal is for hdb's own lines: the commands and the app silence third-party chatter as they start."""

from __future__ import annotations

import logging
import os
import warnings


def quiet_libraries() -> None:
    """No library load bars or import-time chatter (called by `python -m hdb` and `python app.py`, which own their
    process; the library itself never changes these settings)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # e.g. "no torchvision, using the PIL processor"
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # "kernels-community" notice on CPU import
    warnings.filterwarnings("ignore", category=FutureWarning)

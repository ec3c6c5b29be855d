"""Shared test setup: offline, quiet, tiny random pipelines built in-process."""

import logging
import os
import shutil

# One thread per process (CLI subprocesses inherit it): the models are tiny, and with two cores shared by
# pytest, a CLI subprocess and a Gradio server, more threads only fight (small ops then slow down 1000x).
os.environ.update(
    HF_HUB_OFFLINE="1",
    HF_HUB_DISABLE_TELEMETRY="1",
    GRADIO_ANALYTICS_ENABLED="False",
    TOKENIZERS_PARALLELISM="false",
    OMP_NUM_THREADS="1",
    MKL_NUM_THREADS="1",
)
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

import pytest  # noqa: E402
import torch  # noqa: E402
from helpers import ASSETS  # noqa: E402
from helpers import hdb_cli as hdb  # noqa: E402

from hdb.faces import align_face  # noqa: E402
from hdb.models import build_tiny_pipeline, save_tiny_pipeline  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture
def tiny_sd15():
    return build_tiny_pipeline("sd15")


@pytest.fixture
def tiny_sdxl():
    return build_tiny_pipeline("sdxl")


@pytest.fixture(scope="session")
def tiny_sd15_dir(tmp_path_factory):
    """A tiny SD1.5 pipeline saved to disk, as `python -m hdb tiny-model` writes it."""
    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "sd15", "sd15")


@pytest.fixture(scope="session")
def obama_face():
    """A real photo, aligned once for the whole run (face detection is the slow part)."""
    return align_face(ASSETS / "obama.jpg", size=256)


def pytest_collection_modifyitems(items):
    """The longest file (the toy's quick run, ~5 minutes) first: on two workers it overlaps the rest."""
    items.sort(key=lambda item: item.path.name != "test_toy.py")  # a stable sort keeps the rest in order


@pytest.fixture(scope="module")
def identity_folder(tmp_path_factory):
    """Four identities (one with two photos in a sub-folder) plus a photo with no face and a broken file."""
    folder = tmp_path_factory.mktemp("identities")
    (folder / "obama").mkdir()
    shutil.copy(ASSETS / "obama.jpg", folder / "obama")
    shutil.copy(ASSETS / "obama2.jpg", folder / "obama")
    for name in ("biden.jpg", "astronaut.png", "grace_hopper.jpg", "landscape.jpg"):
        shutil.copy(ASSETS / name, folder / name)
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    return folder


@pytest.fixture(scope="module")
def preoptimized(identity_folder, tiny_sd15_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("preopt")
    result = hdb(
        "preoptimize",
        "--images",
        identity_folder,
        "--out",
        out,
        "--base",
        tiny_sd15_dir,
        "--steps",
        "6",
        "--group-size",
        "2",
    )
    return out, result.stdout

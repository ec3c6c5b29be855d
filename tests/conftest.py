"""Shared test setup: offline, quiet, tiny random pipelines built in-process."""

import logging
import os

os.environ.update(HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1", GRADIO_ANALYTICS_ENABLED="False", TOKENIZERS_PARALLELISM="false")
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

import pytest  # noqa: E402
import torch  # noqa: E402

from hdb.models import build_tiny_pipeline, save_tiny_pipeline  # noqa: E402

torch.set_num_threads(2)


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

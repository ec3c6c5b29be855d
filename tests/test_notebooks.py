"""The Colab notebooks: committed without outputs, and executed end to end on the tiny pipeline, offline."""

import os
import shutil
from pathlib import Path

import nbformat
import papermill
import pytest

ROOT = Path(__file__).parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
TINY_PARAMETERS = {
    "01_personalize.ipynb": {"TINY": True, "STEPS": 5, "GEN_STEPS": 2, "DRIVE": True},  # Drive: a stand-in
    "02_train_hypernetwork.ipynb": {"TINY": True},
}


def test_notebooks_are_committed_clean():
    assert {path.name for path in NOTEBOOKS} == set(TINY_PARAMETERS)
    for path in NOTEBOOKS:
        notebook = nbformat.read(path, as_version=4)
        assert notebook.metadata["kernelspec"]["name"] == "python3"
        assert "colab.research.google.com" in notebook.cells[0].source  # the "Open in Colab" badge
        code = [cell for cell in notebook.cells if cell.cell_type == "code"]
        assert all(cell.outputs == [] and cell.execution_count is None for cell in code), f"{path.name} has outputs"
        parameters = next(cell for cell in code if "parameters" in cell.metadata.get("tags", []))
        assert "HDB_SOURCE" in parameters.source  # the one place the install source is set
        assert notebook.metadata["colab"]["gpuType"] == "T4"
        assert not any("git clone" in cell.source or "requirements.txt" in cell.source for cell in code)


GOOGLE_COLAB_STAND_IN = {  # what the notebooks use of Colab's `google.colab`: Drive mounted where asked
    # (no google/__init__.py: `google` stays a namespace package, and protobuf's google.protobuf still imports)
    "google/colab/__init__.py": "",
    "google/colab/drive.py": (
        "from pathlib import Path\n\n\ndef mount(path):\n    (Path(path) / 'MyDrive').mkdir(parents=True)\n"
    ),
    "google/colab/files.py": "def upload():\n    return {}\n\ndef download(path):\n    pass\n",
}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_offline_on_the_tiny_pipeline(path, tmp_path, monkeypatch):
    # the tutorial's install cell, run for real: pip installs this checkout (into a folder of the test's own,
    # without dependencies or downloads), as it installs the git URL on Colab
    site, source = tmp_path / "site", tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", "build", "*.egg-info", "__pycache__"))
    source = f"--no-deps --no-build-isolation --target {site} {source}"
    for name, text in GOOGLE_COLAB_STAND_IN.items():
        (tmp_path / "colab" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "colab" / name).write_text(text)
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path / 'colab'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    drive = tmp_path / "drive"  # a folder that does not exist yet: mounting makes it
    parameters = dict(TINY_PARAMETERS[path.name], OUT="out", DRIVE_ROOT=str(drive), INSTALL=True, HDB_SOURCE=source)
    executed = tmp_path / path.name
    papermill.execute_notebook(
        str(path),
        str(executed),
        parameters=parameters,
        cwd=str(ROOT),
        kernel_name="python3",
        progress_bar=False,
        execution_timeout=600,
    )
    notebook = nbformat.read(executed, as_version=4)
    errors = [o for cell in notebook.cells for o in cell.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    images = [o for cell in notebook.cells for o in cell.get("outputs", []) if "image/png" in o.get("data", {})]
    assert images, "the notebook shows pictures"
    if parameters.get("DRIVE"):  # everything written went to (the stand-in) Google Drive
        assert (drive / "MyDrive" / "hdb" / "out" / "person.safetensors").is_file()
    assert (site / "hdb" / "cli.py").is_file() and (site / "hdb" / "clip_tokenizer" / "vocab.json").is_file()

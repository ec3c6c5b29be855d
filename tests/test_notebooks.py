"""The Colab notebooks: committed without outputs, and executed end to end on the tiny pipeline, offline."""

import ast
import contextlib
import io
import os
import re
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


def cells(path, kind):
    return [cell for cell in nbformat.read(path, as_version=4).cells if cell.cell_type == kind]


# Colab's form fields, and what a parameter's value must be for each (raw: any Python expression)
FORM_TYPES = {"string": str, "boolean": bool, "integer": int, "raw": object}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_every_code_cell_has_a_colab_title_and_every_parameter_a_form(path):
    code = cells(path, "code")
    untitled = [cell.source.splitlines()[0] for cell in code if not re.match(r"#@title \S", cell.source)]
    assert not untitled, f"{path.name}: code cells without a '#@title' first line: {untitled}"
    parameters = next(cell for cell in code if "parameters" in cell.metadata.get("tags", []))
    lines = parameters.source.splitlines()
    assigned = [node for node in ast.parse(parameters.source).body if isinstance(node, ast.Assign)]
    assert len(assigned) >= 5
    for node in assigned:
        name, line = node.targets[0].id, lines[node.lineno - 1]
        form = re.search(r'#@param \{type:"(\w+)"\}$', line)
        assert form and form.group(1) in FORM_TYPES, f"{path.name}: {name} has no Colab form: {line!r}"
        if form.group(1) != "raw":  # a literal of the field's type (Colab cannot show None in a text field)
            value = ast.literal_eval(node.value)
            assert type(value) is FORM_TYPES[form.group(1)], f"{path.name}: {name} = {value!r} in a {form.group(1)}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_every_time_claim_says_measured_or_estimate(path):
    for cell in cells(path, "markdown"):
        for claim in re.finditer(r"\b(?:about|roughly|~) ?[\d.,]+ ?(?:s|seconds?|minutes?|hours?)\b", cell.source):
            said = cell.source[claim.start() : claim.end() + 70]
            assert "measured" in said or "estimate" in said, f"{path.name}: unlabelled time claim {said!r}"


def test_personalize_time_claims_come_from_its_one_table():
    """Notebook 01's figures in prose are what its timing cell prints from its table, to the letter."""
    from hdb.config import STEPS_FROM_ZERO, STEPS_WITH_HYPERNET

    path = ROOT / "notebooks" / "01_personalize.ipynb"
    table_cell = next(cell for cell in cells(path, "code") if cell.source.startswith("#@title How long"))
    namespace = {"STEPS": None, "HYPERNET": None, "TINY": True}
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        exec(table_cell.source, namespace)
    table, how_long = namespace["SECONDS_PER_STEP"], namespace["how_long"]
    assert printed.getvalue().strip() == how_long("2-core CPU, TINY", STEPS_FROM_ZERO)
    measured = {where for where, (_, source) in table.items() if source.startswith("measured")}
    assert measured == {"H200", "2-core CPU, TINY"}, "only these were timed: any other card is an estimate"
    prose = [cell.source for cell in cells(path, "markdown")]
    claims = [
        (claim.group(0), where, int(claim.group(1)))
        for text in prose
        for where in table
        for claim in re.finditer(rf"{re.escape(where)}, (\d+) steps: [^()]*\([^)]*\)", text)
    ]
    for said, where, steps in claims:
        assert said == how_long(where, steps), f"the prose says {said!r}, the table {how_long(where, steps)!r}"
    said = {claim for claim, _, _ in claims}
    assert how_long("T4", STEPS_FROM_ZERO) in prose[0]  # the introduction's figure for a free Colab GPU
    assert {how_long("H200", STEPS_WITH_HYPERNET), how_long("2-core CPU, TINY", STEPS_FROM_ZERO)} <= said


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

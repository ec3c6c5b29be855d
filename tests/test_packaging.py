"""hdb as users install it: one dependency list in three files, and a real (non-editable) install that works."""

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

from helpers import ASSETS

ROOT = Path(__file__).resolve().parent.parent
TEST_TOOLS = {
    "pytest",
    "pytest-xdist",
    "ruff",
    "gradio-client",
    "playwright",
    "papermill",
    "nbclient",
    "ipykernel",
    "setuptools",
}


def names(requirements: list[str]) -> set[str]:
    """Package names of requirement lines, normalised as pip does (case, '_' vs '-')."""
    found = set()
    for line in requirements:
        line = line.split("#")[0].strip()
        if line:
            found.add(re.split(r"[<>=!~\[; ]", line)[0].lower().replace("_", "-"))
    return found


def test_the_three_dependency_lists_name_the_same_packages():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = names(project["dependencies"])
    space = names((ROOT / "requirements.txt").read_text().splitlines())
    pinned = names((ROOT / "requirements-dev.txt").read_text().splitlines())
    optional = project["optional-dependencies"]
    extras = names([line for packages in optional.values() for line in packages])
    assert "gradio" not in declared and names(optional["app"]) == {"gradio"}  # `pip install "hdb[app]"`
    assert space == declared | names(optional["app"])  # the Space runs the app; it trains nothing
    assert pinned - TEST_TOOLS == declared | extras
    assert "torch" in declared and project["requires-python"] == ">=3.11"
    assert project["scripts"]["hdb"] == "hdb.cli:main"


def test_a_clone_installs_and_runs_outside_the_checkout(tmp_path):
    clone, target, work = tmp_path / "clone", tmp_path / "site", tmp_path / "elsewhere"
    subprocess.run(["git", "clone", "-q", "--depth", "1", f"file://{ROOT}", str(clone)], check=True)
    install = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target"]
    subprocess.run([*install, str(target), str(clone)], check=True, capture_output=True)
    assert (target / "hdb" / "clip_tokenizer" / "vocab.json").is_file()  # package data came along
    shipped = {path.name for path in (target / "hdb" / "assets").iterdir()}  # the photos: one copy, from assets/
    assert shipped == {path.name for path in ASSETS.iterdir()} and "SOURCES.md" in shipped
    packages = {path.parent.relative_to(ROOT) for path in (ROOT / "hdb").rglob("__init__.py")}
    assert all((target / package / "__init__.py").is_file() for package in packages)  # pyproject lists them all
    assert "Apache License" in next(target.glob("hdb-*.dist-info/licenses/LICENSE")).read_text()
    metadata = next(target.glob("hdb-*.dist-info/METADATA")).read_text(encoding="utf-8")
    description = metadata.partition("\n\n")[2]  # the long description, the index's page, follows the headers
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    title = next(line for line in readme.splitlines() if line.startswith("# "))
    assert readme.startswith("---\n") and "sdk: gradio" in readme  # the Space's YAML header, which a Space needs
    assert not description.startswith("---") and "sdk: gradio" not in description and title in description
    work.mkdir()
    env = dict(os.environ, PYTHONPATH=str(target), HF_HUB_OFFLINE="1")  # the installed copy, not the checkout

    def hdb(*args: str) -> str:
        result = subprocess.run([str(target / "bin" / "hdb"), *args], cwd=work, env=env, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-2000:]
        return result.stdout

    assert "personalize" in hdb("--help")
    hdb("tiny-model", "tiny")
    out = hdb("personalize", str(ASSETS / "obama.jpg"), "--base", "tiny", "-o", "me.safetensors", "--steps", "2")
    assert "personal file: me.safetensors" in out and (work / "me.safetensors").is_file()
    assert "--tiny" in hdb("demo", "--help") and "demo" in hdb("--help")  # the app's own options

    where = "from hdb.app.page import ASSETS, EXAMPLE_PHOTOS; print(ASSETS, *EXAMPLE_PHOTOS)"  # the demo's photos
    found = subprocess.run([sys.executable, "-c", where], cwd=work, env=env, capture_output=True, text=True)
    assert found.returncode == 0, found.stderr[-2000:]
    folder, *photos = found.stdout.split()
    assert Path(folder) == target / "hdb" / "assets" and all(Path(photo).is_file() for photo in photos)


def test_hdb_demo_hands_its_arguments_to_the_app_and_names_the_extra_it_needs(monkeypatch, capsys):
    import importlib.util

    import hdb.app.main
    from hdb import cli

    monkeypatch.setattr(cli, "quiet_libraries", lambda: None)  # it sets this process's environment
    served = []
    monkeypatch.setattr(hdb.app.main, "main", lambda argv, prog=None: served.append(argv))
    assert cli.main(["demo", "--tiny", "--port", "7861"]) == 0 and served == [["--tiny", "--port", "7861"]]
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *more: None if name == "gradio" else find_spec(name))
    assert cli.main(["demo", "--tiny"]) == 1 and len(served) == 1  # no gradio: a clear line, nothing served
    assert 'The demo needs gradio, which hdb installs as an extra: pip install "hdb[app]"' in capsys.readouterr().err

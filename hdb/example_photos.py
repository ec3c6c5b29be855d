"""hdb's own photos: public-domain faces (and one landscape) for the demo's examples and the benchmark.

One copy of the files serves both ways of running hdb. In the repository they are the top-level `assets/`
folder (see assets/SOURCES.md); an installed hdb carries the same files as package data in `hdb/assets/`
(pyproject.toml maps the package `hdb.assets` to the folder `assets`).
"""

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent
_INSTALLED = _PACKAGE / "assets"  # where pip puts them
ASSETS = _INSTALLED if _INSTALLED.is_dir() else _PACKAGE.parent / "assets"  # else: the repository's own

"""hdb: HyperDreamBooth (Ruiz et al., arXiv 2307.06949) on diffusers."""

from hdb.config import DEFAULT_BASE
from hdb.errors import HdbError

__version__ = "0.1.0"
__all__ = ["DEFAULT_BASE", "HdbError", "PersonalPipeline", "__version__"]


def __getattr__(name: str) -> object:
    """`hdb.PersonalPipeline`, imported on first use: `import hdb` (and `python -m hdb --help`) stay instant."""
    if name == "PersonalPipeline":
        from hdb.pipeline import PersonalPipeline

        return PersonalPipeline
    raise AttributeError(f"module 'hdb' has no attribute {name!r}")

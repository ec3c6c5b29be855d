"""hdb: HyperDreamBooth (Ruiz et al., arXiv 2307.06949) on diffusers."""

from hdb.errors import HdbError

__version__ = "0.1.0"
__all__ = ["HdbError", "__version__"]

"""hdb: HyperDreamBooth (Ruiz et al., arXiv 2307.06949) on diffusers."""

from hdb.errors import HdbError

__version__ = "0.1.0"
DEFAULT_BASE = "stable-diffusion-v1-5/stable-diffusion-v1-5"  # the base model users get by default
__all__ = ["DEFAULT_BASE", "HdbError", "__version__"]

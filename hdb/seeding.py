"""Random initial weights drawn from a given seed, leaving the process-wide random state alone.

hdb never seeds the process-wide random number generators: a caller's own random stream (a notebook's,
a test's, another library's) must not change because hdb built a model or trained one. Noise and data
are drawn from generators of their own (`torch.Generator().manual_seed(...)`, see
`hdb.diffusion.sample_seed`). Module constructors, though, torch's, diffusers' and transformers' alike,
take no generator: they draw from the process-wide one. `initialised_from(seed)` lets them, from a
forked copy seeded with `seed`, and puts the caller's state back afterwards.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def initialised_from(seed: int) -> Iterator[None]:
    """Within it, modules being built draw their random initial weights from `seed`; afterwards the
    process-wide random state is what it was. The same seed builds the same weights on the same device.

    Forks the generators the constructors draw from, the CPU's and, when building on a CUDA device (under
    `with torch.device("cuda")`), that device's, then seeds the forks only (`torch.manual_seed` would seed
    every CUDA device, forked or not).
    """
    device = torch.get_default_device()
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda, device_type="cuda"):
        torch.random.default_generator.manual_seed(seed)
        for index in cuda:
            torch.cuda.default_generators[index].manual_seed(seed)
        yield

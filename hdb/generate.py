"""Generate pictures of a personalised person at a chosen identity strength (prompts: hdb.styles)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from diffusers import DPMSolverMultistepScheduler
from PIL import Image

from hdb.errors import HdbError
from hdb.lidb import LiDB
from hdb.models import Pipeline
from hdb.styles import DEFAULT_NEGATIVE


def generate(
    pipe: Pipeline,
    lidb: LiDB | None,
    prompt: str,
    negative_prompt: str = DEFAULT_NEGATIVE,
    steps: int = 25,
    guidance: float = 7.5,
    seed: int = 0,
    num_images: int = 1,
    identity_strength: float = 1.0,
    height: int | None = None,
    width: int | None = None,
    merge: bool = True,
    on_step: Callable[[int], None] | None = None,
) -> list[Image.Image]:
    """Sample `num_images` images of the already-expanded `prompt` with the person at `identity_strength`.

    With `merge` (the default) the person is folded into the base weights for the sampling and taken out
    again afterwards, exactly (`LiDB.merge`): each step then costs what the base model's step costs,
    instead of 176 extra low-rank products. `on_step(i)` is called after sampling step i (progress bars).
    """
    if steps < 1 or num_images < 1:
        raise HdbError("steps and the number of images must be at least 1")
    if lidb is not None:
        lidb.use_shared()
        lidb.set_scale(identity_strength)
        if merge:
            lidb.merge()
    generator = torch.Generator("cpu").manual_seed(seed)  # CPU generator: same seed, same picture on any device
    scheduler = pipe.scheduler
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(scheduler.config)  # good pictures in ~25 steps
    try:
        with torch.inference_mode():
            return pipe(
                prompt,
                negative_prompt=negative_prompt or None,
                num_inference_steps=steps,
                guidance_scale=guidance,
                num_images_per_prompt=num_images,
                generator=generator,
                height=height,
                width=width,
                callback_on_step_end=None if on_step is None else _report(on_step),
            ).images
    finally:
        pipe.scheduler = scheduler
        if lidb is not None:
            lidb.unmerge()


def _report(on_step: Callable[[int], None]) -> Callable:
    def callback(pipe: Pipeline, step: int, timestep: torch.Tensor, tensors: dict) -> dict:
        on_step(step)
        return tensors

    return callback

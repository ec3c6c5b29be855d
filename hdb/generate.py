"""Generate pictures of a personalised person at a chosen identity strength (prompts: hdb.styles)."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from contextlib import ExitStack

import torch
from PIL import Image

from hdb.config import MAX_SEED, GenerateOptions
from hdb.errors import HdbError
from hdb.families import family_of
from hdb.lidb import LiDB
from hdb.models import Pipeline, native_resolution
from hdb.styles import DEFAULT_NEGATIVE


def generate(
    pipe: Pipeline,
    lidb: LiDB | None,
    prompt: str,
    negative_prompt: str = DEFAULT_NEGATIVE,
    steps: int | None = GenerateOptions.steps,
    guidance: float | None = GenerateOptions.guidance,
    seed: int = GenerateOptions.seed,
    num_images: int = GenerateOptions.num_images,
    identity_strength: float = GenerateOptions.strength,
    height: int | None = GenerateOptions.height,
    width: int | None = GenerateOptions.width,
    merge: bool = True,
    on_step: Callable[[int], None] | None = None,
) -> list[Image.Image]:
    """Sample `num_images` images of the already-expanded `prompt` with the person at `identity_strength`.

    With `merge` (the default) the person is folded into the base weights for the sampling and taken out
    again afterwards, exactly (`LiDB.merge`): each step then costs what the base model's step costs,
    instead of 176 extra low-rank products. `on_step(i)` is called after sampling step i (progress bars).
    `steps` and `guidance`: None draws with the base's own (`resolved_steps`, `resolved_guidance`).
    """
    steps = resolved_steps(pipe, steps)
    if steps < 1 or num_images < 1:
        raise HdbError("steps and the number of images must be at least 1")
    guidance = resolved_guidance(pipe, guidance)
    if not (math.isfinite(identity_strength) and math.isfinite(guidance)):  # NaN passes every range check
        raise HdbError(f"identity strength and guidance must be finite numbers, not {identity_strength}, {guidance}")
    # CPU generator: same seed, same picture on any device. Made first: a seed out of range fails before any change
    generator = seeded_generator(seed)
    with ExitStack() as restore:  # every change below is undone on the way out, also when sampling fails
        if lidb is not None:
            if not lidb.own.uses_shared:
                raise HdbError("Generation needs the LiDB's shared (one-person) weights, not per-sample ones")
            restore.enter_context(lidb.scaled(identity_strength))
            if merge and lidb.mergeable:  # a quantised base draws the person unmerged (its low-rank products each step)
                restore.enter_context(lidb.merged_into_weights())
        family = family_of(pipe)
        scheduler = pipe.scheduler
        restore.callback(setattr, pipe, "scheduler", scheduler)
        pipe.scheduler = family.sampling_scheduler(pipe)
        with torch.inference_mode():
            return pipe(
                prompt,
                **family.sampling_arguments(negative_prompt, guidance),
                num_inference_steps=steps,
                num_images_per_prompt=num_images,
                generator=generator,
                height=height or native_resolution(pipe),  # a family's own default may be another base's size
                width=width or native_resolution(pipe),
                callback_on_step_end=None if on_step is None else _report(on_step),
            ).images


def resolved_steps(pipe: Pipeline, steps: int | None) -> int:
    """`steps`, or where it is None the base's own (25 for Stable Diffusion, 28 for FLUX.1 [dev], 4 for [schnell])."""
    return family_of(pipe).sampling_steps(pipe) if steps is None else steps


def resolved_guidance(pipe: Pipeline, guidance: float | None) -> float:
    """`guidance`, or where it is None the base's own (Stable Diffusion 7.5, FLUX.1's distilled 3.5, SD3.5 Large's
    3.5 and Medium's 4.5)."""
    return family_of(pipe).sampling_guidance(pipe) if guidance is None else guidance


def seeded_generator(seed: int) -> torch.Generator:
    """A CPU generator seeded with `seed`, which must be a whole number in 0..MAX_SEED (one rule for every caller)."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed <= MAX_SEED:
        raise HdbError(f"The seed must be a whole number from 0 to {MAX_SEED} (2**63 - 1), not {seed!r}")
    return torch.Generator("cpu").manual_seed(int(seed))


def _report(on_step: Callable[[int], None]) -> Callable:
    def callback(pipe: Pipeline, step: int, timestep: torch.Tensor, tensors: dict) -> dict:
        on_step(step)
        return tensors

    return callback

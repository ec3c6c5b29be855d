"""Rank-relaxed fast finetuning: the last stage of personalising from one photo.

    photo -> aligned face crop -> hypernetwork prediction (rank r, or zero with no hypernetwork)
          -> relax the rank (same function, more freedom) -> ~40 steps of the diffusion loss on the
             photo with the instance prompt -> personal file

`hdb.pipeline.PersonalPipeline.personalize` aligns the photos, starts the LiDB from the prediction and
relaxes its rank (`hdb.relaxations.relax`: "lora", the paper's, keeps the prediction and trains a plain rank-r LoRA
on top of it; "lidb" raises the LiDB's own rank, so every update stays inside the aux bases, a smaller
file); `finetune` here trains it. Either way the personal file holds exactly the weights that were trained.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from hdb.config import DEFAULT_INSTANCE_TOKEN, SAME_PERSON, PersonalizeConfig, instance_prompt_for
from hdb.diffusion import (
    augmented_views,
    diffusion_loss,
    encode_images,
    encode_prompts,
    sample_seed,
    step_loss,
    tokenize_prompts,
)
from hdb.errors import HdbError
from hdb.faces import AlignedFace, cosine, face_embedding
from hdb.families import denoiser
from hdb.lidb import LiDB
from hdb.models import Pipeline, native_resolution, training_scheduler
from hdb.personal_file import PersonalWeights
from hdb.stage import training_stage
from hdb.training import TrainConfig, train

if TYPE_CHECKING:
    import numpy as np

MEMORY_OPTIONS = (
    "`gradient_checkpointing=True`, `optimizer='adamw8bit'`, `dtype='fp16'`, a lower `resolution`, "
    "or a smaller base model"
)


@dataclass
class Personalization:
    """What a personalisation made (`hdb.pipeline.PersonalPipeline.personalize`), and how."""

    weights: PersonalWeights
    faces: list[AlignedFace]  # the aligned photos, in the order given
    losses: list[float]
    steps: int
    used_hypernet: bool

    @property
    def face(self) -> AlignedFace:
        return self.faces[0]

    @functools.cached_property
    def notes(self) -> list[str]:
        """Warnings worth showing, e.g. photos that may show different people: computed when first asked for (face
        descriptors, CPU work that a GPU server keeps out of the time it rents a GPU for)."""
        return same_person_notes(self.faces)


def finetune(
    pipe: Pipeline,
    lidb: LiDB,
    faces: list[AlignedFace],
    config: PersonalizeConfig,
    steps: int,
    on_step: Callable[[int, float], None] | None = None,
) -> list[float]:
    """The fast finetune: `steps` steps of the diffusion loss on the faces' views with the instance prompt,
    training what the relaxed LiDB trains (`hdb.relaxations.relax`). Returns the losses; the LiDB holds the result."""
    fp16 = denoiser(pipe).dtype == torch.float16
    train_config = TrainConfig.of_stage(config, "fast finetuning", steps=steps, fp16_loss_scaling=fp16)
    resolution = config.resolution or native_resolution(pipe)
    with training_stage(pipe, lidb, "finetuning", MEMORY_OPTIONS, config.gradient_checkpointing):
        prompt_tokens = tokenize_prompts(pipe, [instance_prompt_for(config.instance_token)])
        # one view at a time: the VAE encoder's activations at 512 px would otherwise set the peak memory
        views = torch.cat([augmented_views(face.image, resolution) for face in faces])  # every photo's views
        latents = torch.cat([encode_images(pipe, view[None]) for view in views]).float()
        scheduler = training_scheduler(pipe)

        def loss_fn(step: int) -> torch.Tensor:
            view = latents[step % len(latents)].unsqueeze(0)
            return step_loss(pipe, scheduler, view, prompt_tokens, [sample_seed(config.seed, step)]).mean()

        with lidb.merged_while_training():
            return train(lidb.trainable_parameters(), loss_fn, train_config, on_step).losses


def same_person_notes(faces: list[AlignedFace], descriptors: list[np.ndarray] | None = None) -> list[str]:
    """A warning for each photo whose face looks like someone else than the first photo's.

    `descriptors`: the faces' descriptors (`face_embedding`) where the caller has them already.
    """
    if len(faces) < 2:
        return []  # one photo: nothing to compare, and no descriptor to compute
    notes = []
    first, *others = descriptors or [face_embedding(face) for face in faces]  # each photo's descriptor once
    for number, descriptor in enumerate(others, start=2):
        similarity = cosine(first, descriptor)
        if similarity < SAME_PERSON:
            notes.append(
                f"Photo {number} may show someone other than photo 1 (face similarity {similarity:.2f}; "
                f"the same person is usually above {SAME_PERSON}): the result mixes them."
            )
    return notes


@torch.no_grad()
def photo_loss(
    pipe: Pipeline,
    lidb: LiDB,
    face: AlignedFace,
    instance_token: str = DEFAULT_INSTANCE_TOKEN,
    draws: int = 8,
    seed: int = 1234,
    resolution: int | None = None,
) -> float:
    """Diffusion loss of the current weights on the photo over fixed noise/timestep draws (for comparisons)."""
    resolution = resolution or native_resolution(pipe)
    latents = encode_images(pipe, augmented_views(face.image, resolution, count=1)).float().repeat(draws, 1, 1, 1)
    generator = torch.Generator().manual_seed(seed)
    scheduler = training_scheduler(pipe)
    noise = torch.randn(latents.shape, generator=generator).to(latents.device)
    timesteps = torch.linspace(50, scheduler.config.num_train_timesteps - 50, draws).long().to(latents.device)
    cond = encode_prompts(pipe, [instance_prompt_for(instance_token)] * draws)
    if not lidb.own.uses_shared:
        raise HdbError("photo_loss needs shared LiDB weights")
    return diffusion_loss(pipe, scheduler, latents, cond, noise, timesteps).mean().item()

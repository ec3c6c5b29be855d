"""Personalise from one photo: align the face, predict LiDB weights, rank-relaxed fast finetuning.

    photo -> aligned face crop -> hypernetwork prediction (rank r, or zero with no hypernetwork)
          -> relax the rank (same function, more freedom) -> ~40 steps of the diffusion loss on the
             photo with the instance prompt -> personal file

Two ways to relax (`PersonalizeConfig.relax`): "lora", the paper's, keeps the prediction and trains a
plain rank-r LoRA on top of it; "lidb" raises the LiDB's own rank, so every update stays inside the
aux bases (a smaller file). Either way the personal file holds exactly the weights that were trained.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from hdb.config import (
    DEFAULT_INSTANCE_TOKEN,
    MAX_PHOTOS,
    RELAX_MODES,
    SAME_PERSON,
    STEPS_FROM_ZERO,
    STEPS_WITH_HYPERNET,
    LiDBConfig,
    PersonalizeConfig,
    instance_prompt_for,
)
from hdb.diffusion import (
    augmented_views,
    diffusion_loss,
    encode_images,
    encode_prompts,
    sample_seed,
    step_loss,
    tokenize_prompts,
)
from hdb.errors import HdbError, check_choice
from hdb.evaluate import cosine
from hdb.faces import AlignedFace, ImageSource, align_face, crop_size, face_embedding
from hdb.lidb import LiDB
from hdb.models import Pipeline, native_resolution, training_scheduler
from hdb.personal_file import PersonalWeights
from hdb.stage import training_stage
from hdb.training import TrainConfig, train

if TYPE_CHECKING:
    from hdb.hypernet import HyperNetwork

MEMORY_OPTIONS = (
    "`gradient_checkpointing=True`, `optimizer='adamw8bit'`, `dtype='fp16'`, a lower `resolution`, "
    "or a smaller base model"
)


@dataclass
class Personalization:
    weights: PersonalWeights
    lidb: LiDB  # attached to the pipeline, holding the trained person
    faces: list[AlignedFace]  # the aligned photos, in the order given
    losses: list[float]
    steps: int
    used_hypernet: bool
    notes: list[str]  # warnings worth showing, e.g. photos that may show different people

    @property
    def face(self) -> AlignedFace:
        return self.faces[0]


def personalize(
    pipe: Pipeline,
    photo: ImageSource | AlignedFace | list[ImageSource | AlignedFace],
    hypernet: HyperNetwork | None = None,
    config: PersonalizeConfig | None = None,
    lidb: LiDB | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> Personalization:
    """Personalise `pipe` to the face in `photo` (or in up to MAX_PHOTOS photos of one person); the LiDB stays
    attached, holding the person. With several photos the finetune draws its views from all of them, and
    the hypernetwork's prediction is the mean of its per-photo predictions.

    `lidb`: the pipeline's LiDB to train (a server reuses one for every visitor); None attaches a new
    one, and takes it off again if personalisation fails, so the pipeline is left as it was found.
    """
    config = config or PersonalizeConfig()
    check_choice("relaxation", config.relax, RELAX_MODES)
    resolution = config.resolution or native_resolution(pipe)
    photos = photo if isinstance(photo, list) else [photo]
    if not 1 <= len(photos) <= MAX_PHOTOS:
        raise HdbError(f"Personalise from 1 to {MAX_PHOTOS} photos of one person, not {len(photos)}")
    faces = [p if isinstance(p, AlignedFace) else align_face(p, size=crop_size(resolution)) for p in photos]
    if lidb is not None:
        if config.lidb is not None:
            lidb.require(config.lidb)
        return _finetune(pipe, faces, hypernet, config, lidb, resolution, on_step)
    lidb = LiDB(pipe, config.lidb or (hypernet.lidb_config if hypernet is not None else LiDBConfig()))
    try:
        return _finetune(pipe, faces, hypernet, config, lidb, resolution, on_step)
    except BaseException:
        lidb.detach()
        raise


def _finetune(
    pipe: Pipeline,
    faces: list[AlignedFace],
    hypernet: HyperNetwork | None,
    config: PersonalizeConfig,
    lidb: LiDB,
    resolution: int,
    on_step: Callable[[int, float], None] | None,
) -> Personalization:
    """Prediction (or zero), rank relaxation, then the fast finetune on the photo's views."""
    steps = config.steps if config.steps is not None else STEPS_WITH_HYPERNET if hypernet else STEPS_FROM_ZERO
    train_config = TrainConfig(
        steps=steps,
        learning_rate=config.learning_rate,
        optimizer=config.optimizer,
        fp16_loss_scaling=pipe.unet.dtype == torch.float16,
        progress=config.progress,
        description="fast finetuning",
    )
    prompt = instance_prompt_for(config.instance_token)
    with training_stage(pipe, lidb, "finetuning", MEMORY_OPTIONS, config.gradient_checkpointing):
        if hypernet is not None:
            hypernet.check_compatible(lidb)
            predictions = [hypernet.predict(face.image) for face in faces]
            A, B = (torch.stack(parts).mean(dim=0) for parts in zip(*predictions, strict=True))
        else:
            A, B = lidb.initial_weights()
        relaxed_rows = torch.Generator().manual_seed(config.seed)  # the same person from the same seed
        device = lidb.A_train.device
        if config.relax == "lora":  # the paper: the prediction stays, a plain LoRA on top trains
            lidb.start_from(A.to(device), B.to(device))
            lidb.add_lora(config.relaxed_rank, relaxed_rows)
        else:
            lidb.start_from(A.to(device), B.to(device), max(config.relaxed_rank, A.shape[1]), relaxed_rows)
        lidb.set_scale(1.0)  # train the person at full strength, whatever the last generation used
        prompt_tokens = tokenize_prompts(pipe, [prompt])
        # one view at a time: the VAE encoder's activations at 512 px would otherwise set the peak memory
        views = torch.cat([augmented_views(face.image, resolution) for face in faces])  # every photo's views
        latents = torch.cat([encode_images(pipe, view[None]) for view in views]).float()
        scheduler = training_scheduler(pipe)

        def loss_fn(step: int) -> torch.Tensor:
            view = latents[step % len(latents)].unsqueeze(0)
            return step_loss(pipe, scheduler, view, prompt_tokens, [sample_seed(config.seed, step)]).mean()

        try:
            if config.relax == "lora":  # the prediction stays fixed: fold it into the weights while the LoRA
                lidb.merge(lora=False)  # trains, so a step costs what a plain LoRA step costs
            losses = train(lidb.trainable_parameters(), loss_fn, train_config, on_step).losses
        finally:
            lidb.unmerge()  # the exact base weights back; the person stays attached, unmerged
    weights = PersonalWeights.from_lidb(lidb, prompt, config.instance_token)
    return Personalization(weights, lidb, faces, losses, steps, hypernet is not None, _same_person_notes(faces))


def _same_person_notes(faces: list[AlignedFace]) -> list[str]:
    """A warning for each photo whose face looks like someone else than the first photo's."""
    if len(faces) < 2:
        return []  # one photo: nothing to compare, and no descriptor to compute
    notes = []
    first, *others = [face_embedding(face) for face in faces]  # each photo's descriptor once
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
    if lidb.source.A is not lidb.A_train:
        raise HdbError("photo_loss needs shared LiDB weights")
    return diffusion_loss(pipe, scheduler, latents, cond, noise, timesteps).mean().item()

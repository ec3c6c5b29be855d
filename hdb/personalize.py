"""Personalise from one photo: align the face, predict LiDB weights, rank-relaxed fast finetuning.

    photo -> aligned face crop -> hypernetwork prediction (rank r, or zero with no hypernetwork)
          -> relax the rank (same function, more freedom) -> ~40 steps of the diffusion loss on the
             photo with the instance prompt -> personal file

The result lives in the LiDB space, so the personal file holds exactly the weights that were trained.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from PIL import Image, ImageOps

from hdb.diffusion import diffusion_loss, encode_images, encode_prompts, encode_tokens, to_pixels, tokenize_prompts
from hdb.errors import HdbError
from hdb.faces import AlignedFace, ImageSource, align_face, crop_size
from hdb.lidb import LiDB, LiDBConfig, text_encoders
from hdb.models import training_scheduler
from hdb.personal_file import DEFAULT_INSTANCE_TOKEN, PersonalWeights, instance_prompt_for
from hdb.training import TrainConfig, freeze, train

STEPS_WITH_HYPERNET = 40  # the paper's fast finetuning
STEPS_FROM_ZERO = 200  # no prediction to start from: more steps


@dataclass
class PersonalizeConfig:
    steps: int | None = None  # None: 40 from a hypernetwork prediction, 200 from zero
    relaxed_rank: int = 4  # rank of the fast-finetuned adapter (1 keeps the paper's r=1 file size)
    learning_rate: float = 1e-3
    optimizer: str = "adamw"  # or "adamw8bit" (bitsandbytes)
    gradient_checkpointing: bool = False
    seed: int = 0
    resolution: int | None = None  # None: the base model's native size (512 for SD1.5)
    instance_token: str = DEFAULT_INSTANCE_TOKEN
    lidb: LiDBConfig = field(default_factory=LiDBConfig)
    progress: bool = True


@dataclass
class Personalization:
    weights: PersonalWeights
    lidb: LiDB  # attached to the pipeline, holding the trained person
    face: AlignedFace
    losses: list[float]
    steps: int
    used_hypernet: bool


def native_resolution(pipe) -> int:
    return pipe.unet.config.sample_size * pipe.vae_scale_factor


def augmented_views(image: Image.Image, resolution: int, count: int = 4) -> torch.Tensor:
    """Light augmentation of the one photo: mirror and slight zooms. Pixels in [-1, 1]: [count, 3, R, R]."""
    views = [image, ImageOps.mirror(image)]
    for zoom in (0.92, 0.85)[: max(count - 2, 0)]:
        margin = int(image.width * (1 - zoom) / 2)
        views.append(image.crop((margin, margin, image.width - margin, image.height - margin)))
    return to_pixels([view.resize((resolution, resolution), Image.BICUBIC) for view in views[:count]])


def personalize(
    pipe,
    photo: ImageSource | AlignedFace,
    hypernet=None,
    config: PersonalizeConfig = PersonalizeConfig(),
    lidb: LiDB | None = None,
    on_step=None,
) -> Personalization:
    """Personalise `pipe` to the face in `photo`; LiDB stays attached with the person's weights."""
    resolution = config.resolution or native_resolution(pipe)
    face = photo if isinstance(photo, AlignedFace) else align_face(photo, size=crop_size(resolution))
    lidb = lidb or LiDB.attached(pipe) or LiDB(pipe, hypernet.lidb_config if hypernet is not None else config.lidb)
    if hypernet is not None:
        hypernet.check_compatible(lidb)
        A, B = hypernet.predict(face.image)
    else:
        A, B = lidb.initial_weights()
    relaxed_rows = torch.Generator().manual_seed(config.seed)  # the same person from the same seed
    lidb.start_from(
        A.to(lidb.A_train.device), B.to(lidb.A_train.device), max(config.relaxed_rank, A.shape[1]), relaxed_rows
    )
    lidb.set_scale(1.0)  # train the person at full strength, whatever the last generation used
    steps = (
        config.steps if config.steps is not None else (STEPS_WITH_HYPERNET if hypernet is not None else STEPS_FROM_ZERO)
    )

    freeze(pipe.unet, pipe.vae, *text_encoders(pipe).values())
    prompt_tokens = tokenize_prompts(pipe, [instance_prompt_for(config.instance_token)])
    # one view at a time: the VAE encoder's activations at 512 px would otherwise set the peak memory
    latents = torch.cat([encode_images(pipe, view[None]) for view in augmented_views(face.image, resolution)]).float()
    scheduler = training_scheduler(pipe)
    device = pipe.unet.device
    generator = torch.Generator(device).manual_seed(
        config.seed
    )  # reproducible noise and timesteps, drawn on the device

    def loss_fn(step: int) -> torch.Tensor:
        view = latents[step % len(latents)].unsqueeze(0)
        noise = torch.randn(view.shape, generator=generator, device=device)
        timestep = torch.randint(0, scheduler.config.num_train_timesteps, (1,), generator=generator, device=device)
        return diffusion_loss(pipe, scheduler, view, encode_tokens(pipe, prompt_tokens), noise, timestep).mean()

    modules = [pipe.unet, *text_encoders(pipe).values()]
    if config.gradient_checkpointing:
        pipe.unet.enable_gradient_checkpointing()
        for encoder in text_encoders(pipe).values():
            encoder.gradient_checkpointing_enable()
    for module in modules:
        module.train()  # gradient checkpointing only runs in train mode; SD has no dropout to mind
    train_config = TrainConfig(
        steps=steps,
        learning_rate=config.learning_rate,
        optimizer=config.optimizer,
        fp16_loss_scaling=pipe.unet.dtype == torch.float16,
        progress=config.progress,
        description="fast finetuning",
    )
    try:
        losses = train(lidb.trainable_parameters(), loss_fn, train_config, on_step)
    except torch.OutOfMemoryError:
        raise HdbError(
            "The GPU ran out of memory while finetuning. Lower memory with --gradient-checkpointing, "
            "--optimizer adamw8bit, --dtype fp16, a lower --resolution, or use a smaller base model."
        ) from None
    finally:
        for module in modules:
            module.eval()
        if config.gradient_checkpointing:
            pipe.unet.disable_gradient_checkpointing()
            for encoder in text_encoders(pipe).values():
                encoder.gradient_checkpointing_disable()
    weights = PersonalWeights.from_lidb(lidb, instance_prompt_for(config.instance_token), config.instance_token)
    return Personalization(weights, lidb, face, losses, steps, hypernet is not None)


@torch.no_grad()
def photo_loss(
    pipe,
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

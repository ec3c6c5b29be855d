"""The diffusion objective, written once for every family (hdb.families): encode prompts, predict, loss.

Every stage trains with one step recipe, `step_loss`: pre-optimisation, hypernetwork training, fast
finetuning, the toy's base model and the bench's baselines. Each sample's noise and timestep come
from its own seed (`sample_seed(run seed, identity, step)`), drawn on the device, so a result never
depends on how samples were batched, grouped or spread over processes.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch
from PIL import Image, ImageOps

from hdb.families import Conditioning, family_of
from hdb.models import Pipeline

__all__ = ["Conditioning"]  # the family-neutral conditioning, where the objective's callers find it


def tokenize_prompts(pipe: Pipeline, prompts: list[str]) -> list[torch.Tensor]:
    """Token ids of `prompts` for each of the pipeline's text encoders, on its device.

    A training loop tokenises its prompt once and calls `encode_tokens` every step (`Family.tokenize` says why).
    """
    return family_of(pipe).tokenize(pipe, prompts)


def encode_tokens(pipe: Pipeline, token_ids: list[torch.Tensor]) -> Conditioning:
    """Text embeddings with gradients (the text encoders carry LiDB layers too), as `pipe.encode_prompt` makes them."""
    return family_of(pipe).encode_tokens(pipe, token_ids)


def encode_prompts(pipe: Pipeline, prompts: list[str]) -> Conditioning:
    """Text embeddings with gradients, for prompts that change from call to call."""
    return encode_tokens(pipe, tokenize_prompts(pipe, prompts))


def predict_noise(pipe: Pipeline, latents: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
    """The denoiser's prediction (noise, v, or a flow, as the family says) for a batch of noisy latents."""
    return family_of(pipe).predict(pipe, latents, timesteps, cond)


def to_pixels(images: list[Image.Image]) -> torch.Tensor:
    """RGB images of one size -> [B, 3, H, W] in [-1, 1], what `encode_images` takes."""
    return (
        torch.from_numpy(np.stack([np.asarray(image, dtype=np.float32) for image in images])).permute(0, 3, 1, 2)
        / 127.5
        - 1.0
    )


AUGMENTATION_VERSION = 1  # of augmented_views: change it with them (training caches of their latents are refused)


def augmented_views(image: Image.Image, resolution: int, count: int = 4) -> torch.Tensor:
    """Light augmentation of one photo: mirror and slight zooms. Pixels in [-1, 1]: [count, 3, R, R]."""
    views = [image, ImageOps.mirror(image)]
    for zoom in (0.92, 0.85)[: max(count - 2, 0)]:
        margin = int(image.width * (1 - zoom) / 2)
        views.append(image.crop((margin, margin, image.width - margin, image.height - margin)))
    return to_pixels([view.resize((resolution, resolution), Image.BICUBIC) for view in views[:count]])


@torch.no_grad()
def encode_images(pipe: Pipeline, pixels: torch.Tensor) -> torch.Tensor:
    """Pixels in [-1, 1], [B, 3, H, W] -> the latents the denoiser works on (the posterior mean: one photo, no
    sampling noise)."""
    return family_of(pipe).encode_images(pipe, pixels)


def diffusion_loss(
    pipe: Pipeline,
    scheduler: object,
    latents: torch.Tensor,
    cond: Conditioning,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
) -> torch.Tensor:
    """Per-sample loss of the denoiser's prediction against its family's target, at this noise and timesteps: [B]."""
    return family_of(pipe).diffusion_loss(pipe, scheduler, latents, cond, noise, timesteps)


# ----------------------------------------------------------------------------- the step recipe


def sample_seed(*keys: int | str) -> int:
    """A seed made from keys such as (run seed, identity, step): the same keys give the same draw in any process."""
    digest = hashlib.sha256("|".join(map(str, keys)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def draw_noise(latents: torch.Tensor, seeds: list[int], num_timesteps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise like each sample of `latents` and a timestep for it, each sample from its own seed, on their device."""
    device = latents.device
    noise, timesteps = [], []
    for seed in seeds:
        generator = torch.Generator(device).manual_seed(seed)
        timesteps.append(torch.randint(0, num_timesteps, (1,), generator=generator, device=device))
        noise.append(torch.randn(latents.shape[1:], generator=generator, device=device))
    return torch.stack(noise), torch.cat(timesteps)


def step_loss(
    pipe: Pipeline,
    scheduler: object,
    latents: torch.Tensor,
    prompt: list[torch.Tensor] | Conditioning,
    seeds: list[int],
) -> torch.Tensor:
    """One training step's diffusion loss per sample, [B], at noise and timesteps drawn from `seeds` (one each).

    `prompt` is one prompt for the whole batch: its token ids from `tokenize_prompts` (encoded here, with
    gradients, since the text encoders carry LiDB layers), or a `Conditioning` already encoded when the
    text encoders are frozen and bare.
    """
    if len(seeds) != len(latents):
        raise ValueError(f"step_loss needs one seed per sample: {len(seeds)} seeds for {len(latents)} latents")
    noise, timesteps = draw_noise(latents, seeds, scheduler.config.num_train_timesteps)
    if isinstance(prompt, Conditioning):
        cond = prompt.expand(len(latents))
    else:  # per-sample LiDB weights in the text encoders: every sample encodes its own copy
        cond = encode_tokens(pipe, [ids.expand(len(latents), -1) for ids in prompt])
    return diffusion_loss(pipe, scheduler, latents, cond, noise, timesteps)

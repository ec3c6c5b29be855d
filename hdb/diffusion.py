"""The diffusion objective, written once for SD1.x/2.x and SDXL: encode prompts, predict noise, loss.

Every stage trains with one step recipe, `step_loss`: pre-optimisation, hypernetwork training, fast
finetuning, the toy's base model and the bench's baselines. Each sample's noise and timestep come
from its own seed (`sample_seed(run seed, identity, step)`), drawn on the device, so a result never
depends on how samples were batched, grouped or spread over processes.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from PIL import Image, ImageOps

from hdb.models import Pipeline, is_sdxl


@dataclass
class Conditioning:
    """What the UNet is conditioned on: token embeddings, plus SDXL's pooled text embedding."""

    embeds: torch.Tensor  # [B, 77, D]
    pooled: torch.Tensor | None = None  # SDXL only: [B, D2]

    def expand(self, batch: int) -> Conditioning:
        """The same conditioning for every sample of a batch (from a batch of one)."""
        if self.embeds.shape[0] == batch:
            return self
        pooled = None if self.pooled is None else self.pooled.expand(batch, -1)
        return Conditioning(self.embeds.expand(batch, -1, -1), pooled)


def tokenize_prompts(pipe: Pipeline, prompts: list[str]) -> list[torch.Tensor]:
    """Token ids of `prompts` for each of the pipeline's text encoders ([B, 77] each), on its device.

    A training loop tokenises its prompt once and calls `encode_tokens` every step:
    `pipe.encode_prompt` tokenises and copies the ids to the GPU on every call, and a blocking copy
    to the GPU waits for all the work queued there, which would stall every step.
    """
    pairs = [(pipe.tokenizer, pipe.text_encoder)] + ([(pipe.tokenizer_2, pipe.text_encoder_2)] if is_sdxl(pipe) else [])
    return [
        tokenizer(
            prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids.to(encoder.device)
        for tokenizer, encoder in pairs
    ]


def encode_tokens(pipe: Pipeline, token_ids: list[torch.Tensor]) -> Conditioning:
    """Text embeddings with gradients (the text encoders carry LiDB layers too), as `pipe.encode_prompt` makes them."""
    device = pipe.unet.device
    if not is_sdxl(pipe):
        return Conditioning(pipe.text_encoder(token_ids[0])[0].to(device))
    # SDXL: the two encoders' penultimate hidden states side by side, and the second one's pooled embedding
    first = pipe.text_encoder(token_ids[0], output_hidden_states=True)
    second = pipe.text_encoder_2(token_ids[1], output_hidden_states=True)
    embeds = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
    return Conditioning(embeds.to(device, pipe.text_encoder_2.dtype), second[0].to(device))


def encode_prompts(pipe: Pipeline, prompts: list[str]) -> Conditioning:
    """Text embeddings with gradients, for prompts that change from call to call."""
    return encode_tokens(pipe, tokenize_prompts(pipe, prompts))


def predict_noise(pipe: Pipeline, latents: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
    """The UNet's prediction (noise or v, as the scheduler says) for a batch of noisy latents."""
    added = None
    if cond.pooled is not None:  # SDXL micro-conditioning: original size, crop (0, 0), target size
        size = latents.shape[-1] * pipe.vae_scale_factor
        time_ids = torch.tensor([size, size, 0, 0, size, size], device=latents.device, dtype=cond.pooled.dtype)
        added = {"text_embeds": cond.pooled, "time_ids": time_ids.repeat(latents.shape[0], 1)}
    return pipe.unet(latents, timesteps, encoder_hidden_states=cond.embeds, added_cond_kwargs=added).sample


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
    """Pixels in [-1, 1], [B, 3, H, W] -> scaled VAE latents (the posterior mean: one photo, no sampling noise)."""
    vae = pipe.vae
    latents = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mean
    return latents * vae.config.scaling_factor


def diffusion_loss(
    pipe: Pipeline,
    scheduler: DDPMScheduler,
    latents: torch.Tensor,
    cond: Conditioning,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
) -> torch.Tensor:
    """Per-sample MSE between the UNet's prediction and its target at the given noise and timesteps: [B]."""
    noisy = scheduler.add_noise(latents, noise, timesteps)
    prediction = predict_noise(pipe, noisy.to(pipe.unet.dtype), timesteps, cond)
    if scheduler.config.prediction_type == "v_prediction":  # SD2.1-768
        target = scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    return F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))


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
    scheduler: DDPMScheduler,
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

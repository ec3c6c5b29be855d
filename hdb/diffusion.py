"""The diffusion objective, written once for SD1.x/2.x and SDXL: encode prompts, predict noise, loss.

Every stage trains with it: pre-optimisation, hypernetwork training and fast finetuning.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from PIL import Image

from hdb.models import is_sdxl


@dataclass
class Conditioning:
    """What the UNet is conditioned on: token embeddings, plus SDXL's pooled text embedding."""

    embeds: torch.Tensor  # [B, 77, D]
    pooled: torch.Tensor | None = None  # SDXL only: [B, D2]


def tokenize_prompts(pipe, prompts: list[str]) -> list[torch.Tensor]:
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


def encode_tokens(pipe, token_ids: list[torch.Tensor]) -> Conditioning:
    """Text embeddings with gradients (the text encoders carry LiDB layers too), as `pipe.encode_prompt` makes them."""
    device = pipe.unet.device
    if not is_sdxl(pipe):
        return Conditioning(pipe.text_encoder(token_ids[0])[0].to(device))
    # SDXL: the two encoders' penultimate hidden states side by side, and the second one's pooled embedding
    first = pipe.text_encoder(token_ids[0], output_hidden_states=True)
    second = pipe.text_encoder_2(token_ids[1], output_hidden_states=True)
    embeds = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
    return Conditioning(embeds.to(device, pipe.text_encoder_2.dtype), second[0].to(device))


def encode_prompts(pipe, prompts: list[str]) -> Conditioning:
    """Text embeddings with gradients, for prompts that change from call to call."""
    return encode_tokens(pipe, tokenize_prompts(pipe, prompts))


def predict_noise(pipe, latents: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
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


@torch.no_grad()
def encode_images(pipe, pixels: torch.Tensor) -> torch.Tensor:
    """Pixels in [-1, 1], [B, 3, H, W] -> scaled VAE latents (the posterior mean: one photo, no sampling noise)."""
    vae = pipe.vae
    latents = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mean
    return latents * vae.config.scaling_factor


def diffusion_loss(
    pipe,
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

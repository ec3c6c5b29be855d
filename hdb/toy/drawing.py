"""A VAE for the toy's world, so that its base draws people instead of noise (docs/TOY.md, "A base that draws").

The tiny pipeline's VAE is random: the base learns its latents well enough to tell people apart by diffusion loss,
but decodes noise. This one is diffusers' AutoencoderTiny (plain convolutions, TAESD's shape) at the tiny UNet's
8x8x4 latents, trained as a plain autoencoder on the crowd's colour renders. Its loss weighs the colour part of the
error (each pixel's error minus its mean over the channels) `COLOUR_WEIGHT` times the brightness part: trained on
plain L1 + L2, or on renders half in grey, it rebuilds everything in grey (scripts/toy_drawing_probe.py's probes).
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderTiny
from PIL import Image

from hdb.diffusion import sample_seed, to_pixels
from hdb.seeding import initialised_from
from hdb.training import TrainConfig, train

COLOUR_WEIGHT = 4.0
AUTOENCODER_BATCH = 16
AUTOENCODER_LR = 1e-3


def toy_autoencoder(seed: int) -> AutoencoderTiny:
    """An untrained AutoencoderTiny of 16 channels whose latents are the tiny UNet's (64 px -> 8x8x4)."""
    with initialised_from(seed):
        return AutoencoderTiny(
            encoder_block_out_channels=(16,) * 4,
            decoder_block_out_channels=(16,) * 4,
            num_encoder_blocks=(1, 2, 2, 2),
            num_decoder_blocks=(2, 2, 2, 1),
        )


def colour_weighted_error(rebuilt: torch.Tensor, pixels: torch.Tensor, colour_weight: float) -> torch.Tensor:
    """L1 + L2 of the error's brightness part (its mean over the channels) plus `colour_weight` times the same of
    the colour part (what is left)."""
    error = rebuilt - pixels
    light = error.mean(dim=1, keepdim=True)
    colour = error - light
    return (light**2).mean() + light.abs().mean() + colour_weight * ((colour**2).mean() + colour.abs().mean())


def train_autoencoder(
    renders: list[Image.Image], steps: int, seed: int, colour_weight: float = COLOUR_WEIGHT, progress: bool = True
) -> tuple[AutoencoderTiny, list[float]]:
    """`toy_autoencoder` fitted to `renders` (batches of AUTOENCODER_BATCH, a cosine-decayed learning rate): the
    autoencoder, in eval mode and frozen, and its losses."""
    vae, pixels = toy_autoencoder(seed), to_pixels(renders)

    def loss_fn(step: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(sample_seed(seed, "autoencoder batch", step))
        batch = pixels[torch.randint(0, len(pixels), (AUTOENCODER_BATCH,), generator=generator)]
        return colour_weighted_error(vae.decode(vae.encode(batch).latents).sample, batch, colour_weight)

    config = TrainConfig(
        steps=steps,
        learning_rate=AUTOENCODER_LR,
        lr_schedule="cosine",
        max_grad_norm=None,  # the probe's recipe: Adam, unclipped
        progress=progress,
        description="training the VAE",
    )
    losses = train(list(vae.parameters()), loss_fn, config).losses
    return vae.eval().requires_grad_(False), losses


def colourfulness(pixels: torch.Tensor) -> torch.Tensor:
    """How far each picture is from grey: the mean |value - its pixel's mean over the channels| ([B, 3, H, W] in
    [-1, 1] -> [B]; 0 for black and white, about 0.18 for the world's colour renders)."""
    return (pixels - pixels.mean(dim=1, keepdim=True)).abs().mean(dim=(1, 2, 3))

"""Small helpers shared by the tests."""

import torch

from hdb.diffusion import encode_prompts, predict_noise
from hdb.lidb import LiDB, LiDBConfig

PROMPTS = ["a photo of sks person", "a painting of a dog"]


def forward(pipe, prompts=PROMPTS, seed=0):
    """Text conditioning and UNet noise prediction for a fixed batch."""
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(len(prompts), 4, 8, 8, generator=generator)
    timesteps = torch.tensor([10, 700, 300, 999][: len(prompts)])
    cond = encode_prompts(pipe, prompts)
    return cond, predict_noise(pipe, latents, timesteps, cond)


def trained_person(pipe, seed: int = 0, config: LiDBConfig = LiDBConfig()) -> LiDB:
    """Attach LiDB with random non-zero weights, standing in for a trained person."""
    lidb = LiDB(pipe, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        lidb.A_train.copy_(torch.randn(lidb.A_train.shape, generator=generator) * 0.1)
        lidb.B_train.copy_(torch.randn(lidb.B_train.shape, generator=generator) * 0.3)
    return lidb

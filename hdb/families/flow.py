"""What the flow-matching transformer families (FLUX.1: flux.py, SD3.5: sd3.py) share: the objective and the latents.

Flow matching (as diffusers' FLUX and SD3 DreamBooth scripts train): x_t = (1 - sigma) x0 + sigma noise at a sigma of
the scheduler's 1,000-step grid, the target the flow, noise - x0. Which grid points a family draws
(`timestep_index`) is its own: uniform by default. Latents are shifted as well as scaled.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler

from hdb.families.family import Conditioning, Family


class FlowMatchingFamily(Family):
    denoiser_name = "transformer"

    def prediction_type(self, pipe: DiffusionPipeline) -> str:
        return "flow"

    def timestep_index(self, timesteps: torch.Tensor, steps: int) -> torch.Tensor:
        """The grid points (0 to `steps` - 1) the uniform draws `timesteps` train at: the draws themselves."""
        return timesteps

    def training_scheduler(self, pipe: DiffusionPipeline) -> FlowMatchEulerDiscreteScheduler:
        """A fresh one (a pipeline's own may hold the grid of its last sampling), its 1000-step grid on the
        denoiser's device once: indexing it then copies nothing between devices, which would wait for the GPU."""
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
        device = self.denoiser(pipe).device
        scheduler.sigmas, scheduler.timesteps = scheduler.sigmas.to(device), scheduler.timesteps.to(device)
        return scheduler

    def diffusion_loss(
        self,
        pipe: DiffusionPipeline,
        scheduler: FlowMatchEulerDiscreteScheduler,
        latents: torch.Tensor,
        cond: Conditioning,
        noise: torch.Tensor,
        timesteps: torch.Tensor,
    ) -> torch.Tensor:
        """Per-sample flow-matching loss at the grid points `timestep_index` makes of the draws (0-999)."""
        index = self.timestep_index(timesteps, scheduler.config.num_train_timesteps)
        sigmas = scheduler.sigmas[index].to(latents.dtype).view(-1, 1, 1, 1)
        noisy = (1.0 - sigmas) * latents + sigmas * noise
        prediction = self.predict(pipe, noisy.to(self.denoiser(pipe).dtype), scheduler.timesteps[index], cond)
        target = noise - latents
        return F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))

    def encode_images(self, pipe: DiffusionPipeline, pixels: torch.Tensor) -> torch.Tensor:
        vae = pipe.vae
        latents = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mean
        return (latents - vae.config.shift_factor) * vae.config.scaling_factor

    def sampling_scheduler(self, pipe: DiffusionPipeline) -> FlowMatchEulerDiscreteScheduler:
        return FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)

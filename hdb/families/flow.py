"""What the flow-matching transformer families (FLUX.1: flux.py, SD3.5: sd3.py) share: the objective, the latents,
and the parts both have (T5-XXL's encoder, a 16-channel VAE), full-size and tiny.

Flow matching (as diffusers' FLUX and SD3 DreamBooth scripts train): x_t = (1 - sigma) x0 + sigma noise at a sigma of
the scheduler's 1,000-step grid, the target the flow, noise - x0. Which grid points a family draws
(`timestep_index`) is its own: uniform by default. Latents are shifted as well as scaled.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DiffusionPipeline, FlowMatchEulerDiscreteScheduler
from transformers import T5Config, T5EncoderModel, T5Tokenizer

from hdb.families.family import Conditioning, Family, vae_latents


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
        return (vae_latents(vae, pixels) - vae.config.shift_factor) * vae.config.scaling_factor

    def sampling_scheduler(self, pipe: DiffusionPipeline) -> FlowMatchEulerDiscreteScheduler:
        return FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)


# -- the parts both families have: T5-XXL's encoder and a 16-channel VAE, full-size (meta device) and tiny

T5_MAX_LENGTH = 512  # the longest prompt T5's tokenizer gives (FluxPipeline reads all of it, SD3.5 256)


def full_size_t5() -> T5Config:
    """T5-XXL v1.1's encoder (google/t5-v1_1-xxl's config.json), as FLUX.1 and SD3.5 read prompts with it."""
    return T5Config(
        vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
        feed_forward_proj="gated-gelu", relative_attention_num_buckets=32, dropout_rate=0.0,
    )  # fmt: skip


def quantless(**latents: float) -> dict[str, object]:
    """A VAE's options for the transformer families' latents: `latents` (channels, scale, shift) and no quant
    convolutions (their VAEs have none)."""
    return {"use_quant_conv": False, "use_post_quant_conv": False, **latents}


def full_size_vae(**latents: float) -> AutoencoderKL:
    """FLUX.1's and SD3.5's 16-channel VAE (the same geometry; `latents` its channels, scale and shift)."""
    return AutoencoderKL(
        block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, sample_size=1024, **quantless(**latents),
    )  # fmt: skip


# A SentencePiece-style unigram vocabulary: T5's ids 0, 1, 2 are <pad>, </s>, <unk>; "▁" starts a word
_WORDS = ("a", "photo", "of", "sks", "face", "person", "man", "woman", "in", "the", "style", "as", "an")
T5_VOCABULARY = (
    [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    + [(f"▁{word}", -1.0) for word in _WORDS]
    + [(character, -5.0) for character in "abcdefghijklmnopqrstuvwxyz0123456789.,[]"]
)


def tiny_t5_encoder(vocab_size: int) -> T5EncoderModel:
    """A one-layer T5 v1.1 encoder (gated GELU, as FLUX.1's and SD3's T5-XXL) of width 32."""
    return T5EncoderModel(
        T5Config(
            vocab_size=vocab_size,
            d_model=32,
            d_kv=8,
            d_ff=37,
            num_layers=1,
            num_heads=4,
            relative_attention_num_buckets=8,
            feed_forward_proj="gated-gelu",
            dropout_rate=0.0,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        )
    )


def tiny_t5_tokenizer() -> T5Tokenizer:
    """A T5 tokenizer of a few dozen pieces, made in code (transformers' T5Tokenizer takes a unigram vocabulary)."""
    return T5Tokenizer(vocab=T5_VOCABULARY, extra_ids=0, model_max_length=T5_MAX_LENGTH)

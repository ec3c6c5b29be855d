"""Stable Diffusion 3.5 (Medium and Large): an MMDiT denoiser on 16-channel latents, three text encoders, flow matching.

What differs from FLUX.1 (flux.py), the other transformer family:
- every block is a joint block: image and text each with their own q/k/v/out (`attn`); the last block's text stream
  stops after its q/k/v (`context_pre_only`: no `to_add_out`); Medium's first blocks also have a second,
  image-only attention (`attn2`, "MMDiT-X"); both normalise q and k (`qk_norm`);
- prompts: CLIP-L's and CLIP-G's penultimate hidden states side by side, padded to T5-XXL's width and followed by
  T5's token embeddings; both CLIPs' pooled embeddings together;
- latents are not packed, and the transformer reads the scheduler's timestep as it is (0-1000);
- training draws its timesteps logit-normally, as diffusers' examples/dreambooth/train_dreambooth_lora_sd3.py does
  by default (`--weighting_scheme logit_normal`, whose loss weighting is then uniform);
- sampling is classifier-free guidance, with a negative prompt, as Stable Diffusion's.

LiDB targets the attention projections of every block (both streams, and `attn2` where there is one) and of both
CLIP text encoders; not T5, as for FLUX.1. There is no kohya-format export: diffusers has no kohya converter for
SD3, so hdb could not check one against a loader, and ComfyUI reads diffusers' own SD3 LoRA keys ("transformer.…",
comfy/lora.py's `model_lora_keys_unet`), so the diffusers-format file is the one for ComfyUI too.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from accelerate import init_empty_weights
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
from diffusers import SD3Transformer2DModel as Transformer
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5EncoderModel

from hdb.families.family import Conditioning, Variant
from hdb.families.flow import (
    FlowMatchingFamily,
    full_size_t5,
    full_size_vae,
    quantless,
    tiny_t5_encoder,
    tiny_t5_tokenizer,
)
from hdb.families.sd import CLIP_PROJECTIONS, clip_tokenizer, full_size_clip_l, tiny_clip_text_encoder, tiny_vae
from hdb.seeding import initialised_from

MAX_T5_TOKENS = 256  # StableDiffusion3Pipeline's max_sequence_length
# SD3.5's scheduler and VAE settings (scheduler/scheduler_config.json, vae/config.json of both models)
SD3_SCHEDULE = dict(num_train_timesteps=1000, shift=3.0)
SD3_LATENTS = dict(latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609)
# Stability AI Community License, SD3.5 Large's and Medium's (their Hub pages: "License: stabilityai-ai-community")
SD35_LICENSE = dict(
    license_name="stabilityai-ai-community",
    license_link="https://huggingface.co/stabilityai/stable-diffusion-3.5-large/blob/main/LICENSE.md",
)


class StableDiffusion3(FlowMatchingFamily):
    name = "sd3"
    title = "Stable Diffusion 3.5"
    tiny_arch = "sd3"
    pipeline_class = StableDiffusion3Pipeline
    text_encoder_names = ("text_encoder", "text_encoder_2", "text_encoder_3")
    lidb_text_encoder_names = ("text_encoder", "text_encoder_2")  # the two CLIPs, not T5 (the docstring says why)
    max_prompt_tokens = MAX_T5_TOKENS
    text_projections = CLIP_PROJECTIONS
    denoiser_projections = (
        ("to_q", "to_k", "to_v", "to_out.0"),  # the image stream's attention, and Medium's image-only `attn2`
        ("add_q_proj", "add_k_proj", "add_v_proj"),  # the text stream's, in every block ...
        ("to_add_out",),  # ... and its output, but in the last block
    )
    lora_formats = ("diffusers",)  # no kohya format (the docstring says why)
    kohya_prefixes: ClassVar[dict[str, str]] = {}
    # Told apart by Medium's second attention; sampling as their model cards draw (Large: 28 steps at guidance 3.5;
    # Medium: 40 at 4.5). SD3.5 Large Turbo has Large's shapes: give it `steps` 4 and `guidance` 0 yourself.
    variants: ClassVar[dict[str, Variant]] = {
        "large": Variant(
            "Stable Diffusion 3.5 Large",
            "stabilityai/stable-diffusion-3.5-large",
            "",
            ("stable-diffusion-3.5-large", "1024x1024", "https://github.com/Stability-AI/sd3.5"),
            "other",
            **SD35_LICENSE,
            sampling_steps=28,
            guidance=3.5,
        ),
        "medium": Variant(
            "Stable Diffusion 3.5 Medium",
            "stabilityai/stable-diffusion-3.5-medium",
            "",
            ("stable-diffusion-3.5-medium", "1024x1024", "https://github.com/Stability-AI/sd3.5"),
            "other",
            **SD35_LICENSE,
            sampling_steps=40,
            guidance=4.5,
        ),
    }
    card_tags = ("sd3", "sd3-diffusers")

    def native_resolution(self, pipe: DiffusionPipeline) -> int:
        return pipe.transformer.config.sample_size * pipe.vae_scale_factor

    def variant_name(self, pipe: DiffusionPipeline) -> str:
        return "medium" if pipe.transformer.config.dual_attention_layers else "large"

    def recognises(self, layer_shapes: dict[str, tuple[int, int]]) -> bool:
        """By its second CLIP beside a transformer (FLUX.1's second text encoder is T5, which LiDB leaves alone)."""
        return super().recognises(layer_shapes) and any(name.startswith("text_encoder_2.") for name in layer_shapes)

    # -- prompts and the transformer

    def encode_tokens(self, pipe: DiffusionPipeline, token_ids: list[torch.Tensor]) -> Conditioning:
        """As `StableDiffusion3Pipeline.encode_prompt` makes them: the CLIPs' penultimate hidden states side by side,
        padded (or cut) to T5's width, then T5's tokens; the CLIPs' pooled embeddings side by side."""
        dtype, device = pipe.transformer.dtype, pipe.transformer.device
        first = pipe.text_encoder(token_ids[0], output_hidden_states=True)
        second = pipe.text_encoder_2(token_ids[1], output_hidden_states=True)
        t5 = pipe.text_encoder_3(token_ids[2])[0]
        clip = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        embeds = torch.cat([clip.to(t5.device, t5.dtype), t5], dim=-2)
        pooled = torch.cat([first[0], second[0]], dim=-1)
        return Conditioning(embeds.to(device, dtype), pooled.to(device, dtype))

    def predict(
        self, pipe: DiffusionPipeline, latents: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning
    ) -> torch.Tensor:
        """The flow (noise - x0) at `timesteps` (the scheduler's, 0-1000)."""
        return pipe.transformer(
            hidden_states=latents,
            timestep=timesteps.to(latents.dtype),
            encoder_hidden_states=cond.embeds,
            pooled_projections=cond.pooled,
            return_dict=False,
        )[0]

    # -- training

    def timestep_index(self, timesteps: torch.Tensor, steps: int) -> torch.Tensor:
        """Logit-normal times: the uniform draws (0-999) mapped through the logit-normal distribution's inverse CDF
        (u -> sigmoid(Phi^-1(u))), so the same draws give the same times."""
        uniform = (timesteps.float() + 0.5) / steps
        return (torch.sigmoid(torch.special.ndtri(uniform)) * steps).long().clamp(0, steps - 1)

    # -- pipelines that are not the real one

    def build_full_size(self) -> DiffusionPipeline:
        """SD3.5 Large's shapes (its transformer/config.json) on the meta device: 8.1B transformer parameters,
        CLIP-L, CLIP-G (695M) and T5-XXL."""
        clip_g = CLIPTextConfig(
            vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
            max_position_embeddings=77, hidden_act="gelu", projection_dim=1280,
            bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
        )  # fmt: skip
        with init_empty_weights(include_buffers=True):  # the positions too: the latents they are added to are meta
            transformer = Transformer(
                sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=38, attention_head_dim=64,
                num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432,
                pooled_projection_dim=2048, pos_embed_max_size=192, qk_norm="rms_norm",
            )  # fmt: skip
            vae = full_size_vae(**SD3_LATENTS)
            text_encoder = CLIPTextModelWithProjection(full_size_clip_l())
            text_encoder_2 = CLIPTextModelWithProjection(clip_g)
            text_encoder_3 = T5EncoderModel(full_size_t5())
        text_encoder_3.tie_weights()  # its token embedding is one tensor twice (the meta device left them untied)
        tokenizer = clip_tokenizer()
        return StableDiffusion3Pipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULE), vae=vae, text_encoder=text_encoder,
            tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer, text_encoder_3=text_encoder_3,
            tokenizer_3=tiny_t5_tokenizer(), transformer=transformer,
        )  # fmt: skip

    # -- tiny pipelines

    def build_tiny(self, seed: int) -> DiffusionPipeline:
        """2 joint blocks of width 32 (the first with Medium's second attention, the last text-pre-only), a
        16-channel VAE (64 px -> 8x8 latents), two CLIPs and a one-layer T5 with a tokenizer made in code."""
        with initialised_from(seed):  # built in this order, so a seed keeps its weights
            transformer = Transformer(
                sample_size=8,
                patch_size=1,
                in_channels=SD3_LATENTS["latent_channels"],
                out_channels=SD3_LATENTS["latent_channels"],
                num_layers=2,
                attention_head_dim=8,
                num_attention_heads=4,
                joint_attention_dim=32,  # T5's width
                caption_projection_dim=32,
                pooled_projection_dim=64,  # both CLIPs' pooled embeddings
                pos_embed_max_size=16,
                qk_norm="rms_norm",  # as SD3.5
                dual_attention_layers=(0,),  # as Medium's first blocks
            )
            vae = tiny_vae(**quantless(**SD3_LATENTS))
            text_encoder, text_encoder_2 = tiny_clip_text_encoder(True), tiny_clip_text_encoder(True)
            tokenizer_3 = tiny_t5_tokenizer()
            text_encoder_3 = tiny_t5_encoder(len(tokenizer_3))
        tokenizer = clip_tokenizer()
        return StableDiffusion3Pipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULE),
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            text_encoder_2=text_encoder_2,
            tokenizer_2=tokenizer,
            text_encoder_3=text_encoder_3,
            tokenizer_3=tokenizer_3,
            transformer=transformer,
        )

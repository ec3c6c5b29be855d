"""FLUX.1: a transformer (MMDiT) denoiser on packed 16-channel latents, CLIP pooled text and T5 tokens, flow matching.

What differs from Stable Diffusion:
- the denoiser is `transformer`: 19 double-stream blocks (image and text each with their own q/k/v/out) and 38
  single-stream blocks (q/k/v only: their output projection is shared with the MLP); it reads 2x2 patches of the
  latents as tokens, with position ids, and (FLUX.1-dev) a distilled guidance value;
- prompts: CLIP-L's pooled embedding and T5-XXL's token embeddings;
- training is flow matching: x_t = (1 - sigma) x0 + sigma noise, the target is noise - x0 (diffusers'
  examples/dreambooth/train_dreambooth_lora_flux.py, whose default timestep weighting, "none", is uniform);
- latents are shifted as well as scaled; sampling has no negative prompt (FLUX.1 is guidance-distilled).

LiDB targets the attention projections of both block kinds (both streams of the double blocks) and of the CLIP text
encoder; not T5 (4.8B parameters, and diffusers' FLUX LoRA loader reads no T5 keys: an export could not carry it).
`LiDBConfig.layers` narrows that: "double-blocks" leaves the single blocks out, "denoiser" the text encoder.

Kohya's FLUX LoRA files (sd-scripts' networks/lora_flux.py, read by ComfyUI and Forge) name Black Forest Labs' own
modules, where one linear computes what diffusers splits in several: a double block's q, k and v of each stream
(`img_attn.qkv`, `txt_attn.qkv`), and a single block's q, k, v and MLP input together (`linear1`, of 3 x width +
the MLP's width rows). LoRAs on the parts are one LoRA on the whole, exactly: down = the parts' downs stacked, up =
their ups block-diagonal (up @ down is then each part's up_i @ down_i in its own rows), with zero rows for the MLP,
which hdb does not target.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from accelerate import init_empty_weights
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, FluxPipeline
from diffusers import FluxTransformer2DModel as Transformer
from transformers import CLIPTextModel, T5EncoderModel

from hdb.errors import HdbError
from hdb.families.family import (
    Conditioning,
    LayerFactors,
    Variant,
    lora_module_path,
)
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

TRAINING_GUIDANCE = 3.5  # the distilled guidance FLUX.1-dev LoRAs are trained at (diffusers' DreamBooth script)
MAX_T5_TOKENS = 512  # FluxPipeline's max_sequence_length
# FLUX.1-dev's scheduler and VAE settings (scheduler_config.json, vae/config.json)
FLUX_SCHEDULE = dict(
    num_train_timesteps=1000,
    shift=3.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=1.15,
    base_image_seq_len=256,
    max_image_seq_len=4096,
)
FLUX_LATENTS = dict(latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159)

# kohya's FLUX modules (BFL's names) per diffusers block kind: kohya's name for the block, and for each of its
# modules hdb targets, the diffusers layers whose rows it stacks, in order
KOHYA_BLOCKS = {
    "transformer_blocks": (
        "double_blocks",
        {
            "img_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
            "img_attn_proj": ("attn.to_out.0",),
            "txt_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
            "txt_attn_proj": ("attn.to_add_out",),
        },
    ),
    "single_transformer_blocks": ("single_blocks", {"linear1": ("attn.to_q", "attn.to_k", "attn.to_v")}),
}
# A single block's linear1 ends with its MLP's input rows (diffusers' proj_mlp), MLP_RATIO x the block's width
# (BFL's mlp_ratio, diffusers' FluxSingleTransformerBlock default: 4 x 3072 = 12288 in FLUX.1)
MLP_RATIO = 4.0
KOHYA_MODULE_WITH_MLP = "linear1"


class Flux(FlowMatchingFamily):
    name = "flux"
    title = "FLUX.1"
    tiny_arch = "flux"
    pipeline_class = FluxPipeline
    text_encoder_names = ("text_encoder", "text_encoder_2")
    lidb_text_encoder_names = ("text_encoder",)  # CLIP only (the module's docstring says why)
    max_prompt_tokens = MAX_T5_TOKENS
    text_projections = CLIP_PROJECTIONS
    denoiser_projections = (
        ("to_q", "to_k", "to_v", "to_out.0"),  # double blocks, image stream
        ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"),  # double blocks, text stream
        ("to_q", "to_k", "to_v"),  # single blocks: no output projection of their own
    )
    layer_choices = ("all", "denoiser", "double-blocks")
    # sd-scripts' networks/lora_flux.py ("make ComfyUI compatible"; T5, which hdb leaves alone, was lora_te2 at first)
    kohya_prefixes: ClassVar[dict[str, str]] = {
        "transformer": "lora_unet",
        "text_encoder": "lora_te1",
        "text_encoder_2": "lora_te3",
    }
    kohya_network_module = "networks.lora_flux"
    # Both predict the flow; they differ in guidance (only [dev] reads a distilled guidance value, which is how a
    # pipeline tells which it is), sampling steps (FluxPipeline's 28; [schnell] is distilled to 4) and licence
    variants: ClassVar[dict[str, Variant]] = {
        "dev": Variant(
            "FLUX.1 [dev]",
            "black-forest-labs/FLUX.1-dev",
            "flux1",
            ("flux-1-dev", "1024x1024", "https://github.com/black-forest-labs/flux"),
            "other",
            "flux-1-dev-non-commercial-license",
            "https://huggingface.co/black-forest-labs/FLUX.1-dev/blob/main/LICENSE.md",
            sampling_steps=28,
        ),
        "schnell": Variant(
            "FLUX.1 [schnell]",
            "black-forest-labs/FLUX.1-schnell",
            "flux1",
            ("flux-1-schnell", "1024x1024", "https://github.com/black-forest-labs/flux"),
            "apache-2.0",
            sampling_steps=4,
        ),
    }
    card_tags = ("flux", "flux-diffusers")
    default_guidance = TRAINING_GUIDANCE  # FLUX.1 [dev]'s usual distilled guidance (FluxPipeline's default too)

    def native_resolution(self, pipe: DiffusionPipeline) -> int:
        return pipe.vae.config.sample_size

    def denoiser_projections_of(self, layers: str) -> tuple[tuple[str, ...], ...]:
        """ "double-blocks": the double blocks' two streams alone (a single block owns no `to_out.0`, so the first
        set finds the double blocks' image stream only)."""
        return self.denoiser_projections[:2] if layers == "double-blocks" else self.denoiser_projections

    def recognises(self, layer_shapes: dict[str, tuple[int, int]]) -> bool:
        """By a transformer without a second CLIP: FLUX.1's second text encoder is T5, which LiDB leaves alone."""
        return super().recognises(layer_shapes) and not any(name.startswith("text_encoder_2.") for name in layer_shapes)

    def variant_name(self, pipe: DiffusionPipeline) -> str:
        return "dev" if pipe.transformer.config.guidance_embeds else "schnell"

    def variant(self, name: str, base_model: str = "") -> Variant:
        """Files from before hdb recorded the variant are taken as [schnell] when their base's name says so (its
        repository, or a folder named after it), else as [dev], whose licence is the stricter."""
        if name not in self.variants:
            name = "schnell" if "schnell" in base_model.lower() else "dev"
        return self.variants[name]

    # -- what LoRA files say

    def kohya_modules(self, factors: LayerFactors) -> LayerFactors:
        """The transformer's layers fused as BFL's modules are (the module's docstring says how); CLIP's one each."""
        parts_found: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}  # kohya module -> its parts' LoRAs
        parts_wanted: dict[str, tuple[str, ...]] = {}
        text: LayerFactors = {}
        for layer, pair in factors.items():
            component, path = lora_module_path(layer)
            if component != self.denoiser_name:
                text[self.kohya_name(layer)] = pair
                continue
            kind, _, in_block = path.partition(".")
            index, _, part = in_block.partition(".")
            block, modules = KOHYA_BLOCKS.get(kind, ("", {}))
            module = next((module for module, parts in modules.items() if part in parts), None)
            if module is None:
                raise HdbError(f"kohya's FLUX LoRA files have no module for the layer {layer}")
            name = f"{self.kohya_prefixes[component]}_{block}_{index}_{module}"
            parts_found.setdefault(name, {})[part] = pair
            parts_wanted[name] = modules[module]
        fused: LayerFactors = {}
        for name, found in parts_found.items():
            missing = [part for part in parts_wanted[name] if part not in found]
            if missing:  # LiDB targets whole sets of projections: every person has all of them
                raise HdbError(f"kohya's FLUX module {name} needs the layers {', '.join(missing)} too")
            downs, ups = zip(*(found[part] for part in parts_wanted[name]), strict=True)
            down, up = torch.cat(downs), torch.block_diag(*ups)
            if name.endswith(f"_{KOHYA_MODULE_WITH_MLP}"):  # the MLP's rows, which hdb leaves as they are
                width = down.shape[1]  # the block's width: what its q projection reads
                up = torch.cat([up, up.new_zeros(int(width * MLP_RATIO), up.shape[1])])
            fused[name] = (down, up)
        return {**fused, **text}

    def modelspec_prediction_type(self, prediction_type: str) -> str | None:
        return None  # sd-scripts write none for FLUX (its flow is the only kind)

    # -- prompts and the transformer

    def encode_tokens(self, pipe: DiffusionPipeline, token_ids: list[torch.Tensor]) -> Conditioning:
        """T5's token embeddings, and CLIP's pooled embedding, as `FluxPipeline.encode_prompt` makes them."""
        dtype, device = pipe.transformer.dtype, pipe.transformer.device
        pooled = pipe.text_encoder(token_ids[0], output_hidden_states=False).pooler_output
        embeds = pipe.text_encoder_2(token_ids[1], output_hidden_states=False)[0]
        return Conditioning(embeds.to(device, dtype), pooled.to(device, dtype))

    def predict(
        self, pipe: DiffusionPipeline, latents: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning
    ) -> torch.Tensor:
        """The flow (noise - x0) at `timesteps` (the scheduler's, 0-1000) for latents [B, 16, h, w]."""
        batch, channels, height, width = latents.shape
        transformer = pipe.transformer
        packed = pipe._pack_latents(latents, batch, channels, height, width)  # 2x2 patches as tokens
        image_ids = pipe._prepare_latent_image_ids(batch, height // 2, width // 2, latents.device, latents.dtype)
        text_ids = torch.zeros(cond.embeds.shape[1], 3, device=latents.device, dtype=latents.dtype)
        guidance = None
        if transformer.config.guidance_embeds:  # FLUX.1-dev; schnell has none
            guidance = torch.full((batch,), TRAINING_GUIDANCE, device=latents.device, dtype=latents.dtype)
        flow = transformer(
            hidden_states=packed,
            timestep=timesteps.to(latents.dtype) / 1000,  # the transformer scales it (and guidance) by 1000 itself
            guidance=guidance,
            pooled_projections=cond.pooled,
            encoder_hidden_states=cond.embeds,
            txt_ids=text_ids,
            img_ids=image_ids,
            return_dict=False,
        )[0]
        scale = pipe.vae_scale_factor
        return pipe._unpack_latents(flow, height * scale, width * scale, scale)

    # -- sampling

    def sampling_arguments(self, negative_prompt: str, guidance: float) -> dict:
        """FLUX.1's guidance is distilled into the model (a number it reads), and it takes no negative prompt."""
        return {"guidance_scale": guidance}

    # -- pipelines that are not the real one

    def build_full_size(self) -> DiffusionPipeline:
        """FLUX.1 [dev]'s shapes (its transformer/config.json: diffusers' defaults, with guidance) on the meta
        device: 11.9B transformer parameters, T5-XXL's 4.8B, CLIP-L's 123M."""
        with init_empty_weights(include_buffers=False):
            transformer = Transformer(guidance_embeds=True)
            vae = full_size_vae(**FLUX_LATENTS)
            text_encoder, text_encoder_2 = CLIPTextModel(full_size_clip_l()), T5EncoderModel(full_size_t5())
        text_encoder_2.tie_weights()  # its token embedding is one tensor twice (the meta device left them untied)
        return FluxPipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULE), vae=vae, text_encoder=text_encoder,
            tokenizer=clip_tokenizer(), text_encoder_2=text_encoder_2, tokenizer_2=tiny_t5_tokenizer(),
            transformer=transformer,
        )  # fmt: skip

    def build_tiny(self, seed: int) -> DiffusionPipeline:
        """1 double and 1 single block of width 32, a 16-channel VAE (64 px -> 8x8 latents -> 16 tokens), CLIP and
        a one-layer T5 with a tokenizer made here (a few words and the alphabet: no download)."""
        with initialised_from(seed):  # built in this order, so a seed keeps its weights
            transformer = Transformer(
                patch_size=1,
                in_channels=4 * FLUX_LATENTS["latent_channels"],  # 2x2 patches of 16 channels
                num_layers=1,
                num_single_layers=1,
                attention_head_dim=16,
                num_attention_heads=2,
                joint_attention_dim=32,  # T5's width
                pooled_projection_dim=32,  # CLIP's
                guidance_embeds=True,  # as FLUX.1-dev
                axes_dims_rope=(4, 6, 6),  # sums to attention_head_dim
            )
            vae = tiny_vae(**quantless(**FLUX_LATENTS))
            text_encoder = tiny_clip_text_encoder(False)
            tokenizer_2 = tiny_t5_tokenizer()
            text_encoder_2 = tiny_t5_encoder(len(tokenizer_2))
        return FluxPipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULE),
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=clip_tokenizer(),
            text_encoder_2=text_encoder_2,
            tokenizer_2=tokenizer_2,
            transformer=transformer,
        )

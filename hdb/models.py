"""Base models: load a Stable Diffusion pipeline (SD1.5, SD2.1, SDXL) or build a tiny random one.

The tiny pipeline has the real architecture families' shapes in miniature (UNet with self- and
cross-attention, a VAE with SD's x8 latent geometry, CLIP text encoder(s)) and the real CLIP
tokenizer, so every code path of hdb runs offline and in seconds on a CPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    DiffusionPipeline,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from hdb.config import COMPILE_MODES, DEFAULT_BASE, TINY_ARCHS
from hdb.devices import resolve_device, resolve_dtype
from hdb.errors import HdbError, check_choice, from_hub_or_directory
from hdb.seeding import initialised_from

TOKENIZER_DIR = Path(__file__).parent / "clip_tokenizer"
SUPPORTED = (StableDiffusionPipeline, StableDiffusionXLPipeline)
Pipeline = StableDiffusionPipeline | StableDiffusionXLPipeline  # what hdb means by "a pipeline"


def load_pipeline(base: str = DEFAULT_BASE, dtype: str | torch.dtype = "auto", device: str | None = "auto") -> Pipeline:
    """Load a Stable Diffusion pipeline from a hub id or a local directory, on `device` in `dtype`.

    Weights come from safetensors files only (pickled .bin weights can run code). In half precision the
    base's fp16 variant is loaded where it has one: half the download (SD1.5: ~2 GB instead of ~4 GB).
    """
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    local = Path(base).expanduser()
    if local.exists() and not (local / "model_index.json").is_file():
        raise HdbError(f"{base} is not a diffusers pipeline directory (it has no model_index.json)")
    if local.exists() and not any(local.rglob("*.safetensors")):
        raise HdbError(
            f"{base} holds no .safetensors weights; hdb does not load pickled .bin weights (they can run code)"
        )

    def load(path: str) -> DiffusionPipeline:
        if torch_dtype in (torch.float16, torch.bfloat16):
            try:
                return DiffusionPipeline.from_pretrained(path, dtype=torch_dtype, variant="fp16", use_safetensors=True)
            except ValueError as error:  # the base has no fp16 variant: its full-precision files, cast
                if "variant" not in str(error):
                    raise
        return DiffusionPipeline.from_pretrained(path, dtype=torch_dtype, use_safetensors=True)

    offline = "To try hdb offline, use a tiny random pipeline as the base model: `hdb.models.save_tiny_pipeline(DIR)`."
    pipe = from_hub_or_directory("base model", base, load, argument="base", offline=offline)
    if not isinstance(pipe, SUPPORTED):
        raise HdbError(f"{base} is a {type(pipe).__name__}; hdb supports Stable Diffusion 1.x/2.x and SDXL pipelines")
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(torch_device)


def is_sdxl(pipe: DiffusionPipeline) -> bool:
    return isinstance(pipe, StableDiffusionXLPipeline)


BASE_FAMILIES = ("sd1", "sd2", "sdxl")  # what hdb records a personal file's base as (kohya exports say it too)


def base_family(pipe: Pipeline) -> str:
    """The Stable Diffusion family of `pipe`: "sdxl" by its pipeline class; "sd2" when its UNet goes in and out of
    attention through linear layers (SD2.x's `use_linear_projection`; SD1.x uses 1x1 convolutions there), the
    one difference the real and the tiny SD2 share (their text encoders' widths are their own); else "sd1"."""
    if is_sdxl(pipe):
        return "sdxl"
    return "sd2" if pipe.unet.config.get("use_linear_projection") else "sd1"


def prediction_type(pipe: Pipeline) -> str:
    """What the UNet predicts: "epsilon" (the noise; SD1.x, SDXL, SD2 base) or "v_prediction" (SD2.x-768)."""
    return pipe.scheduler.config.get("prediction_type", "epsilon")


def native_resolution(pipe: Pipeline) -> int:
    """The image size the base model was trained at (512 for SD1.5, 1024 for SDXL)."""
    return pipe.unet.config.sample_size * pipe.vae_scale_factor


# ----------------------------------------------------------------------------- tiny random pipelines


def _tiny_text_encoder(with_projection: bool, hidden: int = 32) -> torch.nn.Module:
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


def _tiny_vae() -> AutoencoderKL:
    # Four blocks: three 2x downsamplings, SD's x8 latent geometry (64 px image -> 8x8x4 latent).
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        norm_num_groups=8,
        sample_size=64,
    )


def _tiny_unet(arch: str) -> UNet2DConditionModel:
    common = dict(
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
    if arch == "sd15":
        return UNet2DConditionModel(cross_attention_dim=32, **common)
    if arch == "sd2":  # SD2.x projects in and out of its transformers with linear layers
        return UNet2DConditionModel(cross_attention_dim=32, use_linear_projection=True, **common)
    # SDXL conditions on both encoders' hidden states (32 + 32) and on pooled text + 6 size/crop numbers.
    return UNet2DConditionModel(
        cross_attention_dim=64,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 32,
        use_linear_projection=True,
        **common,
    )


def build_tiny_pipeline(arch: str = "sd15", seed: int = 0) -> Pipeline:
    """A randomly initialised pipeline of the given family, built offline in under a second."""
    check_choice("tiny architecture", arch, TINY_ARCHS)
    tokenizer = CLIPTokenizer(str(TOKENIZER_DIR / "vocab.json"), str(TOKENIZER_DIR / "merges.txt"), model_max_length=77)
    # SD1.5's own scheduler settings: scaled-linear betas, 1000 steps.
    schedule = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
    if arch == "sd2":  # SD2.1-768's: the UNet predicts the velocity v, not the noise
        scheduler = DDIMScheduler(
            prediction_type="v_prediction", clip_sample=False, set_alpha_to_one=False, steps_offset=1, **schedule
        )
    else:
        scheduler = PNDMScheduler(skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1, **schedule)
    with initialised_from(seed):  # built in this order, so a seed keeps its weights
        unet, vae, text_encoder = _tiny_unet(arch), _tiny_vae(), _tiny_text_encoder(False)
        text_encoder_2 = _tiny_text_encoder(True) if arch == "sdxl" else None
    parts = dict(unet=unet, vae=vae, scheduler=scheduler, tokenizer=tokenizer, text_encoder=text_encoder)
    if arch in ("sd15", "sd2"):
        return StableDiffusionPipeline(
            safety_checker=None, feature_extractor=None, requires_safety_checker=False, **parts
        )
    return StableDiffusionXLPipeline(text_encoder_2=text_encoder_2, tokenizer_2=tokenizer, **parts)


def save_tiny_pipeline(out_dir: str | Path, arch: str = "sd15", seed: int = 0) -> Path:
    """Write a tiny pipeline that `load_pipeline(out_dir)` loads; a marker file says it is untrained."""
    out = Path(out_dir)
    build_tiny_pipeline(arch, seed).save_pretrained(out, safe_serialization=True)
    (out / "hdb_tiny.json").write_text(json.dumps({"arch": arch, "seed": seed, "note": "random weights, for tests"}))
    return out


def build_full_size_sd15(
    empty: bool = False, seed: int = 0, device: str | torch.device = "cpu"
) -> StableDiffusionPipeline:
    """An SD1.5-shaped pipeline (860M-parameter UNet, CLIP ViT-L text encoder, SD VAE) with random weights.

    For benchmarks and size checks: the arithmetic, and so the time and memory, equal the real model's.
    `empty=True` builds the modules on the meta device (shapes only, instant, no memory); otherwise
    they are initialised directly on `device` (seconds on a GPU instead of a minute on a CPU).
    """
    from accelerate import init_empty_weights

    tokenizer = CLIPTokenizer(str(TOKENIZER_DIR / "vocab.json"), str(TOKENIZER_DIR / "merges.txt"), model_max_length=77)
    text_config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    schedule = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
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
        tokenizer=tokenizer,
        scheduler=PNDMScheduler(skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1, **schedule),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def text_encoders(pipe: Pipeline) -> dict[str, torch.nn.Module]:
    """The pipeline's text encoders by component name (SDXL has two)."""
    names = ("text_encoder", "text_encoder_2")
    return {name: getattr(pipe, name) for name in names if getattr(pipe, name, None) is not None}


def compile_pipeline(pipe: Pipeline, mode: str) -> None:
    """Mark the base model for `torch.compile` (one of COMPILE_MODES); the compiling happens on first use.

    "full" compiles the UNet and text encoder whole, with CUDA graphs: the fastest steps, after minutes of
    compiling. "regional" compiles each of the UNet's repeated transformer blocks (diffusers'
    `compile_repeated_blocks`): one block's code serves them all, so compiling takes a fraction of the time.
    """
    check_choice("compile mode", mode, COMPILE_MODES)
    if mode == "full":
        pipe.unet.compile(mode="reduce-overhead")
        for encoder in text_encoders(pipe).values():  # they carry LiDB layers and train too
            encoder.compile(mode="reduce-overhead")
    elif mode == "regional":
        pipe.unet.compile_repeated_blocks()


def training_scheduler(pipe: DiffusionPipeline) -> DDPMScheduler:
    """The noise schedule the base model was trained with, for the diffusion loss."""
    return DDPMScheduler.from_config(pipe.scheduler.config)

"""Base models: load a pipeline of a supported family (hdb.families) or build a tiny random one.

The tiny pipelines have their real families' shapes in miniature (denoiser, VAE latent geometry, text
encoder(s)) and real tokenizers, so every code path of hdb runs offline and in seconds on a CPU. What differs
between families lives in hdb.families; this module is the façade the rest of hdb loads bases through.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import DiffusionPipeline

from hdb.config import COMPILE_MODES, DEFAULT_BASE, QUANTIZATIONS, TINY_ARCHS
from hdb.devices import resolve_device, resolve_dtype
from hdb.errors import HdbError, check_choice, from_hub_or_directory
from hdb.families import BASE_FAMILIES, SUPPORTED, family_of, family_of_pipeline_class, family_of_tiny
from hdb.families.sd import TOKENIZER_DIR, build_full_size_sd15

__all__ = ["BASE_FAMILIES", "TOKENIZER_DIR", "build_full_size_sd15"]  # re-exported: where callers found them
Pipeline = DiffusionPipeline  # what hdb means by "a pipeline": one of a supported family (`hdb.families.family_of`)


def load_pipeline(
    base: str = DEFAULT_BASE, dtype: str | torch.dtype = "auto", device: str | None = "auto", quantize: str = "none"
) -> Pipeline:
    """Load a pipeline of a supported family from a hub id or a local directory, on `device` in `dtype`.

    Weights come from safetensors files only (pickled .bin weights can run code). In half precision the
    base's fp16 variant is loaded where it has one: half the download (SD1.5: ~2 GB instead of ~4 GB).
    `quantize` (hdb.config.QUANTIZATIONS): the frozen denoiser and the text encoders LiDB leaves alone loaded in
    4 or 8 bits (bitsandbytes, which quantises on a CUDA GPU); the person's weights stay in full precision.
    """
    check_choice("quantization", quantize, QUANTIZATIONS)
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    if quantize != "none" and torch_device.type != "cuda":
        raise HdbError(f"Quantising the base ({quantize}) takes bitsandbytes on a CUDA GPU, not {torch_device}")
    local = Path(base).expanduser()
    if local.exists() and not (local / "model_index.json").is_file():
        raise HdbError(f"{base} is not a diffusers pipeline directory (it has no model_index.json)")
    if local.exists() and not any(local.rglob("*.safetensors")):
        raise HdbError(
            f"{base} holds no .safetensors weights; hdb does not load pickled .bin weights (they can run code)"
        )

    def load(path: str) -> DiffusionPipeline:
        options = {"dtype": torch_dtype, "use_safetensors": True}
        if quantize != "none":
            options["quantization_config"] = quantization_config(path, quantize, torch_dtype)
        if torch_dtype in (torch.float16, torch.bfloat16):
            try:
                return DiffusionPipeline.from_pretrained(path, variant="fp16", **options)
            except ValueError as error:  # the base has no fp16 variant: its full-precision files, cast
                if "variant" not in str(error):
                    raise
        return DiffusionPipeline.from_pretrained(path, **options)

    offline = "To try hdb offline, use a tiny random pipeline as the base model: `hdb.models.save_tiny_pipeline(DIR)`."
    pipe = from_hub_or_directory("base model", base, load, argument="base", offline=offline)
    try:
        family_of(pipe)
    except HdbError:
        raise HdbError(f"{base} is a {type(pipe).__name__}; hdb supports {SUPPORTED} pipelines") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(torch_device)


def quantization_config(base: str, quantize: str, dtype: torch.dtype) -> object:
    """diffusers' quantisation of `base` (a hub id or folder) as `quantize` says (hdb.config.QUANTIZATIONS), of its
    family's `quantised_components`."""
    from diffusers import PipelineQuantizationConfig

    family = family_of_pipeline_class(DiffusionPipeline.load_config(base)["_class_name"])
    components = list(family.quantised_components())
    if quantize == "nf4":
        backend = "bitsandbytes_4bit"
        options = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": dtype}
    else:
        backend, options = "bitsandbytes_8bit", {"load_in_8bit": True}
    return PipelineQuantizationConfig(quant_backend=backend, quant_kwargs=options, components_to_quantize=components)


def base_family(pipe: Pipeline) -> str:
    """The family of `pipe` as personal files record it (one of BASE_FAMILIES)."""
    return family_of(pipe).name


def prediction_type(pipe: Pipeline) -> str:
    """What the denoiser predicts: "epsilon" (the noise; SD1.x, SDXL, SD2 base), "v_prediction" (SD2.x-768) or
    "flow" (FLUX.1: noise - x0)."""
    return family_of(pipe).prediction_type(pipe)


def base_variant(pipe: Pipeline) -> str:
    """Which published base of its family `pipe` is ("epsilon", "v_prediction"; FLUX.1's "dev", "schnell")."""
    return family_of(pipe).variant_name(pipe)


def native_resolution(pipe: Pipeline) -> int:
    """The image size the base model was trained at (512 for SD1.5, 1024 for SDXL)."""
    return family_of(pipe).native_resolution(pipe)


# ----------------------------------------------------------------------------- tiny random pipelines


def build_tiny_pipeline(arch: str = "sd15", seed: int = 0) -> Pipeline:
    """A randomly initialised pipeline of the family whose tiny pipeline is `arch`, built offline in under a second."""
    check_choice("tiny architecture", arch, TINY_ARCHS)
    return family_of_tiny(arch).build_tiny(seed)


def save_tiny_pipeline(out_dir: str | Path, arch: str = "sd15", seed: int = 0) -> Path:
    """Write a tiny pipeline that `load_pipeline(out_dir)` loads; a marker file says it is untrained."""
    out = Path(out_dir)
    build_tiny_pipeline(arch, seed).save_pretrained(out, safe_serialization=True)
    (out / "hdb_tiny.json").write_text(json.dumps({"arch": arch, "seed": seed, "note": "random weights, for tests"}))
    return out


def text_encoders(pipe: Pipeline) -> dict[str, torch.nn.Module]:
    """The pipeline's text encoders by component name (SDXL has two)."""
    return family_of(pipe).text_encoders(pipe)


def compile_pipeline(pipe: Pipeline, mode: str) -> None:
    """Mark the base model for `torch.compile` (one of COMPILE_MODES); the compiling happens on first use.

    "full" compiles the UNet and text encoder whole, with CUDA graphs: the fastest steps, after minutes of
    compiling. "regional" compiles each of the UNet's repeated transformer blocks (diffusers'
    `compile_repeated_blocks`): one block's code serves them all, so compiling takes a fraction of the time.
    """
    check_choice("compile mode", mode, COMPILE_MODES)
    family = family_of(pipe)
    if mode == "full":
        family.denoiser(pipe).compile(mode="reduce-overhead")
        for encoder in family.text_encoders(pipe).values():  # they carry LiDB layers and train too
            encoder.compile(mode="reduce-overhead")
    elif mode == "regional":
        family.denoiser(pipe).compile_repeated_blocks()


def training_scheduler(pipe: Pipeline) -> object:
    """The noise schedule the base model was trained with, for the diffusion loss."""
    return family_of(pipe).training_scheduler(pipe)

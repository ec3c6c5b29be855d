"""The base-model families hdb personalises, one module each; everything else asks `family_of(pipe)`.

To add a family: a module with a `Family` subclass (family.py says what one is), and a line in FAMILIES.
"""

from __future__ import annotations

from collections.abc import Mapping

from diffusers import DiffusionPipeline
from torch import nn

from hdb.errors import HdbError
from hdb.families.family import Conditioning, Family, Variant
from hdb.families.flux import Flux
from hdb.families.sd import StableDiffusion, StableDiffusion2
from hdb.families.sd3 import StableDiffusion3
from hdb.families.sdxl import StableDiffusionXL

FAMILIES: dict[str, Family] = {
    family.name: family
    for family in (StableDiffusion(), StableDiffusion2(), StableDiffusionXL(), Flux(), StableDiffusion3())
}
BASE_FAMILIES = tuple(FAMILIES)  # what personal files record as their base's family
SUPPORTED = " and ".join(family.title for family in FAMILIES.values())

__all__ = ["BASE_FAMILIES", "FAMILIES", "SUPPORTED", "Conditioning", "Family", "Variant", "denoiser", "family_of"]


def family_of(pipe: DiffusionPipeline) -> Family:
    """The family of `pipe`; an HdbError naming what hdb supports for any other pipeline."""
    for family in FAMILIES.values():
        if family.matches(pipe):
            return family
    raise HdbError(f"hdb cannot personalise a {type(pipe).__name__}; it supports {SUPPORTED} pipelines")


def family_of_pipeline_class(name: str) -> Family:
    """The (first) family whose pipeline class is called `name` (a model_index.json's `_class_name`)."""
    for family in FAMILIES.values():
        if family.pipeline_class.__name__ == name:
            return family
    raise HdbError(f"hdb cannot personalise a {name}; it supports {SUPPORTED} pipelines")


def family_of_tiny(arch: str) -> Family:
    """The family whose tiny pipeline is called `arch` (one of hdb.config.TINY_ARCHS, the command line's choices)."""
    return next(family for family in FAMILIES.values() if family.tiny_arch == arch)


def recorded_variant(record: Mapping[str, str]) -> str:
    """The variant a personal file's metadata or a hypernetwork's config records (`base_variant`); for one from before
    hdb recorded it, what it predicts, which names the Stable Diffusion families' variants."""
    return record.get("base_variant") or record.get("prediction_type", "")


def variant_of(family: str, variant: str, base_model: str = "") -> Variant | None:
    """The published base a person recorded as `family`, `variant` and `base_model` was made on (`Family.variant`);
    None for no family."""
    return FAMILIES[family].variant(variant, base_model) if family else None


def family_from_layers(layer_shapes: dict[str, tuple[int, int]]) -> str:
    """The family a saved person's layers alone tell ("" when they do not: a tiny base's, say)."""
    names = [name for name, family in FAMILIES.items() if family.recognises(layer_shapes)]
    return names[0] if len(names) == 1 else ""


def family_of_layers(layer_shapes: dict[str, tuple[int, int]], recorded: str = "") -> Family:
    """The family whose LoRA files name these layers: the `recorded` one, else the one the layers tell, else the
    first whose components they are (SD1.x's and SD2.x's files are alike)."""
    name = recorded or family_from_layers(layer_shapes)
    if name:
        return FAMILIES[name]
    components = {layer.split(".", 1)[0] for layer in layer_shapes}
    for family in FAMILIES.values():
        if components <= {family.denoiser_name, *family.text_encoder_names}:
            return family
    raise HdbError(f"No family of hdb has the components {', '.join(sorted(components))}")


def denoiser(pipe: DiffusionPipeline) -> nn.Module:
    """The pipeline's denoiser (a UNet, a transformer), where its device and dtype are read."""
    return family_of(pipe).denoiser(pipe)

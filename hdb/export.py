"""Export a personal file as an ordinary LoRA: diffusers/peft keys or kohya keys (A1111, ComfyUI).

LiDB is an exact rank-r LoRA, lora_A = A_train @ A_aux and lora_B = B_aux @ B_train, computed by the
same `lora_factors` the forward pass uses, from aux bases rebuilt from the file alone (its layer
shapes and seed), so export needs no base model and cannot drift from what was trained. A person
with a plain LoRA on top (the paper's rank relaxation) exports as one LoRA of rank r + r': the two
factor pairs stacked, which computes exactly their sum.

Kohya files also say which base model they are for, as kohya's sd-scripts write it (`kohya_metadata`):
AUTOMATIC1111 lists a LoRA only beside the base family its metadata names, and other tools read the same keys.
Where a family's kohya files fuse several of hdb's layers into one module (FLUX's q, k and v), the family fuses
their LoRAs, exactly (`Family.kohya_modules`).
Every byte of an export comes from the personal file (its date too): the same person exports to the same file.
"""

from __future__ import annotations

import tempfile
from dataclasses import replace
from pathlib import Path

import torch

from hdb.config import LORA_FORMATS
from hdb.errors import HdbError, check_choice
from hdb.families import FAMILIES, Family, family_of_layers
from hdb.families.family import LayerFactors, lora_module_path
from hdb.files import shown, write_file
from hdb.lidb import aux_bases, aux_fingerprint, check_signature, lora_factors
from hdb.personal_file import PersonalWeights, safetensors_bytes

# What diffusers' `save_lora_weights` writes as a file's metadata when it saves no adapter settings
DIFFUSERS_METADATA = {"format": "pt"}
# Stability AI's ModelSpec, in the version kohya's sd-scripts write (library/sai_model_spec.py); what each base's
# entries say is its family's (`hdb.families.Variant`)
MODELSPEC_VERSION = "1.0.1"


def personal_lora_factors(weights: PersonalWeights) -> LayerFactors:
    """name -> (lora_A [R, in], lora_B [out, R]) from a personal file, checking the rebuilt aux bases.

    R is the LiDB rank, plus the plain LoRA's rank when the file has one (stacked: B1 A1 + B2 A2 = [B1 B2][A1; A2]).
    """
    config = weights.config
    bases = {
        name: aux_bases(config.seed, name, i, o, config.a, config.b) for name, (i, o) in weights.layer_shapes.items()
    }
    rebuilt = aux_fingerprint(basis for pair in bases.values() for basis in pair)
    signature = weights.signature()
    check_signature(signature, replace(signature, aux_fingerprint=rebuilt), "This personal file")
    factors = {
        name: lora_factors(weights.A[index], weights.B[index], *bases[name])
        for index, name in enumerate(weights.layer_shapes)
    }
    if weights.lora_down is None:
        return factors
    return {
        name: (torch.cat([down, plain_down]), torch.cat([up, plain_up], dim=1))
        for (name, (down, up)), plain_down, plain_up in zip(
            factors.items(), weights.lora_down, weights.lora_up, strict=True
        )
    }


def export_lora(
    weights: PersonalWeights, path: str | Path, format: str = "diffusers", dtype: torch.dtype = torch.float32
) -> Path:
    """Write the person's LoRA to `path` (a .safetensors file) in the chosen key format, whole or not at all (a
    failure to write, a full disk say, is one HdbError naming the file)."""
    check_choice("LoRA format", format, LORA_FORMATS)
    path = Path(path)
    factors = {
        name: (down.to(dtype).contiguous(), up.to(dtype).contiguous())
        for name, (down, up) in personal_lora_factors(weights).items()
    }
    family = family_of_layers(weights.layer_shapes, weights.base_family)
    if format not in family.lora_formats:
        raise HdbError(
            f"{family.title} LoRAs are exported in the {' and '.join(family.lora_formats)} format, not {format} "
            f"(hdb.families.{type(family).__module__.rsplit('.', 1)[-1]} says why)"
        )
    if format == "diffusers":
        data = _diffusers_file(factors, family)
    else:
        data = _kohya_file(factors, family, kohya_metadata(weights, title=shown(path.stem)))  # the title: text
    return write_file(path, data)


def kohya_metadata(weights: PersonalWeights, title: str) -> dict[str, str]:
    """What kohya's sd-scripts write about the base model and the trigger phrase, for `weights`' base.

    `ss_base_model_version` is kohya's model version string and `ss_v2` "True" or "False": AUTOMATIC1111
    (extensions-builtin/Lora/network.py) tells SDXL by the first starting with "sdxl_", SD2 by the second, and
    takes any other file with metadata for SD1. The `modelspec.*` keys are ModelSpec's.
    A base of unknown family (a file from before hdb recorded it, whose layers do not tell) gets neither.

    `modelspec.date` is when the person was made (ISO 8601, as sd-scripts write it, though in UTC with its offset
    where they write local time without one), not when it was exported: exports of one person are the same bytes.
    A file from before hdb recorded it gets none rather than an invented one.
    """
    metadata = {"modelspec.title": title, "modelspec.trigger_phrase": weights.instance_prompt}
    if weights.created:
        metadata["modelspec.date"] = weights.created
    if not weights.base_family:
        return metadata
    family = FAMILIES[weights.base_family]
    variant = family.variant(weights.base_variant, weights.base_model)
    architecture, resolution, implementation = variant.modelspec
    prediction_type = family.modelspec_prediction_type(weights.prediction_type)
    prediction = {} if prediction_type is None else {"modelspec.prediction_type": prediction_type}
    return {
        "ss_base_model_version": variant.kohya_version,
        "ss_v2": str(family.kohya_v2),
        "modelspec.sai_model_spec": MODELSPEC_VERSION,
        "modelspec.architecture": f"{architecture}/lora",
        "modelspec.implementation": implementation,
        "modelspec.resolution": resolution,
        **prediction,
        **metadata,
    }


def _diffusers_file(factors: LayerFactors, family: Family) -> bytes:
    """The file diffusers' `save_lora_weights` writes for these factors, as bytes (hdb writes them itself)."""
    # diffusers packs its own LoRA format; we hand it peft-style per-component state dicts.
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for name, (down, up) in factors.items():
        component, module_path = lora_module_path(name)
        layers.setdefault(component, {})[f"{module_path}.lora_A.weight"] = down
        layers[component][f"{module_path}.lora_B.weight"] = up
    arguments = {f"{component}_lora_layers": state for component, state in layers.items()}
    packed: dict[str, torch.Tensor] = {}
    with tempfile.TemporaryDirectory() as folder:  # where diffusers would write, and writes nothing
        family.pipeline_class.save_lora_weights(
            folder, weight_name="lora.safetensors", save_function=lambda state, _: packed.update(state), **arguments
        )
    return safetensors_bytes(packed, DIFFUSERS_METADATA)


def _kohya_file(factors: LayerFactors, family: Family, about: dict[str, str]) -> bytes:
    """kohya's keys: each module the family's kohya files name (`Family.kohya_modules`: one per layer, or several
    layers' LoRAs fused into one exactly), its down, its up and its alpha."""
    rank = next(iter(factors.values()))[0].shape[0]
    state: dict[str, torch.Tensor] = {}
    for key, (down, up) in family.kohya_modules(factors).items():
        state[f"{key}.lora_down.weight"] = down
        state[f"{key}.lora_up.weight"] = up
        # alpha = the module's own rank (a fused module's is the sum of its parts'): scale alpha / rank 1, as trained
        state[f"{key}.alpha"] = torch.tensor(float(down.shape[0]), dtype=down.dtype)
    network = {
        "ss_network_module": family.kohya_network_module,
        "ss_network_dim": str(rank),  # the layers' rank R, as sd-scripts' --network_dim (its fused modules' is 3R)
        "ss_network_alpha": str(rank),
    }
    return safetensors_bytes(state, {**network, **about})

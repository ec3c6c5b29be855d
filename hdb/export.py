"""Export a personal file as an ordinary LoRA: diffusers/peft keys or kohya keys (A1111, ComfyUI).

LiDB is an exact rank-r LoRA, lora_A = A_train @ A_aux and lora_B = B_aux @ B_train, computed by the
same `lora_factors` the forward pass uses, from aux bases rebuilt from the file alone (its layer
shapes and seed), so export needs no base model and cannot drift from what was trained. A person
with a plain LoRA on top (the paper's rank relaxation) exports as one LoRA of rank r + r': the two
factor pairs stacked, which computes exactly their sum.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from safetensors.torch import save_file

from hdb.config import LORA_FORMATS
from hdb.errors import check_choice
from hdb.lidb import aux_bases, aux_fingerprint, check_signature, lora_factors
from hdb.personal_file import PersonalWeights

KOHYA_PREFIXES = {"unet": "lora_unet", "text_encoder": "lora_te", "text_encoder_2": "lora_te2"}


def personal_lora_factors(weights: PersonalWeights) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
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


def _split_component(name: str) -> tuple[str, str]:
    """ "text_encoder.encoder.layers.0..." -> ("text_encoder", "text_model.encoder.layers.0...").

    transformers 5 dropped the `text_model` level from CLIPTextModel; LoRA files everywhere (A1111,
    ComfyUI, older diffusers) name it, and diffusers accepts either, so files use the classic path.
    """
    component, path = name.split(".", 1)
    if component.startswith("text_encoder") and not path.startswith("text_model."):
        path = f"text_model.{path}"
    return component, path


def export_lora(
    weights: PersonalWeights, path: str | Path, format: str = "diffusers", dtype: torch.dtype = torch.float32
) -> Path:
    """Write the person's LoRA to `path` (a .safetensors file) in the chosen key format."""
    check_choice("LoRA format", format, LORA_FORMATS)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    factors = {
        name: (down.to(dtype).contiguous(), up.to(dtype).contiguous())
        for name, (down, up) in personal_lora_factors(weights).items()
    }
    if format == "diffusers":
        _save_diffusers(factors, path)
    else:
        _save_kohya(factors, path)
    return path


def _save_diffusers(factors: dict[str, tuple[torch.Tensor, torch.Tensor]], path: Path) -> None:
    # diffusers writes its own LoRA format; we hand it peft-style per-component state dicts.
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for name, (down, up) in factors.items():
        component, module_path = _split_component(name)
        layers.setdefault(component, {})[f"{module_path}.lora_A.weight"] = down
        layers[component][f"{module_path}.lora_B.weight"] = up
    pipeline_class = StableDiffusionXLPipeline if "text_encoder_2" in layers else StableDiffusionPipeline
    arguments = {f"{component}_lora_layers": state for component, state in layers.items()}
    pipeline_class.save_lora_weights(str(path.parent), weight_name=path.name, **arguments)


def _save_kohya(factors: dict[str, tuple[torch.Tensor, torch.Tensor]], path: Path) -> None:
    # kohya names: lora_unet_<module path with _>, lora_te_ (SD1/2) or lora_te1_/lora_te2_ (SDXL).
    sdxl = any(name.startswith("text_encoder_2.") for name in factors)
    rank = next(iter(factors.values()))[0].shape[0]
    prefixes = dict(KOHYA_PREFIXES, text_encoder="lora_te1" if sdxl else "lora_te")
    state: dict[str, torch.Tensor] = {}
    for name, (down, up) in factors.items():
        component, module_path = _split_component(name)
        key = f"{prefixes[component]}_{module_path.replace('.', '_')}"
        state[f"{key}.lora_down.weight"] = down
        state[f"{key}.lora_up.weight"] = up
        state[f"{key}.alpha"] = torch.tensor(float(rank), dtype=down.dtype)  # alpha = rank: scale 1, as trained
    metadata = {"ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_network_alpha": str(rank)}
    save_file(state, str(path), metadata=metadata)

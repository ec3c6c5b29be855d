"""The personal weight file: one person's LiDB weights in ~100 KB of safetensors.

Two packed tensors, `A_train: [L, r, a]` and `B_train: [L, b, r]` (a tensor per layer would not fit:
the safetensors header alone would outweigh the numbers), and string metadata that says what the
weights belong to: format version, base architecture fingerprint, aux seed and fingerprint, r, a, b,
the layer names (zlib-compressed), and the instance prompt that names the person.

A person finetuned with the paper's rank relaxation also holds a plain LoRA beside the LiDB: every
layer's down [r', in] and up [out, r'] factors, flattened and concatenated into the two tensors
`lora_down` and `lora_up` (their shapes follow from the layer shapes and `lora_rank`).
"""

from __future__ import annotations

import base64
import json
import zlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from hdb.config import DEFAULT_INSTANCE_PROMPT, DEFAULT_INSTANCE_TOKEN
from hdb.errors import HdbError
from hdb.lidb import LiDB, LiDBConfig

if TYPE_CHECKING:
    from hdb.models import Pipeline

FORMAT = "hdb-lidb"
FORMAT_VERSION = "2"  # 2 added the optional plain LoRA
READABLE_VERSIONS = ("1", "2")


@dataclass
class PersonalWeights:
    A: torch.Tensor  # [L, r, a]
    B: torch.Tensor  # [L, b, r]
    config: LiDBConfig
    layer_shapes: dict[str, tuple[int, int]]  # name -> (in_features, out_features), enough to rebuild the aux bases
    arch_fingerprint: str
    aux_fingerprint: str
    instance_prompt: str
    base_model: str
    instance_token: str = DEFAULT_INSTANCE_TOKEN
    lora_down: list[torch.Tensor] | None = None  # the plain LoRA on top, per layer: [r', in] ...
    lora_up: list[torch.Tensor] | None = None  # ... and [out, r']; None for a LiDB-only person

    @classmethod
    def from_lidb(
        cls, lidb: LiDB, instance_prompt: str = DEFAULT_INSTANCE_PROMPT, instance_token: str = DEFAULT_INSTANCE_TOKEN
    ) -> PersonalWeights:
        return cls(
            A=lidb.A_train.detach().float().cpu().clone(),
            B=lidb.B_train.detach().float().cpu().clone(),
            config=replace(lidb.config, rank=lidb.rank),
            layer_shapes=dict(lidb.layer_shapes),
            arch_fingerprint=lidb.arch_fingerprint(),
            aux_fingerprint=lidb.aux_fingerprint(),
            instance_prompt=instance_prompt,
            base_model=str(getattr(lidb.pipe, "name_or_path", "") or ""),
            instance_token=instance_token,
            lora_down=_copies(lidb.source.lora_down),
            lora_up=_copies(lidb.source.lora_up),
        )

    @property
    def lora_rank(self) -> int:
        return 0 if self.lora_down is None else self.lora_down[0].shape[0]

    @property
    def layer_names(self) -> list[str]:
        return list(self.layer_shapes)

    @property
    def num_numbers(self) -> int:
        plain = sum(t.numel() for t in (self.lora_down or []) + (self.lora_up or []))
        return self.A.numel() + self.B.numel() + plain


def _copies(tensors: list[torch.Tensor] | None) -> list[torch.Tensor] | None:
    return None if tensors is None else [t.detach().float().cpu().clone() for t in tensors]


def _pack_layers(layer_shapes: dict[str, tuple[int, int]]) -> str:
    # ~12 KB of names compress to ~2 KB: the header must stay small beside 105 KB of numbers.
    return base64.b64encode(zlib.compress(json.dumps(list(layer_shapes.items())).encode(), 9)).decode()


def _unpack_layers(packed: str) -> dict[str, tuple[int, int]]:
    return {name: tuple(shape) for name, shape in json.loads(zlib.decompress(base64.b64decode(packed)))}


def save_personal(weights: PersonalWeights, path: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """Write `weights` to `path` (fp32 by default; fp16 halves the size)."""
    config = weights.config
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "arch_fingerprint": weights.arch_fingerprint,
        "aux_fingerprint": weights.aux_fingerprint,
        "seed": str(config.seed),
        "r": str(config.rank),
        "a": str(config.a),
        "b": str(config.b),
        "num_layers": str(len(weights.layer_names)),
        "layers": _pack_layers(weights.layer_shapes),
        "instance_prompt": weights.instance_prompt,
        "instance_token": weights.instance_token,
        "base_model": weights.base_model,
        "lora_rank": str(weights.lora_rank),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {"A_train": weights.A.to(dtype).contiguous(), "B_train": weights.B.to(dtype).contiguous()}
    if weights.lora_down is not None:
        tensors["lora_down"] = torch.cat([t.flatten() for t in weights.lora_down]).to(dtype)
        tensors["lora_up"] = torch.cat([t.flatten() for t in weights.lora_up]).to(dtype)
    save_file(tensors, str(path), metadata=metadata)
    return path


def load_personal(path: str | Path) -> PersonalWeights:
    """Read and validate a personal file; any problem is an HdbError that names it."""
    path = Path(path)
    if not path.is_file():
        raise HdbError(f"Personal weights file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as file:
            metadata = file.metadata() or {}
            tensors = {key: file.get_tensor(key) for key in file.keys()}
    except Exception as error:  # safetensors raises its own error types for truncated/corrupt files
        raise HdbError(f"{path} is not a readable safetensors file (truncated or corrupt?): {error}") from None
    if metadata.get("format") != FORMAT:
        raise HdbError(
            f"{path} is a safetensors file but not an hdb personal file (no '{FORMAT}' format tag); "
            "LoRA files from other tools cannot be loaded as personal weights"
        )
    if metadata.get("format_version") not in READABLE_VERSIONS:
        raise HdbError(
            f"{path} has personal-file format version {metadata.get('format_version')}; "
            f"this hdb reads versions {', '.join(READABLE_VERSIONS)}"
        )
    try:
        config = LiDBConfig(
            rank=int(metadata["r"]), a=int(metadata["a"]), b=int(metadata["b"]), seed=int(metadata["seed"])
        )
        layer_shapes = _unpack_layers(metadata["layers"])
        names = list(layer_shapes)
        weights = PersonalWeights(
            A=tensors["A_train"].float(),
            B=tensors["B_train"].float(),
            config=config,
            layer_shapes=layer_shapes,
            arch_fingerprint=metadata["arch_fingerprint"],
            aux_fingerprint=metadata["aux_fingerprint"],
            instance_prompt=metadata.get("instance_prompt", DEFAULT_INSTANCE_PROMPT),
            base_model=metadata.get("base_model", ""),
            instance_token=metadata.get("instance_token", DEFAULT_INSTANCE_TOKEN),
        )
        lora_rank = int(metadata.get("lora_rank", "0"))
        if lora_rank:
            weights.lora_down, weights.lora_up = _unpack_lora(tensors, layer_shapes, lora_rank, path)
    except (KeyError, ValueError, zlib.error) as error:
        raise HdbError(f"{path} has damaged metadata ({type(error).__name__}: {error})") from None
    expected_A = (len(names), config.rank, config.a)
    expected_B = (len(names), config.b, config.rank)
    if tuple(weights.A.shape) != expected_A or tuple(weights.B.shape) != expected_B:
        raise HdbError(
            f"{path}: tensor shapes {tuple(weights.A.shape)}/{tuple(weights.B.shape)} "
            f"do not match its metadata {expected_A}/{expected_B}"
        )
    everything = [weights.A, weights.B, *(weights.lora_down or []), *(weights.lora_up or [])]
    if not all(torch.isfinite(t).all() for t in everything):
        raise HdbError(f"{path} contains NaN or infinite weights")
    return weights


def _unpack_lora(
    tensors: dict[str, torch.Tensor], layer_shapes: dict[str, tuple[int, int]], rank: int, path: Path
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Split the flat `lora_down`/`lora_up` tensors back into each layer's [r, in] and [out, r] factors."""
    down, up = tensors["lora_down"].float(), tensors["lora_up"].float()
    ins, outs = [i for i, _ in layer_shapes.values()], [o for _, o in layer_shapes.values()]
    if down.numel() != rank * sum(ins) or up.numel() != rank * sum(outs):
        raise HdbError(f"{path}: the plain LoRA's sizes do not match its metadata (rank {rank})")
    downs = [t.reshape(rank, i) for t, i in zip(down.split([rank * i for i in ins]), ins, strict=True)]
    ups = [t.reshape(o, rank) for t, o in zip(up.split([rank * o for o in outs]), outs, strict=True)]
    return downs, ups


def check_compatible(weights: PersonalWeights, lidb: LiDB, source: str = "personal file") -> None:
    """Refuse weights made for another base architecture or other aux bases, naming which."""
    if weights.arch_fingerprint != lidb.arch_fingerprint():
        raise HdbError(
            f"This {source} was made for a different base model architecture ({len(weights.layer_names)} LiDB layers, "
            f"fingerprint {weights.arch_fingerprint}, base '{weights.base_model}'); the loaded base has "
            f"{len(lidb.layers)} layers, fingerprint {lidb.arch_fingerprint()}"
        )
    if (weights.config.seed, weights.config.a, weights.config.b) != (lidb.config.seed, lidb.config.a, lidb.config.b):
        raise HdbError(
            f"This {source} uses aux seed {weights.config.seed} (a={weights.config.a}, b={weights.config.b}); "
            f"the model's LiDB uses seed {lidb.config.seed} (a={lidb.config.a}, b={lidb.config.b}): "
            "weights only work with their own aux bases"
        )
    if weights.aux_fingerprint != lidb.aux_fingerprint():
        raise HdbError(
            f"The aux bases regenerated here (fingerprint {lidb.aux_fingerprint()}) differ from the ones this "
            f"{source} was trained with ({weights.aux_fingerprint})"
        )


def apply_personal(pipe: Pipeline, weights: PersonalWeights | str | Path, lidb: LiDB | None = None) -> LiDB:
    """Load a person's weights into `lidb` (the pipeline's LiDB), or into a LiDB attached here when None."""
    if not isinstance(weights, PersonalWeights):
        weights = load_personal(weights)
    attached_here = lidb is None
    lidb = LiDB(pipe, weights.config) if attached_here else lidb
    try:
        check_compatible(weights, lidb)
    except HdbError:
        if attached_here:  # leave the pipeline as it was found
            lidb.detach()
        raise
    device = lidb.A_train.device
    lidb.start_from(weights.A.to(device), weights.B.to(device), weights.config.rank)  # any rank; no plain LoRA
    if weights.lora_down is not None:
        lidb.load_lora([t.to(device) for t in weights.lora_down], [t.to(device) for t in weights.lora_up])
    return lidb


def describe(path: str | Path) -> str:
    """Human-readable summary of a personal file, for `python -m hdb info`."""
    weights = load_personal(path)
    size = Path(path).stat().st_size
    components: dict[str, int] = {}
    for name in weights.layer_names:
        components[name.split(".")[0]] = components.get(name.split(".")[0], 0) + 1
    config = weights.config
    lines = [
        f"file:             {path} ({size:,} bytes, {_stored_dtype(path)})",
        f"format:           {FORMAT} v{FORMAT_VERSION}",
        f"base model:       {weights.base_model or '(unknown)'}  architecture fingerprint {weights.arch_fingerprint}",
        f"LiDB:             r={config.rank} a={config.a} b={config.b} aux seed {config.seed} "
        f"(fingerprint {weights.aux_fingerprint})",
        f"layers:           {len(weights.layer_names)} ({', '.join(f'{k}: {v}' for k, v in components.items())})",
        f"plain LoRA:       {f'rank {weights.lora_rank}, on top of the LiDB' if weights.lora_rank else 'none'}",
        f"numbers:          {weights.num_numbers:,}",
        f"instance prompt:  {weights.instance_prompt}   "
        f"(prompts name the person with [V] = '{weights.instance_token}')",
        f"weight norms:     |A| {weights.A.norm():.4f}  |B| {weights.B.norm():.4f}",
    ]
    return "\n".join(lines)


def _stored_dtype(path: str | Path) -> str:
    with safe_open(str(path), framework="pt") as file:
        return str(file.get_slice("A_train").get_dtype())

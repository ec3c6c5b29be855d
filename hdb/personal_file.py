"""The personal weight file: one person's LiDB weights in ~100 KB of safetensors.

Two packed tensors, `A_train: [L, r, a]` and `B_train: [L, b, r]` (a tensor per layer would not fit:
the safetensors header alone would outweigh the numbers), and string metadata that says what the
weights belong to: format version, base architecture fingerprint, aux seed and fingerprint, r, a, b,
the layer names (zlib-compressed), the instance prompt that names the person, the base's family
(SD1.x, SD2.x, SDXL) and prediction type, which LoRA exports tell other tools, and when the person was made.

A file holds only what may be public: it travels (uploads, downloads, the Hub). The base model is named by its
hub id, or, when it was a local folder, by the folder's own name (`public_name`): never by its path.

A person finetuned with the paper's rank relaxation also holds a plain LoRA beside the LiDB: every
layer's down [r', in] and up [out, r'] factors, flattened and concatenated into the two tensors
`lora_down` and `lora_up` (their shapes follow from the layer shapes and `lora_rank`).
"""

from __future__ import annotations

import base64
import binascii
import json
import zlib
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path, PureWindowsPath

import safetensors.torch
import torch

from hdb.config import (
    DEFAULT_INSTANCE_PROMPT,
    DEFAULT_INSTANCE_TOKEN,
    LIDB_LAYERS,
    MAX_RANK,
    MAX_TOKEN_CHARS,
    token_problem,
)
from hdb.errors import HdbError
from hdb.families import FAMILIES, family_from_layers, recorded_variant
from hdb.files import read_regular_file, shown, write_file
from hdb.lidb import LiDB, LiDBConfig, Signature, arch_fingerprint
from hdb.models import BASE_FAMILIES, base_family, base_variant, prediction_type
from hdb.styles import MAX_PROMPT_CHARS

# Bounds on what a file may claim, far above any real base (SDXL: 736 layers at most 2,048 wide, ~60 KB of
# layer table) and below what would cost a server real memory to build aux bases or unpack metadata for.
MAX_FILE_BYTES = 64 * 2**20
MAX_LAYERS, MAX_LAYER_WIDTH, MAX_LAYERS_JSON = 1024, 8192, 2**20
MAX_AUX_NUMBERS = 2**28  # what rebuilding its aux bases may cost (SDXL at a=100, b=50: ~1.5e8 numbers)
MAX_WEIGHT = 1e4  # |weight|: trained LiDB and LoRA factors stay within a few units
# The header (the tensor table and the metadata) as a whole, checked before any of it is parsed: SDXL's, the
# largest real one, is ~4 KB (its 736-layer table, 59 KB of JSON, packs to 3 KB).
MAX_HEADER_BYTES = 256 * 2**10
MAX_BASE_MODEL_CHARS = 1024  # a hub id, or the name of the folder a local base was loaded from
# The longest text each metadata field may hold ("format" is FORMAT or refused; "layers", the packed table, is
# bounded by MAX_HEADER_BYTES)
MAX_METADATA_CHARS = {
    "format_version": 8,
    "arch_fingerprint": 64,  # hex digests (hdb writes 16 digits)
    "aux_fingerprint": 64,
    "seed": 20,  # whole numbers: a seed has at most 19 digits
    "r": 8,
    "a": 8,
    "b": 8,
    "num_layers": 8,
    "lora_rank": 8,
    "instance_prompt": MAX_PROMPT_CHARS,
    "instance_token": MAX_TOKEN_CHARS,
    "base_model": MAX_BASE_MODEL_CHARS,
    "base_family": 16,
    "prediction_type": 16,
    "base_variant": 16,
    "lidb_layers": 16,
    "created": 32,  # ISO 8601 to the second: "2026-05-09T07:35:25+00:00"
}

FORMAT = "hdb-lidb"
FORMAT_VERSION = "2"  # 2 added the optional plain LoRA
READABLE_VERSIONS = ("1", "2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow")  # diffusers' scheduler settings; flow matching


@dataclass
class PersonalWeights:
    A: torch.Tensor  # [L, r, a]
    B: torch.Tensor  # [L, b, r]
    config: LiDBConfig
    layer_shapes: dict[str, tuple[int, int]]  # name -> (in_features, out_features), enough to rebuild the aux bases
    arch_fingerprint: str
    aux_fingerprint: str
    instance_prompt: str
    base_model: str  # a hub id, or a local folder (its path in memory; only its name is saved: `public_name`)
    instance_token: str = DEFAULT_INSTANCE_TOKEN
    base_family: str = ""  # one of hdb.models.BASE_FAMILIES; "" when unknown
    prediction_type: str = ""  # one of PREDICTION_TYPES; "" when unknown
    # which of its family's published bases (`Family.variants`); files from before hdb recorded it give their
    # prediction type, which tells the Stable Diffusion ones apart
    base_variant: str = ""
    lora_down: list[torch.Tensor] | None = None  # the plain LoRA on top, per layer: [r', in] ...
    lora_up: list[torch.Tensor] | None = None  # ... and [out, r']; None for a LiDB-only person
    # When the person was made (`created_now`), kept through every save and load: exports date themselves by it, so
    # exporting the same person twice gives the same bytes. "" for files from before hdb recorded it.
    created: str = ""

    @classmethod
    def from_lidb(
        cls,
        lidb: LiDB,
        instance_prompt: str = DEFAULT_INSTANCE_PROMPT,
        instance_token: str = DEFAULT_INSTANCE_TOKEN,
        weights: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> PersonalWeights:
        """A copy of the person `lidb` holds (with its plain LoRA, if any); or of `weights` = (A, B), one
        person's LiDB weights made for `lidb` (e.g. one identity of a per-sample batch)."""
        A, B = weights if weights is not None else (lidb.A_train, lidb.B_train)
        lora = lidb.plain_lora() if weights is None else None
        return cls(
            A=A.detach().float().cpu().clone(),
            B=B.detach().float().cpu().clone(),
            config=replace(lidb.config, rank=A.shape[-2]),
            layer_shapes=dict(lidb.layer_shapes),
            arch_fingerprint=arch_fingerprint(lidb.layer_shapes),
            aux_fingerprint=lidb.aux_fingerprint(),
            instance_prompt=instance_prompt,
            base_model=shown(lidb.base_model),  # informational; a folder's name need not be UTF-8 text
            instance_token=instance_token,
            base_family=base_family(lidb.pipe),
            prediction_type=prediction_type(lidb.pipe),
            base_variant=base_variant(lidb.pipe),
            lora_down=None if lora is None else _copies(lora.downs),
            lora_up=None if lora is None else _copies(lora.ups),
            created=created_now(),
        )

    def signature(self) -> Signature:
        """What the weights were made for (the architecture fingerprint recomputed from the layer shapes)."""
        return Signature.of(self.layer_shapes, self.config, self.aux_fingerprint)

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


def created_now() -> str:
    """This moment as a personal file records when a person was made: ISO 8601 in UTC, to the second (a timezone
    of its own would make the same person's exports differ by where they were made)."""
    return datetime.now(UTC).replace(microsecond=0).isoformat()


def hub_id(name: str) -> str | None:
    """`name` when it names a model on the Hub ("owner/name"), None for a local folder or nothing.

    What diffusers records as a base model is where it was loaded from: a hub id, or a local folder's path (which
    the Hub rejects as `base_model`, and which says where the user keeps their files). A name that exists here
    as a path, or starts like one, is a folder.
    """
    if name.startswith((".", "/", "~")) or not is_repo_id(name) or Path(name).expanduser().exists():
        return None
    return name


def public_name(name: str) -> str:
    """How a model may be named in public: a hub id as it is, a local folder by its own name, without the path
    (POSIX or Windows: a file may come from anywhere); "" for "".

    Idempotent (a folder's name has no "/", so it never reads as a hub id): saving a loaded file changes nothing.
    """
    return hub_id(name) or PureWindowsPath(name).name  # Windows paths split at "\\" and "/" alike


def is_repo_id(name: str) -> bool:
    """Whether `name` is "owner/name" in the characters and shape the Hub allows."""
    from huggingface_hub.utils import validate_repo_id

    if name.count("/") != 1:
        return False
    try:
        validate_repo_id(name)
    except ValueError:  # HFValidationError
        return False
    return True


def _variants(family: str) -> tuple[str, ...]:
    """The variant names a file of `family` may record (an unknown family's, any its family may have)."""
    families = [FAMILIES[family]] if family in FAMILIES else FAMILIES.values()
    return tuple(name for known in families for name in known.variants)


def _base_title(weights: PersonalWeights) -> str:
    """The published base the file names ("FLUX.1 [schnell]"), or the family's reference when it does not say."""
    if not weights.base_family:
        return "(unknown)"
    return FAMILIES[weights.base_family].variant(weights.base_variant, weights.base_model).title


def _is_iso_date(text: str) -> bool:
    try:
        datetime.fromisoformat(text)
    except ValueError:
        return False
    return True


def _copies(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return [t.detach().float().cpu().clone() for t in tensors]


def _pack_layers(layer_shapes: dict[str, tuple[int, int]]) -> str:
    # ~12 KB of names compress to ~2 KB: the header must stay small beside 105 KB of numbers.
    return base64.b64encode(zlib.compress(json.dumps(list(layer_shapes.items())).encode(), 9)).decode()


def _unpack_layers(packed: str) -> dict[str, tuple[int, int]]:
    """The layer table, refusing anything but a bounded list of [name, [in, out]] pairs (a file may be forged)."""
    unpacker = zlib.decompressobj()
    text = unpacker.decompress(base64.b64decode(packed), MAX_LAYERS_JSON)
    if unpacker.unconsumed_tail:
        raise ValueError(f"the layer table unpacks to more than {MAX_LAYERS_JSON:,} bytes")
    table = json.loads(text)
    if not isinstance(table, list) or not 1 <= len(table) <= MAX_LAYERS:
        raise ValueError(f"the layer table must list 1 to {MAX_LAYERS} layers")
    shapes = {}
    for entry in table:
        name, shape = entry if isinstance(entry, list) and len(entry) == 2 else (None, None)
        if not isinstance(name, str) or not isinstance(shape, list) or len(shape) != 2:
            raise ValueError("a layer entry is not [name, [in, out]]")
        if not all(type(size) is int and 1 <= size <= MAX_LAYER_WIDTH for size in shape):
            raise ValueError(f"layer {name[:80]!r} has a shape outside 1..{MAX_LAYER_WIDTH}: {str(shape)[:80]}")
        shapes[name] = (shape[0], shape[1])
    return shapes


def save_personal(weights: PersonalWeights, path: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """Write `weights` to `path` (fp32 by default; fp16 halves the size), whole or not at all.

    The base model is written by its public name: a local folder's path says where the user keeps their files,
    and a file is made to be shared (a file loaded with such a path, an older one say, loses it here too).
    What `load_personal` would refuse (a token of a thousand characters, say) is refused here instead, as is any
    failure to write (a full disk): one HdbError that names the file.
    """
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
        "lidb_layers": config.layers,
        "num_layers": str(len(weights.layer_names)),
        "layers": _pack_layers(weights.layer_shapes),
        "instance_prompt": weights.instance_prompt,
        "instance_token": weights.instance_token,
        "base_model": public_name(weights.base_model),
        "base_family": weights.base_family,
        "prediction_type": weights.prediction_type,
        "base_variant": weights.base_variant,
        "lora_rank": str(weights.lora_rank),
        **({"created": weights.created} if weights.created else {}),  # no date is invented for an older file
    }
    path = Path(path)
    problem = metadata_problem(metadata)
    if problem:
        raise HdbError(f"Refusing to write {shown(path.name)}, which could not be loaded again: {problem}")
    tensors = {"A_train": weights.A.to(dtype).contiguous(), "B_train": weights.B.to(dtype).contiguous()}
    if weights.lora_down is not None:
        tensors["lora_down"] = torch.cat([t.flatten() for t in weights.lora_down]).to(dtype)
        tensors["lora_up"] = torch.cat([t.flatten() for t in weights.lora_up]).to(dtype)
    return write_file(path, safetensors_bytes(tensors, metadata))


def safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """A safetensors file of `tensors` and `metadata`, as bytes that are the same for the same input: safetensors
    itself writes the metadata in a random order (a Rust HashMap), which would make every save of one person, and
    every export of it, a different file. The header is written again with the metadata in the order given."""
    data = safetensors.torch.save(tensors, metadata=metadata)
    length = int.from_bytes(data[:8], "little")
    table = {key: entry for key, entry in json.loads(data[8 : 8 + length]).items() if key != "__metadata__"}
    header = json.dumps({"__metadata__": metadata, **table}, separators=(",", ":"), ensure_ascii=False).encode()
    header += b" " * (-len(header) % 8)  # the tensors start 8-byte aligned, as safetensors places them
    return len(header).to_bytes(8, "little") + header + data[8 + length :]


def metadata_problem(metadata: dict[str, str]) -> str:
    """What makes a personal file's `metadata` unfit to load, or '': a field longer than MAX_METADATA_CHARS allows,
    text that is not Unicode, an instance token that is not a few words on one line. Values are not echoed."""
    for key, value in metadata.items():
        cap = MAX_METADATA_CHARS.get(key)
        if cap is not None and len(value) > cap:
            return f"{key} is {len(value):,} characters; at most {cap:,}"
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return f"{key} holds characters that are not valid Unicode text"
    if "instance_token" in metadata:
        problem = token_problem(metadata["instance_token"])
        if problem:
            return f"instance_token {problem}"
    return ""


def load_personal(path: str | Path) -> PersonalWeights:
    """Read and validate a personal file; any problem is an HdbError that names it.

    Files come from anyone (a public demo takes uploads), so everything is bounded before it is used: the
    file's size, the layer table, ranks and widths, the tensors' dtypes and values. Whether the weights fit a
    base model is then a comparison of signatures, the architecture fingerprint recomputed from the shapes.
    """
    path = Path(path)
    name = shown(path.name)
    data = read_regular_file(path, MAX_FILE_BYTES, "Personal weights file")
    metadata = _header(data, name).get("__metadata__") or {}
    if metadata.get("format") != FORMAT:
        raise HdbError(
            f"{name} is a safetensors file but not an hdb personal file (no '{FORMAT}' format tag); "
            "LoRA files from other tools cannot be loaded as personal weights"
        )
    problem = metadata_problem(metadata)  # every text bounded before any is used
    if problem:
        raise HdbError(f"{name} has damaged metadata ({problem})")
    try:
        tensors = safetensors.torch.load(data)
    except Exception as error:  # safetensors raises its own error types for truncated/corrupt files
        raise HdbError(f"{name} is not a readable safetensors file (truncated or corrupt?): {error}") from None
    if not all(tensor.is_floating_point() for tensor in tensors.values()):
        raise HdbError(f"{name} holds non-floating-point tensors; personal weights are floating-point numbers")
    if metadata.get("format_version") not in READABLE_VERSIONS:
        raise HdbError(
            f"{name} has personal-file format version {metadata.get('format_version')}; "
            f"this hdb reads versions {', '.join(READABLE_VERSIONS)}"
        )
    try:
        weights = _weights_from(metadata, tensors, name)
    except (KeyError, ValueError, TypeError, RecursionError, zlib.error, binascii.Error, HdbError) as error:
        raise HdbError(f"{name} has damaged metadata ({type(error).__name__}: {str(error)[:200]})") from None
    config, names = weights.config, weights.layer_names
    expected_A = (len(names), config.rank, config.a)
    expected_B = (len(names), config.b, config.rank)
    if tuple(weights.A.shape) != expected_A or tuple(weights.B.shape) != expected_B:
        raise HdbError(
            f"{name}: tensor shapes {tuple(weights.A.shape)}/{tuple(weights.B.shape)} "
            f"do not match its metadata {expected_A}/{expected_B}"
        )
    everything = [weights.A, weights.B, *(weights.lora_down or []), *(weights.lora_up or [])]
    if not all(torch.isfinite(t).all() for t in everything):
        raise HdbError(f"{name} contains NaN or infinite weights")
    largest = max(float(t.abs().max()) for t in everything)
    if largest > MAX_WEIGHT:
        raise HdbError(f"{name} holds a weight of {largest:.3g}; trained weights stay far below {MAX_WEIGHT:g}")
    return weights


def _weights_from(metadata: dict[str, str], tensors: dict[str, torch.Tensor], name: str) -> PersonalWeights:
    """The person a file's metadata and tensors describe, each recorded value checked (a ValueError, KeyError, ...
    for a value out of bounds or missing: `load_personal` calls any of them damaged metadata)."""
    config = LiDBConfig(
        rank=int(metadata["r"]), a=int(metadata["a"]), b=int(metadata["b"]), seed=int(metadata["seed"]),
        layers=metadata.get("lidb_layers", LIDB_LAYERS[0]),  # files from before the choice: every layer
    )  # fmt: skip
    lora_rank = int(metadata.get("lora_rank", "0"))
    if not 0 <= lora_rank <= MAX_RANK:
        raise ValueError(f"the plain LoRA's rank must be 0 to {MAX_RANK}, not {lora_rank}")
    layer_shapes = _unpack_layers(metadata["layers"])
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
        # a file from before hdb recorded it: its layers may tell (hdb.families.family_from_layers)
        base_family=metadata.get("base_family") or family_from_layers(layer_shapes),
        prediction_type=metadata.get("prediction_type", ""),
        base_variant=recorded_variant(metadata),
        created=metadata.get("created", ""),
    )
    if weights.created and not _is_iso_date(weights.created):
        raise ValueError("its creation time is not an ISO 8601 date")
    if weights.base_family not in ("", *BASE_FAMILIES):
        raise ValueError(f"unknown base family {weights.base_family[:40]!r}")
    if weights.prediction_type not in ("", *PREDICTION_TYPES):
        raise ValueError(f"unknown prediction type {weights.prediction_type[:40]!r}")
    if metadata.get("base_variant") and metadata["base_variant"] not in _variants(weights.base_family):
        raise ValueError(f"unknown base variant {metadata['base_variant'][:40]!r}")
    aux_numbers = sum(config.a * i + o * config.b for i, o in layer_shapes.values())
    if aux_numbers > MAX_AUX_NUMBERS:
        raise ValueError(f"its aux bases would hold {aux_numbers:,} numbers (at most {MAX_AUX_NUMBERS:,})")
    if lora_rank:
        weights.lora_down, weights.lora_up = _unpack_lora(tensors, layer_shapes, lora_rank, name)
    return weights


def _header(data: bytes, name: str) -> dict:
    """The header of the safetensors file `data` (named `name` in messages): its size bounded before it is parsed.

    The format: 8 bytes, the header's length N (little-endian), then N bytes of JSON: each tensor's dtype, shape
    and offsets, and "__metadata__", text keys to text values.
    """
    length = int.from_bytes(data[:8], "little")
    if len(data) < 8 or 8 + length > len(data):
        raise HdbError(f"{name} is not a readable safetensors file (truncated or corrupt?)")
    if length > MAX_HEADER_BYTES:
        raise HdbError(f"{name} has damaged metadata (its header is {length:,} bytes; at most {MAX_HEADER_BYTES:,})")
    try:
        header = json.loads(data[8 : 8 + length].decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise HdbError(f"{name} is not a readable safetensors file (truncated or corrupt?)") from None
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    texts = isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())
    if not isinstance(header, dict) or (metadata is not None and not texts):
        raise HdbError(f"{name} is not a readable safetensors file (its header is not a safetensors header)")
    return header


def _unpack_lora(
    tensors: dict[str, torch.Tensor], layer_shapes: dict[str, tuple[int, int]], rank: int, name: str
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Split the flat `lora_down`/`lora_up` tensors back into each layer's [r, in] and [out, r] factors."""
    down, up = tensors["lora_down"].float(), tensors["lora_up"].float()
    ins, outs = [i for i, _ in layer_shapes.values()], [o for _, o in layer_shapes.values()]
    if down.numel() != rank * sum(ins) or up.numel() != rank * sum(outs):
        raise HdbError(f"{name}: the plain LoRA's sizes do not match its metadata (rank {rank})")
    downs = [t.reshape(rank, i) for t, i in zip(down.split([rank * i for i in ins]), ins, strict=True)]
    ups = [t.reshape(o, rank) for t, o in zip(up.split([rank * o for o in outs]), outs, strict=True)]
    return downs, ups


def describe(path: str | Path) -> str:
    """Human-readable summary of a personal file, for `python -m hdb info`."""
    weights = load_personal(path)
    data = read_regular_file(path, MAX_FILE_BYTES, "Personal weights file")
    stored_dtype = _header(data, shown(Path(path).name))["A_train"]["dtype"]  # "F32" or "F16"
    components: dict[str, int] = {}
    for name in weights.layer_names:
        components[name.split(".")[0]] = components.get(name.split(".")[0], 0) + 1
    config = weights.config
    lines = [
        f"file:             {shown(path)} ({len(data):,} bytes, {stored_dtype})",
        f"format:           {FORMAT} v{FORMAT_VERSION}",
        f"base model:       {weights.base_model or '(unknown)'}  architecture fingerprint {weights.arch_fingerprint}",
        f"base family:      {weights.base_family or '(unknown)'}, predicting {weights.prediction_type or '(unknown)'}",
        f"made on:          {_base_title(weights)}",
        f"LiDB:             r={config.rank} a={config.a} b={config.b} aux seed {config.seed} layers {config.layers} "
        f"(fingerprint {weights.aux_fingerprint})",
        f"layers:           {len(weights.layer_names)} ({', '.join(f'{k}: {v}' for k, v in components.items())})",
        f"plain LoRA:       {f'rank {weights.lora_rank}, on top of the LiDB' if weights.lora_rank else 'none'}",
        f"numbers:          {weights.num_numbers:,}",
        f"created:          {weights.created or '(not recorded)'}",
        f"instance prompt:  {weights.instance_prompt}   "
        f"(prompts name the person with [V] = '{weights.instance_token}')",
        f"weight norms:     |A| {weights.A.norm():.4f}  |B| {weights.B.norm():.4f}",
    ]
    return "\n".join(lines)

"""The training cache: what stage 2 reads of each identity, made once between the stages, read through memory maps.

    python -m hdb cache --images FOLDER --weights STAGE1_OUT --out CACHE --image-encoder ENCODER
    python -m hdb train --cache CACHE --out RUN ...

Stage 2 needs three things per identity: the VAE latents of its photos' augmented views (what the diffusion
loss denoises), its photos as the image encoder sees them, and its pre-optimised weights (the weight loss's
target). Made by every process at every start, they cost an hour of face alignment at 15,000 identities and
more GPU memory than a card has at 100,000. The cache makes them once, in shards of SHARD_SIZE identities in
name order (a shard holds the same identities whatever the number of processes), each one safetensors file
holding, per identity <name>:

    <name>/views   fp16  [views, 4, h, w]     latents of the photos' augmented views, photo by photo
    <name>/crops   uint8 [photos, 3, S, S]    `encoder_crops`: the encoder's input before normalisation
    <name>/A, <name>/B   fp32                 the pre-optimised LiDB (absent where stage 1 made none)

(fp16 rather than bf16: latents are small numbers, and fp16 keeps 3 more bits of them.) Under
`accelerate launch` shard k is made by process k % N, from the face crops stage 1 aligned; each is written
whole or not at all and skipped when present, so a killed build resumes where it stopped. The main process
then writes index.json: the identities each shard holds, with their photo and view counts, and the
`fingerprint` of what the cache was made for, which stage 2 checks before it trains.

`TrainingData` is what stage 2 reads: the shards through `safe_open`, which memory-maps them, so a process
holds the index and one batch whatever the number of identities. Small runs and the toy skip the files:
`TrainingData.in_memory` makes the same tensors, rounded the same way, in memory.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from hdb.config import DatasetSource, LiDBConfig
from hdb.diffusion import AUGMENTATION_VERSION
from hdb.errors import HdbError
from hdb.faces import crop_size
from hdb.files import check_shared_folder, write_atomically
from hdb.hypernet import encoder_crops
from hdb.identities import (
    Identity,
    WeightsManifest,
    check_manifest,
    encode_identities,
    identity_names,
    read_manifest,
    read_weights,
    resolve_identities,
    stage1_folder,
)
from hdb.lidb import LiDB, arch_fingerprint
from hdb.models import Pipeline, native_resolution
from hdb.options import SHARD_SIZE

ALIGNED_AT_ONCE = 64  # a shard's identities are aligned and encoded this many at a time: host memory stays small
INDEX_FILE = "index.json"
METADATA_KEY = "hdb"  # a shard's header entry (JSON): its fingerprint and the photos it skipped
CACHE_VERSION = 1  # how a shard lays its tensors out: a cache of another version is refused, not misread
LATENT_DTYPE = torch.float16


def shard_file(number: int) -> str:
    return f"shard-{number:05d}.safetensors"


def names_sha256(names: list) -> str:
    """A short hash of an identity list, in order: what a cache, or a run, was made from."""
    return hashlib.sha256(json.dumps(names).encode()).hexdigest()[:16]


def fingerprint(
    pipe: Pipeline,
    lidb: LiDB,
    instance_token: str,
    resolution: int,
    encoder_size: int,
    names: list[str],
    shard_size: int = SHARD_SIZE,
) -> dict[str, object]:
    """What the cached tensors depend on: a cache made otherwise is refused rather than trained on."""
    return {
        "version": CACHE_VERSION,
        "arch_fingerprint": arch_fingerprint(lidb.layer_shapes),
        "aux_fingerprint": lidb.aux_fingerprint(),
        "lidb": asdict(lidb.config),
        "instance_token": instance_token,
        "resolution": resolution,
        "vae_scaling_factor": float(pipe.vae.config.scaling_factor),
        "encoder_size": encoder_size,
        "augmentation": AUGMENTATION_VERSION,
        "identities_sha256": names_sha256(names),
        "shard_size": shard_size,
    }


def identity_tensors(
    pipe: Pipeline,
    identities: list[Identity],
    targets: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    resolution: int,
    encoder_size: int,
) -> dict[str, torch.Tensor]:
    """The cached tensors of `identities` (see the module's docstring), on the CPU, as a shard stores them."""
    tensors = {}
    for identity, views in zip(identities, encode_identities(pipe, identities, resolution), strict=True):
        tensors[f"{identity.name}/views"] = views.to(LATENT_DTYPE).cpu().contiguous()
        tensors[f"{identity.name}/crops"] = encoder_crops(identity.faces, encoder_size)
        if identity.name in targets:
            A, B = targets[identity.name]
            tensors[f"{identity.name}/A"] = A.float().cpu().contiguous()
            tensors[f"{identity.name}/B"] = B.float().cpu().contiguous()
    return tensors


def _entries(
    names: list[str], tensors: Mapping[str, object] | set[str], shape: Callable[[str], Sequence[int]]
) -> list[dict[str, object]]:
    """Per identity held: its name, photo and view counts, and whether it has a target (the index's rows)."""
    return [
        {
            "name": name,
            "photos": shape(f"{name}/crops")[0],
            "views": shape(f"{name}/views")[0],
            "target": f"{name}/A" in tensors,
        }
        for name in names
        if f"{name}/views" in tensors
    ]


# ----------------------------------------------------------------------------- making the cache


def build_cache(
    pipe: Pipeline,
    images: str | Path | list[Identity] | DatasetSource,
    weights_dir: str | Path,
    out_dir: str | Path,
    encoder_size: int,
    resolution: int | None = None,
    progress: bool = True,
    shard_size: int = SHARD_SIZE,
) -> dict:
    """Write out_dir's shards (this process's share, those not there yet) and, from the main process, its index.

    `weights_dir`: the folder stage 1 wrote (its manifest, weights and face crops); `encoder_size`: the image
    encoder's input side (`hdb.hypernet.encoder_image_size`). Returns what this process did.
    """
    from accelerate import PartialState

    state = PartialState()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    check_shared_folder(state, out)  # which shards exist decides what is left to do
    manifest = read_manifest(weights_dir)
    resolution = resolution or native_resolution(pipe)
    names = identity_names(images)
    shards = [names[start : start + shard_size] for start in range(0, len(names), shard_size)]
    made, there, aligned, skipped = [], [], 0, Counter()
    with LiDB.attached(pipe, manifest.lidb) as lidb:
        check_manifest(manifest, lidb, weights_dir)
        expected = fingerprint(pipe, lidb, manifest.instance_token, resolution, encoder_size, names, shard_size)
        for number in range(state.process_index, len(shards), state.num_processes):
            path = out / shard_file(number)
            if path.is_file() and _shard_fingerprint(path) == expected:
                there.append(number)
                continue
            if path.is_file():
                raise HdbError(f"{path} was made for other settings or identities; make the cache in a new `out_dir`")
            tensors, skipped_here = {}, Counter()
            for start in range(0, len(shards[number]), ALIGNED_AT_ONCE):
                identities, skipped_part = resolve_identities(
                    images,
                    crop_size(resolution),
                    stage1_folder(weights_dir) / "faces",  # stage 1's crops, aligned once
                    progress,
                    set(shards[number][start : start + ALIGNED_AT_ONCE]),
                )
                targets = {i.name: w for i in identities if (w := read_weights(weights_dir, lidb, i.name)) is not None}
                tensors |= identity_tensors(pipe, identities, targets, resolution, encoder_size)
                aligned, skipped_here = aligned + len(identities), skipped_here + skipped_part
            # one metadata entry: safetensors writes several in no fixed order, and shards must be the same bytes
            metadata = {
                METADATA_KEY: json.dumps({"fingerprint": expected, "skipped": dict(sorted(skipped_here.items()))})
            }
            write_atomically(path, lambda partial, t=tensors, m=metadata: save_file(t, str(partial), metadata=m))
            made.append(number)
            skipped += skipped_here
        state.wait_for_everyone()  # every shard is there before the index lists them
        if state.is_main_process:
            write_index(out, len(shards), expected)
        state.wait_for_everyone()
    return {
        "shards": len(shards),
        "made": made,
        "already_there": len(there),
        "aligned": aligned,
        "skipped_photos": dict(sorted(skipped.items())),
        "process": state.process_index,
        "processes": state.num_processes,
    }


def _shard_metadata(shard: object) -> dict:
    """What `build_cache` wrote in a shard's header: its fingerprint, and the photos it skipped."""
    return json.loads((shard.metadata() or {}).get(METADATA_KEY, '{"fingerprint": null, "skipped": {}}'))


def _shard_fingerprint(path: Path) -> dict | None:
    try:
        with safe_open(str(path), framework="pt") as shard:
            return _shard_metadata(shard)["fingerprint"]
    except Exception:  # not a safetensors file (written by something else): not a shard of this cache
        return None


def write_index(out: Path, shards: int, expected: dict[str, object]) -> None:
    """out/index.json, from the shards' own headers: their identities, counts, skipped photos and fingerprint."""
    rows, skipped = [], Counter()
    for number in range(shards):
        with safe_open(str(out / shard_file(number)), framework="pt") as shard:
            metadata = _shard_metadata(shard)
            if metadata["fingerprint"] != expected:
                raise HdbError(f"{out / shard_file(number)} was made for other settings or identities")
            keys = set(shard.keys())
            names = sorted({key.rsplit("/", 1)[0] for key in keys})
            rows.append(_entries(names, keys, lambda key, shard=shard: shard.get_slice(key).get_shape()))
            skipped += Counter(metadata["skipped"])
    index = {"fingerprint": expected, "shards": rows, "skipped_photos": dict(skipped)}
    write_atomically(out / INDEX_FILE, lambda partial: partial.write_text(json.dumps(index)))


# ----------------------------------------------------------------------------- reading it


@dataclass
class TrainingData:
    """Stage 2's identities: per name, its views' latents, its encoder crops and its target, read on demand."""

    names: list[str]  # the usable identities, in name order
    photos: dict[str, int]
    views: dict[str, int]
    with_target: set[str]
    fingerprint: dict[str, object]
    source: str  # where the identities came from (for training.json)
    skipped_photos: dict[str, int]  # photos left out, by reason (no face, unreadable)
    _tensors: Mapping[str, torch.Tensor] | None = None  # in memory
    _shards: dict[str, object] | None = None  # or: name -> its shard's safe_open handle

    @classmethod
    def in_memory(
        cls,
        pipe: Pipeline,
        lidb: LiDB,
        instance_token: str,
        identities: list[Identity],
        targets: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
        resolution: int,
        encoder_size: int,
        source: str,
        skipped_photos: dict[str, int],
    ) -> TrainingData:
        """The same tensors as a cache of `identities` would hold, in memory."""
        tensors = identity_tensors(pipe, identities, targets, resolution, encoder_size)
        names = [i.name for i in identities]
        rows = _entries(names, tensors, lambda key: tensors[key].shape)
        stamp = fingerprint(pipe, lidb, instance_token, resolution, encoder_size, names)
        return cls._from_rows(rows, stamp, source, skipped_photos, tensors)

    @classmethod
    def open(cls, cache_dir: str | Path) -> TrainingData:
        """A cache `build_cache` made, its shards memory-mapped."""
        root = Path(cache_dir)
        try:
            index = json.loads((root / INDEX_FILE).read_text())
        except (OSError, ValueError) as error:
            raise HdbError(f"{root} is not a finished training cache ({INDEX_FILE}: {error})") from None
        if index["fingerprint"].get("version") != CACHE_VERSION:
            raise HdbError(f"{root} is a cache of another hdb version; make it again with `python -m hdb cache`")
        handles = {}
        for number, rows in enumerate(index["shards"]):
            try:
                shard = safe_open(str(root / shard_file(number)), framework="pt")
            except Exception as error:  # missing, truncated, not safetensors
                raise HdbError(f"Cannot read {root / shard_file(number)}: {error}; make the cache again") from None
            handles |= {row["name"]: shard for row in rows}
        rows = [row for shard_rows in index["shards"] for row in shard_rows]
        return cls._from_rows(rows, index["fingerprint"], str(root), index["skipped_photos"], None, handles)

    @classmethod
    def _from_rows(
        cls,
        rows: list[dict],
        stamp: dict,
        source: str,
        skipped_photos: dict[str, int],
        tensors: Mapping | None,
        shards: dict | None = None,
    ) -> TrainingData:
        return cls(
            names=[row["name"] for row in rows],
            photos={row["name"]: row["photos"] for row in rows},
            views={row["name"]: row["views"] for row in rows},
            with_target={row["name"] for row in rows if row["target"]},
            fingerprint=stamp,
            source=source,
            skipped_photos=skipped_photos,
            _tensors=tensors,
            _shards=shards,
        )

    def _read(self, name: str, what: str, index: int | None = None) -> torch.Tensor:
        key = f"{name}/{what}"
        if self._tensors is not None:
            tensor = self._tensors[key]
            return tensor if index is None else tensor[index]
        part = self._shards[name].get_slice(key)  # reads only the numbers asked for
        return part[:] if index is None else part[index]

    def crop(self, name: str, photo: int) -> torch.Tensor:
        """Photo `photo` of `name` as `encoder_crops` made it: uint8 [3, S, S]."""
        return self._read(name, "crops", photo)

    def view(self, name: str, view: int) -> torch.Tensor:
        """The latents of view `view` of `name`, fp32 [4, h, w]."""
        return self._read(name, "views", view).float()

    def target(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self._read(name, "A"), self._read(name, "B")

    def manifest(self) -> WeightsManifest:
        """What the cached weights were made with, as stage 1's manifest says it."""
        stamp = self.fingerprint
        return WeightsManifest(
            LiDBConfig(**stamp["lidb"]), stamp["instance_token"], stamp["arch_fingerprint"], stamp["aux_fingerprint"]
        )

    def check(self, pipe: Pipeline, lidb: LiDB, resolution: int, encoder_size: int) -> None:
        """Refuse a cache made for another base, LiDB, resolution or encoder input, naming each difference."""
        ours = fingerprint(pipe, lidb, self.fingerprint["instance_token"], resolution, encoder_size, [])
        differences = [
            f"{key}: {self.fingerprint[key]!r} in the cache, {value!r} here"
            for key, value in ours.items()
            if key not in ("identities_sha256", "shard_size") and self.fingerprint.get(key) != value
        ]
        if differences:
            raise HdbError(
                f"The training cache {self.source} was made for other settings ({'; '.join(differences)}); "
                "make it again for these, with `python -m hdb cache`"
            )

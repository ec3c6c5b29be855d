"""Training data: a folder of face photos (one identity per photo or per sub-folder) or a Hugging Face
dataset (rows grouped into identities by a column, or one identity per row), aligned once.

Both training stages read it the same way, with the face alignment personalisation uses. Photos
that cannot be used (unreadable, no face) are skipped and counted, never fatal; a folder with
nothing usable is. Stage 2 also reads what stage 1 wrote for them: its manifest (`read_manifest`: the
LiDB shape, aux seed and instance token the weights were made with) and the weights
(`load_weights_dataset`).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable, Collection
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from PIL import Image

from hdb.config import DatasetSource, LiDBConfig
from hdb.diffusion import augmented_views, encode_images
from hdb.errors import HdbError
from hdb.files import write_atomically
from hdb.lidb import LiDB, Signature, arch_fingerprint, check_signature
from hdb.models import Pipeline
from hdb.personal_file import load_personal

if TYPE_CHECKING:
    from datasets import Dataset

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}
MANIFEST_FILE = "manifest.json"  # stage 1's out folder: what its weights were made with
NO_FACE_SUFFIX = ".noface"  # the face cache's record of a photo in which no face was found
FAILED_SUFFIX = ".failed.json"  # beside stage 1's weights: why an identity has none (its training diverged)


@dataclass
class Identity:
    name: str
    faces: list[Image.Image]  # aligned crops, one per usable photo


def _photos(entry: Path) -> list[Path]:
    if entry.is_dir():
        return sorted(p for p in entry.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    return [entry] if entry.suffix.lower() in IMAGE_SUFFIXES else []


def _entries(root: Path) -> list[Path]:
    """The folder's identities, in name order: photos, and sub-folders holding photos."""
    if not root.is_dir():
        raise HdbError(f"Image folder not found: {root}")
    entries = sorted(e for e in root.iterdir() if _photos(e))
    if not entries:
        raise HdbError(
            f"{root} holds no photos ({', '.join(sorted(IMAGE_SUFFIXES))}), neither directly nor in sub-folders"
        )
    return entries


def _open_dataset(source: DatasetSource) -> Dataset:
    """The dataset's split, checked to have the columns asked for."""
    import datasets

    local = Path(source.path)
    try:
        if (local / "state.json").is_file() or (local / "dataset_dict.json").is_file():  # from save_to_disk
            dataset = datasets.load_from_disk(str(local))
            dataset = dataset[source.split] if isinstance(dataset, datasets.DatasetDict) else dataset
        else:
            dataset = datasets.load_dataset(source.path, split=source.split)
    except (OSError, KeyError, ValueError) as error:  # missing, offline, no such split
        raise HdbError(f"Could not load dataset {source.path!r} (split {source.split!r}): {error}") from None
    for column in (source.image_column, source.identity_column):
        if column is not None and column not in dataset.column_names:
            raise HdbError(
                f"Dataset {source.path} has no column {column!r}; its columns: {', '.join(dataset.column_names)}"
            )
    return dataset


def _dataset_identities(source: DatasetSource, dataset: Dataset) -> dict[str, list[int]]:
    """Row indices per identity name (a safe file name), in name order."""
    if source.identity_column is None:
        return {f"row{index:06d}": [index] for index in range(len(dataset))}
    rows, raw_names = {}, {}
    for index, value in enumerate(dataset[source.identity_column]):
        name = re.sub(r"[^\w.-]+", "_", str(value))  # weights and cached faces are files named after it
        if raw_names.setdefault(name, value) != value:
            raise HdbError(f"Identities {raw_names[name]!r} and {value!r} would share the file name {name!r}")
        rows.setdefault(name, []).append(index)
    return dict(sorted(rows.items()))


def identity_names(images: str | Path | list[Identity] | DatasetSource) -> list[str]:
    """The names of the identities a folder or dataset (in name order) or a list holds, before any alignment."""
    if isinstance(images, DatasetSource):
        return list(_dataset_identities(images, _open_dataset(images)))
    if isinstance(images, (str, Path)):
        return [entry.stem for entry in _entries(Path(images))]
    return [identity.name for identity in images]


Photos = dict[str, list[tuple[str, Callable[[], object]]]]  # identity -> (photo key, how to open it) per photo


def _align(photos: Photos, size: int, cache_dir: str | Path | None, progress: bool) -> tuple[list[Identity], Counter]:
    """Aligned faces per identity, skipping (and counting) unusable photos; results cached under cache_dir.

    The cache holds, per identity and photo key, the aligned crop (`<key>_<size>.png`) or, for a photo
    without a face, a `<key>.noface` marker: face detection is the slow part, and a photo without a face
    would otherwise be searched again on every run. Both are written whole or not at all, and a cached
    crop that cannot be read (a disk filled up, a copy cut short) counts as a miss: aligned and written again.
    The cache goes by photo key, not content: after replacing a photo, delete its entries (or the folder).
    """
    from tqdm.auto import tqdm

    from hdb.faces import align_face

    cache = Path(cache_dir) if cache_dir else None
    identities, skipped = [], Counter()
    for name, sources in tqdm(photos.items(), desc="aligning faces", disable=not progress, leave=False):
        faces = []
        for key, open_photo in sources:
            crop_file = cache / name / f"{key}_{size}.png" if cache else None
            no_face_file = cache / name / f"{key}{NO_FACE_SUFFIX}" if cache else None
            if no_face_file is not None and no_face_file.is_file():
                skipped["no face"] += 1
                continue
            cached = _read_cached_face(crop_file) if crop_file is not None else None
            if cached is not None:
                faces.append(cached)
                continue
            try:
                face = align_face(open_photo(), size=size).image
            except HdbError as error:
                no_face = "No face" in str(error)
                skipped["no face" if no_face else "unreadable"] += 1
                if no_face and no_face_file is not None:
                    no_face_file.parent.mkdir(parents=True, exist_ok=True)
                    write_atomically(no_face_file, lambda partial, error=error: partial.write_text(f"{error}\n"))
                continue
            if crop_file is not None:
                crop_file.parent.mkdir(parents=True, exist_ok=True)
                write_atomically(crop_file, lambda partial, face=face: face.save(partial, format="PNG"))
            faces.append(face)
        if faces:
            identities.append(Identity(name, faces))
    return identities, skipped


def _read_cached_face(path: Path) -> Image.Image | None:
    """The cached crop at `path`, or None when there is none or it cannot be read (it is then made again)."""
    if not path.is_file():
        return None
    try:
        with Image.open(path) as image:
            return image.convert("RGB")  # reads every pixel: a truncated file fails here, not later
    except (OSError, SyntaxError, ValueError):  # PIL's ways of saying a file is cut short or corrupt
        return None


def load_identities(
    images_dir: str | Path,
    size: int,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    names: Collection[str] | None = None,
) -> tuple[list[Identity], Counter]:
    """Aligned faces per identity, and a count of skipped photos by reason.

    With `cache_dir`, aligned crops are stored as PNGs and reused (face detection is the slow part).
    With `names`, only those identities are read (one process's share), and finding none usable is no error.
    """
    root = Path(images_dir)
    entries = [entry for entry in _entries(root) if names is None or entry.stem in names]
    photos = {entry.stem: [(photo.stem, lambda photo=photo: photo) for photo in _photos(entry)] for entry in entries}
    identities, skipped = _align(photos, size, cache_dir, progress)
    if not identities and names is None:
        raise HdbError(f"No usable face in {root} ({dict(skipped)} photos skipped)")
    return identities, skipped


def load_dataset_identities(
    source: DatasetSource,
    size: int,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    names: Collection[str] | None = None,
) -> tuple[list[Identity], Counter]:
    """As `load_identities`, for a Hugging Face dataset; a photo's cache key is its row."""
    dataset = _open_dataset(source)
    rows = {name: r for name, r in _dataset_identities(source, dataset).items() if names is None or name in names}
    photos = {
        name: [(f"row{row:06d}", lambda row=row: dataset[row][source.image_column]) for row in indices]
        for name, indices in rows.items()
    }
    identities, skipped = _align(photos, size, cache_dir, progress)
    if not identities and names is None:
        raise HdbError(f"No usable face in dataset {source.path} ({dict(skipped)} photos skipped)")
    return identities, skipped


def resolve_identities(
    images: str | Path | list[Identity] | DatasetSource,
    size: int,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    names: Collection[str] | None = None,
) -> tuple[list[Identity], Counter]:
    """A folder or dataset of photos (aligned here) or identities already prepared (e.g. synthetic renders);
    `names`: only those."""
    if isinstance(images, DatasetSource):
        return load_dataset_identities(images, size, cache_dir, progress, names)
    if isinstance(images, (str, Path)):
        return load_identities(images, size, cache_dir, progress, names)
    if not images:
        raise HdbError("No identities given")
    return [identity for identity in images if names is None or identity.name in names], Counter()


def encode_identities(
    pipe: Pipeline, identities: list[Identity], resolution: int, batch: int = 4
) -> list[torch.Tensor]:
    """VAE latents of each identity's augmented views: one [views, 4, h, w] tensor per identity. The views of
    several identities go through the VAE together, about `batch` at a time (at 512 px the VAE's activations
    dwarf the UNet's at batch 1: a large batch would raise a card's peak memory, e.g. a T4's in stage 1)."""
    latents = []
    per_call = max(batch // 4, 1)  # 4 views per photo
    for start in range(0, len(identities), per_call):
        views = [
            torch.cat([augmented_views(face, resolution) for face in identity.faces])
            for identity in identities[start : start + per_call]
        ]
        latents += encode_images(pipe, torch.cat(views)).float().split([len(v) for v in views])
    return latents


# ----------------------------------------------------------------------------- stage 1's output, read by stage 2


@dataclass(frozen=True)
class WeightsManifest:
    """What a stage 1 folder's weights were made with; stage 2 trains with the same, or refuses."""

    lidb: LiDBConfig
    instance_token: str
    arch_fingerprint: str
    aux_fingerprint: str

    def signature(self, num_layers: int) -> Signature:
        """As a LiDB signature; the manifest does not count the layers (the architecture fingerprint covers them)."""
        c = self.lidb
        return Signature(self.arch_fingerprint, num_layers, c.a, c.b, c.seed, self.aux_fingerprint, c.rank, c.layers)


def failed_identities(out_dir: str | Path) -> list[str]:
    """The identities of a stage 1 folder whose training diverged, by their `<name>.failed.json` records."""
    records = (Path(out_dir) / "weights").glob(f"*{FAILED_SUFFIX}")
    return sorted(path.name.removesuffix(FAILED_SUFFIX) for path in records)


def write_manifest(out_dir: str | Path, lidb: LiDB, instance_token: str) -> None:
    """Write out_dir/manifest.json; a later run on another base model or LiDB shape is refused instead of mixing.

    It also lists the identities that failed (`failed_identities`, as their records stand now), for whoever
    reads the folder; stage 2 needs no list: a failed identity has no weights file.
    """
    manifest = WeightsManifest(lidb.config, instance_token, arch_fingerprint(lidb.layer_shapes), lidb.aux_fingerprint())
    path = Path(out_dir) / MANIFEST_FILE
    if path.is_file():
        existing = read_manifest(out_dir)
        if (existing.arch_fingerprint, existing.lidb) != (manifest.arch_fingerprint, manifest.lidb):
            raise HdbError(
                f"{out_dir} holds weights for another base model or LiDB shape ({existing.lidb}); use a new `out_dir`"
            )
    content = {**asdict(manifest), "failed": failed_identities(out_dir)}
    write_atomically(path, lambda partial: partial.write_text(json.dumps(content, indent=1)))


def stage1_folder(weights_dir: str | Path) -> Path:
    """The folder stage 1 (preoptimize) wrote, given it or its weights/ sub-folder: the one with the manifest."""
    root = Path(weights_dir)
    found = next((folder for folder in (root, root.parent) if (folder / MANIFEST_FILE).is_file()), None)
    if found is None:
        raise HdbError(f"{root} has no {MANIFEST_FILE}: pass the folder stage 1 (preoptimize) wrote")
    return found


def read_manifest(weights_dir: str | Path) -> WeightsManifest:
    """The manifest of a stage 1 folder (`preoptimize`'s `out_dir`; its weights/ sub-folder is accepted too)."""
    path = stage1_folder(weights_dir) / MANIFEST_FILE
    try:
        values = json.loads(path.read_text())
        return WeightsManifest(
            lidb=LiDBConfig(**values["lidb"]),
            instance_token=values["instance_token"],
            arch_fingerprint=values["arch_fingerprint"],
            aux_fingerprint=values["aux_fingerprint"],
        )
    except (ValueError, KeyError, TypeError) as error:
        raise HdbError(f"{path} is not a valid pre-optimisation manifest: {error!r}") from None


def check_manifest(manifest: WeightsManifest, lidb: LiDB, weights_dir: str | Path) -> None:
    """Refuse stage 1 weights made for another base architecture or other aux bases, before any training."""
    check_signature(
        manifest.signature(len(lidb.layer_names)), lidb.signature(), f"The pre-optimised weights in {weights_dir}"
    )


def read_weights(weights_dir: str | Path, lidb: LiDB, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Identity `name`'s pre-optimised (A, B), checked against the model being trained (rank included); None
    when stage 1 made none for it."""
    root = Path(weights_dir)
    path = (root / "weights" if (root / "weights").is_dir() else root) / f"{name}.safetensors"
    if not path.is_file():
        return None
    weights = load_personal(path)
    # personalisation may relax the rank, but the weight loss compares numbers one to one
    check_signature(weights.signature(), lidb.signature(), f"Pre-optimised weights file {path}", same_rank=True)
    return weights.A, weights.B


def load_weights_dataset(
    weights_dir: str | Path, lidb: LiDB, names: list[str]
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Pre-optimised (A, B) per identity name (`read_weights`); an error when none of them has any."""
    found = {name: weights for name in names if (weights := read_weights(weights_dir, lidb, name)) is not None}
    if not found:
        raise HdbError(f"No pre-optimised weights in {weights_dir} match the identities in the image folder")
    return found

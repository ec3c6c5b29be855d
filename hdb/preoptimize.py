"""Stage 1: pre-optimise a LiDB per identity, the targets the hypernetwork learns to predict.

Identities train in groups through LiDB's per-sample path: a batch holds one photo of each
identity of the group, and each batch element uses its own identity's weights. Every identity's
weights are written as an ordinary personal file, so the dataset is resumable (done identities are
skipped) and each entry can be inspected with `python -m hdb info` or used to generate.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from hdb.diffusion import diffusion_loss, encode_prompts
from hdb.errors import HdbError
from hdb.faces import crop_size
from hdb.identities import Identity, encode_identities, resolve_identities
from hdb.lidb import LiDB, LiDBConfig, text_encoders
from hdb.models import training_scheduler
from hdb.personal_file import DEFAULT_INSTANCE_TOKEN, PersonalWeights, instance_prompt_for, save_personal
from hdb.personalize import native_resolution
from hdb.training import TrainConfig, freeze, train


@dataclass
class PreoptimizeConfig:
    steps: int = 300  # per group of identities
    group_size: int = 4  # identities trained together, one batch element each
    learning_rate: float = 5e-3
    optimizer: str = "adamw"
    gradient_checkpointing: bool = False
    seed: int = 0
    resolution: int | None = None
    instance_token: str = DEFAULT_INSTANCE_TOKEN
    lidb: LiDBConfig = field(default_factory=LiDBConfig)
    progress: bool = True


def preoptimize(
    pipe, images: str | Path | list[Identity], out_dir: str | Path, config: PreoptimizeConfig = PreoptimizeConfig()
) -> dict:
    """Write out_dir/weights/<identity>.safetensors for every identity not done yet; returns a summary.

    `images`: a folder (one photo or sub-folder per identity) or a list of prepared `Identity`s.
    """
    out = Path(out_dir)
    resolution = config.resolution or native_resolution(pipe)
    identities, skipped = resolve_identities(images, crop_size(resolution), out / "faces", config.progress)
    weights_dir = out / "weights"
    weights_dir.mkdir(parents=True, exist_ok=True)
    todo = [identity for identity in identities if not (weights_dir / f"{identity.name}.safetensors").is_file()]
    lidb = LiDB(pipe, config.lidb)
    _write_manifest(out, lidb, config)
    freeze(pipe.unet, pipe.vae, *text_encoders(pipe).values())
    if config.gradient_checkpointing:
        pipe.unet.enable_gradient_checkpointing()
    pipe.unet.train()
    scheduler = training_scheduler(pipe)
    prompt = instance_prompt_for(config.instance_token)
    device = pipe.unet.device
    losses = {}
    for start in range(0, len(todo), config.group_size):
        group = todo[start : start + config.group_size]
        latents = encode_identities(pipe, group, resolution)
        A, B = lidb.initial_weights(len(group))  # one shared start: comparable targets
        A, B = torch.nn.Parameter(A), torch.nn.Parameter(B)
        lidb.use_per_sample(A, B)

        def loss_fn(step: int) -> torch.Tensor:
            generator = torch.Generator().manual_seed(config.seed * 1_000_003 + start * 10_007 + step)
            batch = torch.stack([views[step % len(views)] for views in latents])
            noise = torch.randn(batch.shape, generator=generator).to(device)
            timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(group),), generator=generator).to(
                device
            )
            cond = encode_prompts(pipe, [prompt] * len(group))
            return diffusion_loss(pipe, scheduler, batch, cond, noise, timesteps).mean()

        names = ", ".join(identity.name for identity in group)
        train_config = TrainConfig(
            steps=config.steps,
            learning_rate=config.learning_rate,
            optimizer=config.optimizer,
            progress=config.progress,
            description=f"pre-optimising {names}"[:60],
        )
        history = train([A, B], loss_fn, train_config)
        for index, identity in enumerate(group):
            lidb.use_shared()
            lidb.load_weights(A[index].detach(), B[index].detach())
            save_personal(
                PersonalWeights.from_lidb(lidb, prompt, config.instance_token),
                weights_dir / f"{identity.name}.safetensors",
            )
            losses[identity.name] = (history[0], sum(history[-10:]) / len(history[-10:]))
    pipe.unet.eval()
    lidb.detach()
    return {
        "identities": len(identities),
        "trained": len(todo),
        "already_done": len(identities) - len(todo),
        "skipped_photos": dict(skipped),
        "losses": losses,
    }


def _write_manifest(out: Path, lidb: LiDB, config: PreoptimizeConfig) -> None:
    """What the weights belong to; a later run on another base model is refused instead of mixing."""
    manifest = {
        "arch_fingerprint": lidb.arch_fingerprint(),
        "aux_fingerprint": lidb.aux_fingerprint(),
        "lidb": asdict(config.lidb),
        "instance_token": config.instance_token,
    }
    path = out / "manifest.json"
    if path.is_file():
        existing = json.loads(path.read_text())
        if existing["arch_fingerprint"] != manifest["arch_fingerprint"] or existing["lidb"] != manifest["lidb"]:
            raise HdbError(
                f"{out} holds weights for another base model or LiDB shape ({existing['lidb']}); use a new --out folder"
            )
    path.write_text(json.dumps(manifest, indent=1))


def load_weights_dataset(
    weights_dir: str | Path, lidb: LiDB, names: list[str]
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Pre-optimised (A, B) per identity name, checked against the model being trained."""
    from hdb.personal_file import check_compatible, load_personal

    root = Path(weights_dir)
    folder = root / "weights" if (root / "weights").is_dir() else root
    found = {}
    for name in names:
        path = folder / f"{name}.safetensors"
        if path.is_file():
            weights = load_personal(path)
            check_compatible(weights, lidb, source=f"pre-optimised weights file {path.name}")
            found[name] = (weights.A, weights.B)
    if not found:
        raise HdbError(f"No pre-optimised weights in {folder} match the identities in the image folder")
    return found

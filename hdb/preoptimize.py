"""Stage 1: pre-optimise a LiDB per identity, the targets the hypernetwork learns to predict.

Identities train in groups through LiDB's per-sample path: a batch holds one photo of each
identity of the group, and each batch element uses its own identity's weights. Each identity's
noise comes from its own seed (`sample_seed(seed, identity, step)`), so its weights do not depend on
its group. Every identity's weights are written as an ordinary personal file, so the dataset is
resumable (done identities are skipped) and each entry can be inspected with `python -m hdb info`
or used to generate.
"""

from __future__ import annotations

from pathlib import Path

import torch

from hdb.config import PreoptimizeConfig, instance_prompt_for
from hdb.diffusion import sample_seed, step_loss, tokenize_prompts
from hdb.faces import crop_size
from hdb.identities import Identity, encode_identities, resolve_identities, write_manifest
from hdb.lidb import LiDB
from hdb.models import Pipeline, native_resolution, training_scheduler
from hdb.personal_file import PersonalWeights, save_personal
from hdb.stage import training_stage
from hdb.training import TrainConfig, train

MEMORY_OPTIONS = "a smaller --group-size, --gradient-checkpointing, --optimizer adamw8bit, --dtype fp16"


def preoptimize(
    pipe: Pipeline,
    images: str | Path | list[Identity],
    out_dir: str | Path,
    config: PreoptimizeConfig | None = None,
) -> dict:
    """Write out_dir/weights/<identity>.safetensors for every identity not done yet; returns a summary.

    `images`: a folder (one photo or sub-folder per identity) or a list of prepared `Identity`s.
    """
    config = config or PreoptimizeConfig()
    out = Path(out_dir)
    resolution = config.resolution or native_resolution(pipe)
    identities, skipped = resolve_identities(images, crop_size(resolution), out / "faces", config.progress)
    weights_dir = out / "weights"
    weights_dir.mkdir(parents=True, exist_ok=True)
    todo = [identity for identity in identities if not (weights_dir / f"{identity.name}.safetensors").is_file()]
    lidb = LiDB(pipe, config.lidb)
    losses = {}
    with training_stage(pipe, lidb, "pre-optimising", MEMORY_OPTIONS, config.gradient_checkpointing, detach_after=True):
        write_manifest(out, lidb, config.instance_token)
        prompt = instance_prompt_for(config.instance_token)
        prompt_tokens = tokenize_prompts(pipe, [prompt])
        scheduler = training_scheduler(pipe)
        for start in range(0, len(todo), config.group_size):
            group = todo[start : start + config.group_size]
            latents = encode_identities(pipe, group, resolution)
            A, B = lidb.initial_weights(len(group))  # one shared start: comparable targets
            A, B = torch.nn.Parameter(A), torch.nn.Parameter(B)
            lidb.use_per_sample(A, B)

            def loss_fn(
                step: int, group: list[Identity] = group, latents: list[torch.Tensor] = latents
            ) -> torch.Tensor:
                batch = torch.stack([views[step % len(views)] for views in latents])
                seeds = [sample_seed(config.seed, identity.name, step) for identity in group]
                return step_loss(pipe, scheduler, batch, prompt_tokens, seeds).mean()

            names = ", ".join(identity.name for identity in group)
            train_config = TrainConfig(
                steps=config.steps,
                learning_rate=config.learning_rate,
                optimizer=config.optimizer,
                progress=config.progress,
                description=f"pre-optimising {names}"[:60],
            )
            history = train([A, B], loss_fn, train_config)
            lidb.use_shared()
            for index, identity in enumerate(group):
                lidb.load_weights(A[index].detach(), B[index].detach())
                path = weights_dir / f"{identity.name}.safetensors"
                save_personal(PersonalWeights.from_lidb(lidb, prompt, config.instance_token), path)
                losses[identity.name] = (history[0], sum(history[-10:]) / len(history[-10:]))
    return {
        "identities": len(identities),
        "trained": len(todo),
        "already_done": len(identities) - len(todo),
        "skipped_photos": dict(skipped),
        "losses": losses,
    }

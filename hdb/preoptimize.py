"""Stage 1: pre-optimise a LiDB per identity, the targets the hypernetwork learns to predict.

Identities train in groups through LiDB's per-sample path: a batch holds one photo of each
identity of the group, and each batch element uses its own identity's weights. An identity's weights
do not depend on its group: everyone starts from the same A, its noise comes from its own seed
(`sample_seed(seed, identity, step)`), its loss is summed, not averaged, with the group's (its gradient
is its own), and nothing is clipped jointly (AdamW's per-number steps need no clipping here).

Under `accelerate launch` the groups are shared out: group g of the identities still to do (in name
order for a folder) goes to process g % num_processes, which trains and writes its identities; the main
process writes the manifest. Every
identity's weights are written as an ordinary personal file (whole, or not at all), so the dataset is
resumable with any number of processes (done identities are skipped) and each entry can be inspected
with `python -m hdb info` or used to generate.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch

from hdb.config import DatasetSource, PreoptimizeConfig, instance_prompt_for
from hdb.diffusion import sample_seed, step_loss, tokenize_prompts
from hdb.errors import HdbError
from hdb.faces import crop_size
from hdb.files import write_atomically
from hdb.identities import Identity, encode_identities, identity_names, resolve_identities, write_manifest
from hdb.lidb import LiDB
from hdb.models import Pipeline, native_resolution, training_scheduler
from hdb.personal_file import PersonalWeights, save_personal
from hdb.stage import training_stage
from hdb.training import TrainConfig, train

MEMORY_OPTIONS = "a smaller `group_size`, `gradient_checkpointing=True`, `optimizer='adamw8bit'`, `dtype='fp16'`"


def preoptimize(
    pipe: Pipeline,
    images: str | Path | list[Identity] | DatasetSource,
    out_dir: str | Path,
    config: PreoptimizeConfig | None = None,
) -> dict:
    """Write out_dir/weights/<identity>.safetensors for every identity not done yet; returns a summary.

    `images`: a folder (one photo or sub-folder per identity), a Hugging Face dataset, or prepared `Identity`s.
    """
    from accelerate import PartialState

    config = config or PreoptimizeConfig()
    state = PartialState()  # one process, or one of those `accelerate launch` started
    out = Path(out_dir)
    resolution = config.resolution or native_resolution(pipe)
    weights_dir = out / "weights"
    weights_dir.mkdir(parents=True, exist_ok=True)
    names = identity_names(images)
    todo = [name for name in names if not (weights_dir / f"{name}.safetensors").is_file()]
    # Group g of the identities to do goes to process g % num_processes. A group is the same whatever the
    # number of processes, so its weights are too, bit for bit on the same hardware.
    groups = [todo[start : start + config.group_size] for start in range(0, len(todo), config.group_size)]
    my_groups = groups[state.process_index :: state.num_processes]
    identities, skipped = resolve_identities(
        images, crop_size(resolution), out / "faces", config.progress, {name for group in my_groups for name in group}
    )
    if not identities and len(todo) == len(names) and state.num_processes == 1:  # nothing usable, nothing done
        raise HdbError(f"No usable face among the {len(names)} identities ({dict(skipped)} photos skipped)")
    usable = {identity.name: identity for identity in identities}  # a photo without a face leaves a group smaller
    losses = {}
    with (
        LiDB.attached(pipe, config.lidb) as lidb,
        training_stage(pipe, lidb, "pre-optimising", MEMORY_OPTIONS, config.gradient_checkpointing),
    ):
        if state.is_main_process:
            write_manifest(out, lidb, config.instance_token)  # refuses a folder made for another base
        state.wait_for_everyone()  # so no process trains into a refused folder
        prompt = instance_prompt_for(config.instance_token)
        prompt_tokens = tokenize_prompts(pipe, [prompt])
        scheduler = training_scheduler(pipe)
        for group_names in my_groups:
            group = [usable[name] for name in group_names if name in usable]
            if not group:
                continue
            latents = encode_identities(pipe, group, resolution)
            A, B = lidb.initial_weights(len(group))  # one shared start: comparable targets
            A, B = torch.nn.Parameter(A), torch.nn.Parameter(B)

            def loss_fn(
                step: int, group: list[Identity] = group, latents: list[torch.Tensor] = latents
            ) -> torch.Tensor:
                batch = torch.stack([views[step % len(views)] for views in latents])
                seeds = [sample_seed(config.seed, identity.name, step) for identity in group]
                return step_loss(pipe, scheduler, batch, prompt_tokens, seeds).sum()

            train_config = TrainConfig(
                steps=config.steps,
                learning_rate=config.learning_rate,
                optimizer=config.optimizer,
                max_grad_norm=None,  # one norm over the group would tie each identity's steps to the others'
                progress=config.progress,
                description=f"pre-optimising {', '.join(identity.name for identity in group)}"[:60],
            )
            with lidb.per_sample(A, B):
                history = train([A, B], loss_fn, train_config).losses
            for index, identity in enumerate(group):
                person = PersonalWeights.from_lidb(lidb, prompt, config.instance_token, (A[index], B[index]))
                # whole or not at all: a killed run leaves no half file that looks done
                write_atomically(weights_dir / f"{identity.name}.safetensors", partial(save_personal, person))
                first, last = history[0], sum(history[-10:]) / len(history[-10:])
                losses[identity.name] = (first / len(group), last / len(group))  # the group's summed loss, per identity
    return {
        "identities": len(identities) + len(names) - len(todo),  # usable here, and done before
        "trained": len(identities),
        "already_done": len(names) - len(todo),
        "skipped_photos": dict(skipped),
        "losses": losses,
        "process": state.process_index,
        "processes": state.num_processes,
    }

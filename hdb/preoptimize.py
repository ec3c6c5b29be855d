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

A group whose training diverges (a NaN or exploding loss) does not stop the stage: each of its identities
gets a `weights/<name>.failed.json` (what failed, at which step, with which loss) instead of weights, the
other groups go on, and the summary and the manifest list the failures. A rerun leaves those identities
out unless `retry_failed=True`: with the same settings they would likely diverge again. Each trained
identity's first loss and the mean of its last ones go to `losses.jsonl`, one line per identity: a loss
that does not fall, or rises, calls for another learning rate (docs/TRAINING.md).
"""

from __future__ import annotations

import json
import math
from functools import partial
from pathlib import Path

import torch

from hdb.config import DatasetSource, PreoptimizeConfig, instance_prompt_for
from hdb.diffusion import sample_seed, step_loss, tokenize_prompts
from hdb.errors import HdbError
from hdb.faces import crop_size
from hdb.files import check_shared_folder, write_atomically
from hdb.identities import (
    FAILED_SUFFIX,
    Identity,
    encode_identities,
    identity_names,
    resolve_identities,
    write_manifest,
)
from hdb.lidb import LiDB
from hdb.models import Pipeline, native_resolution, training_scheduler
from hdb.personal_file import PersonalWeights, save_personal
from hdb.stage import training_stage
from hdb.training import TrainConfig, TrainingDiverged, train

MEMORY_OPTIONS = "a smaller `group_size`, `gradient_checkpointing=True`, `optimizer='adamw8bit'`, `dtype='fp16'`"
LOSSES_FILE = "losses.jsonl"  # one line per trained identity: its first loss and the mean of its last ones
# Steps averaged into an identity's last loss: one step's diffusion loss swings with the timestep it drew.
LAST_STEPS = 10


def preoptimize(
    pipe: Pipeline,
    images: str | Path | list[Identity] | DatasetSource,
    out_dir: str | Path,
    config: PreoptimizeConfig | None = None,
) -> dict:
    """Write out_dir/weights/<identity>.safetensors for every identity not done yet; returns a summary.

    `images`: a folder (one photo or sub-folder per identity), a Hugging Face dataset, or prepared `Identity`s.
    The summary's `losses` holds each identity trained now: (its first loss, the mean of its last ones);
    `failed`: the identities whose group diverged now; `failed_before`: those an earlier run gave up on and
    this one left out (see `retry_failed`).
    """
    from accelerate import PartialState

    config = config or PreoptimizeConfig()
    state = PartialState()  # one process, or one of those `accelerate launch` started
    out = Path(out_dir)
    resolution = config.resolution or native_resolution(pipe)
    weights_dir = out / "weights"
    weights_dir.mkdir(parents=True, exist_ok=True)
    check_shared_folder(state, out)  # the to-do list below comes from what exists there
    names = identity_names(images)
    done, left_out, todo = _to_do(names, weights_dir, config.retry_failed)
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
    losses: dict[str, tuple[float, float]] = {}
    failed: list[str] = []
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
            try:
                A, B, first, last = _train_group(pipe, lidb, group, resolution, scheduler, prompt_tokens, config)
            except TrainingDiverged as error:  # this group's identities are given up on; the other groups go on
                for identity in group:
                    _record_failure(weights_dir, identity.name, group, error, config)
                failed += [identity.name for identity in group]
                continue
            for index, identity in enumerate(group):
                person = PersonalWeights.from_lidb(lidb, prompt, config.instance_token, (A[index], B[index]))
                # whole or not at all: a killed run leaves no half file that looks done
                write_atomically(weights_dir / f"{identity.name}.safetensors", partial(save_personal, person))
                _failure_file(weights_dir, identity.name).unlink(missing_ok=True)  # an earlier failure, retried
                losses[identity.name] = (first[index], last[index])
            _log_losses(out, {identity.name: losses[identity.name] for identity in group}, config.steps)
        state.wait_for_everyone()  # every process's failures are recorded before the manifest lists them
        if state.is_main_process:
            write_manifest(out, lidb, config.instance_token)
    return {
        "identities": len(identities) + len(done) + len(left_out),  # usable here, done before, left out
        "trained": len(identities) - len(failed),
        "already_done": len(done),
        "failed": failed,
        "failed_before": sorted(left_out),
        "skipped_photos": dict(skipped),
        "losses": losses,
        "process": state.process_index,
        "processes": state.num_processes,
    }


def _to_do(names: list[str], weights_dir: Path, retry_failed: bool) -> tuple[set[str], set[str], list[str]]:
    """The identities done already (their file is there), those left out (an earlier run gave up on them, unless
    `retry_failed`), and the rest, to do, in order."""
    done = {name for name in names if (weights_dir / f"{name}.safetensors").is_file()}
    failed_before = {name for name in names if name not in done and _failure_file(weights_dir, name).is_file()}
    left_out = set() if retry_failed else failed_before
    return done, left_out, [name for name in names if name not in done and name not in left_out]


def _train_group(
    pipe: Pipeline,
    lidb: LiDB,
    group: list[Identity],
    resolution: int,
    scheduler: object,
    prompt_tokens: list[torch.Tensor],
    config: PreoptimizeConfig,
) -> tuple[torch.Tensor, torch.Tensor, list[float], list[float]]:
    """Pre-optimise a group of identities together, each with its own LiDB weights (one batch element each, from one
    shared start: comparable targets). Returns their weights (A, B) and each one's first loss and the mean of its
    last ones; TrainingDiverged when the group diverges."""
    latents = encode_identities(pipe, group, resolution)
    A, B = (torch.nn.Parameter(weights) for weights in lidb.own.initial_weights(len(group)))
    last_steps = range(max(config.steps - LAST_STEPS, 0), config.steps)
    kept: dict[int, torch.Tensor] = {}  # each identity's loss at the first and the last steps, by step

    def loss_fn(step: int) -> torch.Tensor:
        batch = torch.stack([views[step % len(views)] for views in latents])
        seeds = [sample_seed(config.seed, identity.name, step) for identity in group]
        each = step_loss(pipe, scheduler, batch, prompt_tokens, seeds)
        if step == 0 or step in last_steps:
            kept[step] = each.detach()
        return each.sum()  # each identity's gradient is its own loss's

    train_config = TrainConfig.of_stage(
        config,
        f"pre-optimising {', '.join(identity.name for identity in group)}"[:60],
        max_grad_norm=None,  # one norm over the group would tie each identity's steps to the others'
    )
    with lidb.own.per_sample(A, B):
        train([A, B], loss_fn, train_config)
    last = torch.stack([kept[step] for step in last_steps]).mean(dim=0).tolist()
    return A, B, kept[0].tolist(), last


def _failure_file(weights_dir: Path, name: str) -> Path:
    return weights_dir / f"{name}{FAILED_SUFFIX}"


def _record_failure(
    weights_dir: Path, name: str, group: list[Identity], error: TrainingDiverged, config: PreoptimizeConfig
) -> None:
    """`<name>.failed.json`: why the identity has no weights, and what it was trained with."""
    loss = error.loss if error.loss is None or math.isfinite(error.loss) else str(error.loss)  # JSON has no NaN
    record = {
        "identity": name,
        "error": str(error),
        "step": error.step,
        "loss": loss,
        "group": [identity.name for identity in group],  # trained together: one identity's NaN stops them all
        "learning_rate": config.learning_rate,
        "steps": config.steps,
    }
    write_atomically(_failure_file(weights_dir, name), lambda partial: partial.write_text(json.dumps(record, indent=1)))


def _log_losses(out: Path, losses: dict[str, tuple[float, float]], steps: int) -> None:
    """Append one line per identity to losses.jsonl: one write of whole lines, so that processes sharing the
    folder (each appending its own identities) do not interleave them."""
    lines = "".join(
        json.dumps({"identity": name, "first_loss": first, "last_loss": last, "steps": steps}) + "\n"
        for name, (first, last) in losses.items()
    )
    with (out / LOSSES_FILE).open("a") as file:
        file.write(lines)

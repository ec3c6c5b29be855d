"""The stage scaffold: how every training stage borrows a pipeline and gives it back as it found it.

Pre-optimisation, hypernetwork training, fast finetuning and the bench all train through a shared
pipeline. Inside `training_stage` the base weights are frozen, the denoiser and text encoders are in
train mode (gradient checkpointing only runs there), checkpointing is on when asked, and the LiDB
starts with no gradients. On the way out, whether the stage finished, diverged or ran out of
memory, all of that is put back, so the next user of the pipeline (the next visitor of the app,
the next stage) starts clean.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from hdb.errors import HdbError
from hdb.families import family_of
from hdb.lidb import LiDB
from hdb.models import Pipeline


@contextmanager
def training_stage(
    pipe: Pipeline,
    lidb: LiDB | None,
    activity: str,
    memory_options: str,
    gradient_checkpointing: bool = False,
) -> Iterator[None]:
    """Set `pipe` up to train through `lidb`; restore it on exit, and turn a GPU out-of-memory into one clear line.

    `activity` names the stage in messages ("finetuning"); `memory_options` lists the settings that lower
    its memory, as Python names them (`gradient_checkpointing=True`: see hdb.terms). A stage with a LiDB of
    its own holds it in `LiDB.attached` around this. Without a LiDB (the bench's baselines, the toy's base
    model) the stage unfreezes what it trains itself.
    """
    if lidb is not None and lidb.merged:  # merged weights take no gradient: training would silently do nothing
        raise HdbError("The LiDB is merged into the base weights; unmerge it before training")
    family = family_of(pipe)
    trained = [model for model, _ in family.lidb_components(pipe).values()]  # what carries LiDB layers
    everything = [family.denoiser(pipe), *family.text_encoders(pipe).values(), pipe.vae]
    requires_grad = [(p, p.requires_grad) for module in everything for p in module.parameters()]
    modes = [(module, module.training) for module in everything]
    checkpointing = [(module, _is_checkpointing(module)) for module in trained]
    try:
        for module in everything:
            module.requires_grad_(False)  # base weights never train; only what the stage hands to `train` does
        if gradient_checkpointing:
            for module in trained:
                _set_checkpointing(module, True)
        for module in trained:
            module.train()  # gradient checkpointing only runs in train mode; SD has no dropout to mind
        _clear_gradients(lidb)
        yield
    except torch.OutOfMemoryError:
        raise HdbError(f"The GPU ran out of memory while {activity}. Lower memory with {memory_options}.") from None
    finally:
        _clear_gradients(lidb)
        if lidb is not None:
            lidb.own.use_shared()
        for module, was_checkpointing in checkpointing:
            if _is_checkpointing(module) != was_checkpointing:
                _set_checkpointing(module, was_checkpointing)
        for module, was_training in modes:
            module.train(was_training)
        for parameter, flag in requires_grad:
            parameter.requires_grad_(flag)


def _clear_gradients(lidb: LiDB | None) -> None:
    for parameter in lidb.trainable_parameters() if lidb is not None else []:
        parameter.grad = None


def _is_checkpointing(module: torch.nn.Module) -> bool:
    if hasattr(module, "is_activation_checkpointing"):  # transformers 5
        return module.is_activation_checkpointing
    return module.is_gradient_checkpointing  # diffusers


def _set_checkpointing(module: torch.nn.Module, on: bool) -> None:
    if hasattr(module, "enable_gradient_checkpointing"):  # diffusers
        module.enable_gradient_checkpointing() if on else module.disable_gradient_checkpointing()
    else:  # transformers 5
        module.activation_checkpointing_enable() if on else module.activation_checkpointing_disable()

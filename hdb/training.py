"""The one training loop: pre-optimisation, hypernetwork training and fast finetuning all use it.

A stage hands over its trainable parameters and a `loss_fn(step) -> loss`; the loop owns the rest:
optimizer (AdamW, or bitsandbytes' 8-bit AdamW), fp16 loss scaling, gradient clipping, a progress
bar, and a guard that stops on a NaN or exploding loss with the last good weights restored.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from hdb.errors import HdbError

OPTIMIZERS = ("adamw", "adamw8bit")


@dataclass
class TrainConfig:
    steps: int
    learning_rate: float
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    fp16_loss_scaling: bool = False  # set when activations are fp16 (bf16/fp32 need none)
    explode_factor: float = 50.0  # a loss this many times the first one means training blew up
    progress: bool = True
    description: str = "training"


class TrainingDiverged(HdbError):
    """The loss became NaN/inf or exploded; parameters were restored to the last good step."""


def make_optimizer(parameters: list[torch.nn.Parameter], name: str, learning_rate: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    if name == "adamw":
        fused = all(p.device.type == "cuda" for p in parameters)  # one kernel for the whole update on GPUs
        return torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=weight_decay, fused=fused or None)
    if name == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as error:
            raise HdbError(f"--optimizer adamw8bit needs bitsandbytes ({error}); pip install bitsandbytes") from None
        # Tensors under 4,096 elements keep 32-bit state in bitsandbytes; large ones get 8-bit state.
        return bnb.optim.AdamW8bit(parameters, lr=learning_rate, weight_decay=weight_decay)
    raise HdbError(f"Unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")


def freeze(*modules: torch.nn.Module) -> None:
    """Base weights never train; only what a stage hands to `train` does."""
    for module in modules:
        if module is not None:
            module.requires_grad_(False)


def train(
    parameters: list[torch.nn.Parameter],
    loss_fn: Callable[[int], torch.Tensor],
    config: TrainConfig,
    on_step: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Run `config.steps` optimisation steps of `loss_fn` over `parameters`; returns the loss per step."""
    optimizer = make_optimizer(parameters, config.optimizer, config.learning_rate, config.weight_decay)
    device_type = parameters[0].device.type
    scaler = torch.amp.GradScaler(device_type, enabled=config.fp16_loss_scaling and device_type == "cuda")
    last_good = [p.detach().clone() for p in parameters]
    losses: list[float] = []
    bar = tqdm(range(config.steps), desc=config.description, disable=not config.progress, leave=False)
    for step in bar:
        loss = loss_fn(step)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(parameters, config.max_grad_norm or float("inf"))
        value, norm = torch.stack([loss.detach().float(), grad_norm.float()]).tolist()  # one GPU sync a step
        if not math.isfinite(value) or (losses and value > config.explode_factor * max(losses[0], 1e-8)):
            _restore(parameters, last_good)
            raise TrainingDiverged(
                f"{config.description}: loss became {value:.4g} at step {step} (first step: {losses[0] if losses else float('nan'):.4g}); "
                "stopped and kept the weights of the last good step. Try a lower learning rate."
            )
        if not scaler.is_enabled() and not math.isfinite(norm):  # with fp16 scaling, the scaler skips such steps
            _restore(parameters, last_good)
            raise TrainingDiverged(f"{config.description}: gradients became NaN/inf at step {step}; kept the last good weights")
        for good, parameter in zip(last_good, parameters):
            good.copy_(parameter.detach())
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        losses.append(value)
        bar.set_postfix(loss=f"{value:.4f}")
        if on_step is not None:
            on_step(step, value)
    return losses


@torch.no_grad()
def _restore(parameters: list[torch.nn.Parameter], values: list[torch.Tensor]) -> None:
    for parameter, value in zip(parameters, values):
        parameter.copy_(value)

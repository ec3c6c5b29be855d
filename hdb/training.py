"""The one training loop: pre-optimisation, hypernetwork training and fast finetuning all use it.

A stage hands over its trainable parameters and a `loss_fn(i) -> loss`; the loop owns the rest:
optimizer (AdamW, or bitsandbytes' 8-bit AdamW), the learning-rate schedule (optional warm-up, then
constant or cosine), gradient accumulation, fp16 loss scaling,
gradient clipping, several processes through `accelerate`, a progress bar, and a guard that stops
on a NaN or exploding loss with the last good weights restored. Optimizer state is checkpointed
as safetensors, like everything else hdb writes.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from hdb.config import LR_SCHEDULES, OPTIMIZERS
from hdb.errors import HdbError, check_choice

if TYPE_CHECKING:
    from accelerate import Accelerator

SNAPSHOT_PLACES = ("auto", "device", "host")
SNAPSHOT_ON_DEVICE_BYTES = 256 * 2**20


@dataclass
class TrainConfig:
    steps: int
    learning_rate: float
    optimizer: str = OPTIMIZERS[0]
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    accumulation_steps: int = 1  # micro-batches per optimizer step
    warmup_steps: int = 0  # the learning rate rises linearly over these first steps
    lr_schedule: str = LR_SCHEDULES[0]  # then stays ("constant") or falls to 0 at `steps` ("cosine")
    fp16_loss_scaling: bool = False  # set when activations are fp16 (bf16/fp32 need none)
    # A loss above explode_factor x (the median of recent good losses, at least 1) means training blew
    # up. Not "x the first loss": with one sample a step the diffusion loss spans ~100x across
    # timesteps, so a first draw at high noise would stop healthy runs. The floor of 1 is the
    # diffusion loss's own scale (its target is unit-variance noise).
    explode_factor: float = 50.0
    # Under fp16 loss scaling an overflowing step is normal: the scaler skips it and halves its scale.
    # This many skips in a row, though, means the gradients themselves are infinite: training diverged.
    max_skips_in_a_row: int = 25
    # The guard keeps one copy of the trainables, taken every `snapshot_every` steps (where the host waits
    # for the GPU once), on the "device", in "host" memory, or "auto": host for trainables over 256 MiB.
    snapshot_every: int = 10
    snapshot_on: str = "auto"
    progress: bool = True
    description: str = "training"

    @classmethod
    def of_stage(cls, stage: object, description: str, **decided: Any) -> TrainConfig:
        """The loop's settings for a stage: those its config (PersonalizeConfig, PreoptimizeConfig,
        HypernetTrainConfig) holds under the same names, and what the stage `decided` itself."""
        shared = {item.name: getattr(stage, item.name) for item in fields(cls) if hasattr(stage, item.name)}
        return cls(**{**shared, "description": description, **decided})


class TrainingDiverged(HdbError):
    """The loss became NaN/inf or exploded; parameters were restored to the guard's snapshot.

    `step` and `loss`: the step that failed and its loss (NaN, inf, or the exploding value), for callers that
    record failures. `last_good`: what the caller's model held after that restore, where the caller records it
    (a personalisation records the person, `PersonalWeights`, before it lets the person go), for callers that
    score it anyway.
    """

    def __init__(self, message: str, step: int | None = None, loss: float | None = None) -> None:
        super().__init__(message)
        self.step, self.loss = step, loss

    last_good: object | None = None


@dataclass
class TrainResult:
    losses: list[float]  # the loss of each step run
    skipped_steps: list[int]  # steps the fp16 loss scaler skipped because their gradients overflowed


def make_optimizer(
    parameters: list[torch.nn.Parameter], name: str, learning_rate: float, weight_decay: float = 0.0
) -> torch.optim.Optimizer:
    check_choice("optimizer", name, OPTIMIZERS)
    if name == "adamw":
        fused = all(p.device.type == "cuda" for p in parameters)  # one kernel for the whole update on GPUs
        return torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=weight_decay, fused=fused or None)
    try:  # adamw8bit
        import bitsandbytes as bnb
    except ImportError as error:
        raise HdbError(f"`optimizer='adamw8bit'` needs bitsandbytes ({error}); pip install bitsandbytes") from None
    # Tensors under 4,096 elements keep 32-bit state in bitsandbytes; large ones get 8-bit state.
    return bnb.optim.AdamW8bit(parameters, lr=learning_rate, weight_decay=weight_decay)


def learning_rate_factor(step: int, config: TrainConfig) -> float:
    """The learning rate of `step` as a fraction of `config.learning_rate`: warm-up, then constant or cosine."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.lr_schedule == "constant":
        return 1.0
    progress = (step - config.warmup_steps) / max(config.steps - config.warmup_steps, 1)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def learning_rate_schedule(
    optimizer: torch.optim.Optimizer, config: TrainConfig, start_step: int = 0
) -> torch.optim.lr_scheduler.LambdaLR:
    """The schedule positioned at `start_step`. Its rate is a pure function of the step, so a resumed run
    recreates it here and applies exactly the rates an uninterrupted run would have."""
    check_choice("learning-rate schedule", config.lr_schedule, LR_SCHEDULES)
    if config.warmup_steps < 0:
        raise HdbError(f"Warm-up steps must be 0 or more, got {config.warmup_steps}")
    for group in optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])  # the base rate (a checkpointed optimizer carries its own)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: learning_rate_factor(step, config), last_epoch=start_step - 1
    )


def train(
    parameters: list[torch.nn.Parameter],
    loss_fn: Callable[[int], torch.Tensor],
    config: TrainConfig,
    on_step: Callable[[int, float], None] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    accelerator: Accelerator | None = None,
    start_step: int = 0,
    model: torch.nn.Module | None = None,
) -> TrainResult:
    """Optimise `parameters` from `start_step` to `config.steps`; returns each step's loss and the skipped steps.

    `loss_fn(i)` computes the loss of micro-batch i (with gradient accumulation, step s runs
    micro-batches s*k .. s*k+k-1); drawing its data and noise from i makes a resumed run exact.
    With an `accelerate.Accelerator` (several processes), `parameters` belong to a model it
    prepared, so gradients are averaged across processes; the loss guard sees the mean over all
    processes, so every process stops together. `model`, the one it prepared: with gradient accumulation,
    the gradients are averaged once a step, after the last micro-batch, not after each (`no_sync`).

    A guard (`_Guard`) stops training on a NaN or exploding loss, restoring the last weights that passed.
    `on_step(step, loss)` is called as each loss is read, after step `step`'s update and before the
    next one: the right moment to checkpoint step `step`. Gradients are cleared however it ends.
    """
    optimizer = optimizer or make_optimizer(parameters, config.optimizer, config.learning_rate, config.weight_decay)
    schedule = learning_rate_schedule(optimizer, config, start_step)
    device_type = parameters[0].device.type
    scaler = torch.amp.GradScaler(device_type, enabled=config.fp16_loss_scaling)
    loss_scaling = scaler.is_enabled() or (accelerator is not None and accelerator.scaler is not None)
    backward = accelerator.backward if accelerator is not None else (lambda loss: scaler.scale(loss).backward())
    clip = accelerator.clip_grad_norm_ if accelerator is not None else torch.nn.utils.clip_grad_norm_
    waiting: _StepOnItsWay | None = None  # a step whose numbers are still on their way to the host
    main_process = accelerator is None or accelerator.is_main_process
    bar = tqdm(
        range(start_step, config.steps),
        desc=config.description,
        disable=not (config.progress and main_process),
        leave=False,
    )
    guard = _Guard(parameters, config, start_step, loss_scaling, bar)

    def report(step: int, loss: float) -> None:
        """Hand a step to `on_step`: only once that step's update is in the parameters."""
        if on_step is not None:
            on_step(step, loss)

    try:
        for step in bar:
            loss_sum = torch.zeros((), device=parameters[0].device)
            for micro in range(config.accumulation_steps):
                last = micro == config.accumulation_steps - 1
                with nullcontext() if last or model is None else accelerator.no_sync(model):
                    loss = loss_fn(step * config.accumulation_steps + micro)
                    backward(loss / config.accumulation_steps)
                loss_sum = loss_sum + loss.detach().float() / config.accumulation_steps
            scaler.unscale_(optimizer)
            grad_norm = clip(parameters, config.max_grad_norm or float("inf"))
            if accelerator is not None:
                loss_sum = accelerator.reduce(loss_sum, reduction="mean")
            if waiting is not None:  # the previous step, read while this one is already queued on the GPU
                report(waiting.step, guard.check(waiting))
            waiting = _StepOnItsWay(step, torch.stack([loss_sum, grad_norm.float()]))
            passed_before_update = None
            if (step - start_step) % config.snapshot_every == 0:
                passed_before_update = guard.check(waiting)  # the host waits for this step only
                waiting = None
                guard.snapshot.take(parameters, step)  # not yet updated: the weights whose loss just passed
            scaler.step(optimizer)
            scaler.update()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            if passed_before_update is not None:  # reported after its update, as every other step is
                report(step, passed_before_update)
        if waiting is not None:
            report(waiting.step, guard.check(waiting))
    finally:
        for parameter in parameters:  # a failed step's NaN gradients must not reach the next user of these weights
            parameter.grad = None
    if guard.skipped and main_process and config.progress:
        bar.write(f"{config.description}: the fp16 loss scaler skipped {len(guard.skipped)} overflowing step(s)")
    return TrainResult(guard.losses, guard.skipped)


class _Guard:
    """The loss guard: reads each step's loss and gradient norm, and stops training with the snapshot's weights (the
    last that passed) when the loss is NaN or explodes, or the gradients are NaN/inf. It keeps the losses read and
    the steps skipped.

    `train` hands it most steps' numbers one step late: the host queues step s on the GPU before it waits for step
    s-1's numbers, so the GPU does not idle while Python prepares the next step. Every `snapshot_every` steps the
    step is read at once instead and, if it passed, the weights that step started from are copied: the one copy a
    failed step is restored to.

    With fp16 loss scaling (hdb's own scaler, or accelerate's under `mixed_precision="fp16"`), a step whose
    gradients overflow is skipped by the scaler and counted, not called divergence; a NaN loss, an exploding loss
    or `max_skips_in_a_row` overflows in a row still stop training.
    """

    def __init__(
        self, parameters: list[torch.nn.Parameter], config: TrainConfig, start_step: int, loss_scaling: bool, bar: tqdm
    ) -> None:
        self.parameters, self.config, self.loss_scaling, self.bar = parameters, config, loss_scaling, bar
        self.snapshot = _Snapshot(parameters, config.snapshot_on, start_step)
        self.losses: list[float] = []
        self.skipped: list[int] = []

    def check(self, done: _StepOnItsWay) -> float:
        """Stop with the snapshot's weights if `done` went wrong; else record its loss and return it."""
        config, losses, skipped = self.config, self.losses, self.skipped
        value, norm = done.read()
        typical = max(statistics.median(losses[-100:]), 1.0) if losses else 1.0
        kept = f"kept the weights of step {self.snapshot.step}"
        if not math.isfinite(value) or value > config.explode_factor * typical:
            self.snapshot.restore(self.parameters)
            raise TrainingDiverged(
                f"{config.description}: loss became {value:.4g} at step {done.step} (typical so far: {typical:.4g}); "
                f"stopped and {kept}. Try a lower learning rate.",
                done.step,
                value,
            )
        if not math.isfinite(norm):
            skipped.append(done.step)
            in_a_row = len(skipped) >= config.max_skips_in_a_row and skipped[-config.max_skips_in_a_row] == (
                done.step - config.max_skips_in_a_row + 1
            )
            if not self.loss_scaling or in_a_row:  # without a scaler the optimizer has already taken the step
                self.snapshot.restore(self.parameters)
                raise TrainingDiverged(
                    f"{config.description}: gradients became NaN/inf at step {done.step}; {kept}", done.step, value
                )
        losses.append(value)
        self.bar.set_postfix(loss=f"{value:.4f}")
        return value


class _Snapshot:
    """The guard's one copy of the trainables, on the device or in host memory (see `TrainConfig.snapshot_on`)."""

    def __init__(self, parameters: list[torch.nn.Parameter], where: str, step: int) -> None:
        check_choice("snapshot place", where, SNAPSHOT_PLACES)
        if where == "auto":
            size = sum(p.numel() * p.element_size() for p in parameters)
            where = "device" if size <= SNAPSHOT_ON_DEVICE_BYTES else "host"
        self.on_host = where == "host"
        self.values = [p.detach().to("cpu" if self.on_host else p.device, copy=True) for p in parameters]
        self.step = step  # the step whose starting weights these are

    @torch.no_grad()
    def take(self, parameters: list[torch.nn.Parameter], step: int) -> None:
        for value, parameter in zip(self.values, parameters, strict=True):
            value.copy_(parameter)
        self.step = step

    @torch.no_grad()
    def restore(self, parameters: list[torch.nn.Parameter]) -> None:
        for parameter, value in zip(parameters, self.values, strict=True):
            parameter.copy_(value)


class _StepOnItsWay:
    """A step's [loss, gradient norm], copied to the host without making the host wait for the GPU."""

    def __init__(self, step: int, numbers: torch.Tensor) -> None:
        self.step, self.copied = step, None
        if numbers.device.type == "cuda":
            self.numbers = torch.empty(numbers.shape, dtype=numbers.dtype, pin_memory=True)
            self.numbers.copy_(numbers, non_blocking=True)
            self.copied = torch.cuda.Event()
            self.copied.record()
        else:
            self.numbers = numbers

    def read(self) -> list[float]:
        if self.copied is not None:
            self.copied.synchronize()  # waits for this step only, not for the steps queued after it
        return self.numbers.tolist()


# ----------------------------------------------------------------------------- optimizer checkpoints (safetensors)


def save_optimizer(optimizer: torch.optim.Optimizer, path: str | Path) -> None:
    """Optimizer state as safetensors: tensors flattened to "state.<param>.<name>", the rest as JSON metadata."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{name}"] = value
    metadata = {"param_groups": json.dumps(state["param_groups"]), "scalars": json.dumps(scalars)}
    save_file(tensors, str(path), metadata=metadata)


def load_optimizer(optimizer: torch.optim.Optimizer, path: str | Path) -> None:
    with safe_open(str(path), framework="pt") as file:
        metadata = file.metadata()
        tensors = {key: file.get_tensor(key) for key in file.keys()}
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = value
    for key, value in json.loads(metadata["scalars"]).items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": json.loads(metadata["param_groups"])})

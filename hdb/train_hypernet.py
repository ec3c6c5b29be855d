"""Stage 2: train the hypernetwork to predict a LiDB from a face photo.

    loss = alpha * diffusion loss of the predicted weights on the identity's photos
         + beta  * ||predicted dW - pre-optimised dW||^2 / ||pre-optimised dW||^2   (beta = 0 needs no stage 1)

The weight term compares each layer's dense update, not the raw factors (`hdb.lidb.weight_distance`):
factors of the same update can differ, and the normalisation makes beta free of the weights' scale
(`weight_loss="paper"`: the paper's raw L2 between the factors, for comparison).

The predicted weights of each batch element go through LiDB's per-sample path, so the diffusion
loss reaches every hypernetwork parameter. Runs unchanged on one process or under
`accelerate launch` (DDP): each process takes its slice of the same global batch, drawn from
(seed, step), and each sample's noise from its own seed, so several processes compute what one would,
and a resumed run continues exactly.

The file reads in the order a run goes: setting up (`Run` holds what every phase uses), one step's loss,
what follows a step (validation, a sample, the log, a checkpoint), the end; `train_hypernetwork`, last,
runs the phases.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch

from hdb import checkpoints
from hdb.cache import TrainingData
from hdb.config import (
    DEFAULT_INSTANCE_TOKEN,
    MIXED_PRECISIONS,
    PAIRINGS,
    WEIGHT_LOSSES,
    DatasetSource,
    HypernetTrainConfig,
    LiDBConfig,
    instance_prompt_for,
)
from hdb.diffusion import sample_seed, step_loss, tokenize_prompts
from hdb.errors import HdbError, check_choice
from hdb.faces import crop_size
from hdb.families import denoiser
from hdb.files import check_shared_folder
from hdb.hypernet import (
    ENCODER_DIR,
    TRAINING_FILE,
    HyperNetwork,
    build_tiny_image_encoder,
    encoder_image_size,
    load_image_encoder,
)
from hdb.identities import (
    Identity,
    WeightsManifest,
    check_manifest,
    load_weights_dataset,
    read_manifest,
    resolve_identities,
)
from hdb.lidb import LiDB, weight_distance
from hdb.models import Pipeline, load_pipeline, native_resolution, training_scheduler
from hdb.personal_file import public_name
from hdb.seeding import initialised_from
from hdb.stage import training_stage
from hdb.training import TrainConfig, learning_rate_factor, load_optimizer, make_optimizer, train

if TYPE_CHECKING:
    from accelerate import Accelerator
    from diffusers import DDPMScheduler
    from diffusers.training_utils import EMAModel

MEMORY_OPTIONS = (
    "a smaller `batch_size` with `accumulation_steps`, `gradient_checkpointing=True`, `mixed_precision` fp16 or bf16, "
    "`optimizer='adamw8bit'`"
)
LOSSES_FILE = "losses.jsonl"  # one JSON record per step
PROCESS_GROUP_TIMEOUT_S = 2 * 3600  # NCCL's default of 10 minutes is shorter than aligning photos in memory takes
TrainingImages = str | Path | list[Identity] | DatasetSource | TrainingData  # what stage 2 can train on


def weight_loss(
    kind: str, A: torch.Tensor, B: torch.Tensor, target_A: torch.Tensor, target_B: torch.Tensor
) -> torch.Tensor:
    """Stage 2's weight term per sample, `kind` one of WEIGHT_LOSSES: "dense", hdb's gauge-free distance between
    the layers' updates (`hdb.lidb.weight_distance`), or "paper", the raw L2 between the factors, summed."""
    check_choice("weight_loss", kind, WEIGHT_LOSSES)
    if kind == "dense":
        return weight_distance(A, B, target_A, target_B)
    if A.shape != target_A.shape:
        raise HdbError(f"The paper's weight loss compares factors: rank {A.shape[-2]} against {target_A.shape[-2]}")
    return (A.float() - target_A.float()).square().sum(dim=(1, 2, 3)) + (B.float() - target_B.float()).square().sum(
        dim=(1, 2, 3)
    )


def pair_photo_and_view(seed: int, photos: int, views: int, pairing: str) -> tuple[int, int]:
    """(input photo, target view) of one batch slot, drawn from `seed`: see `PAIRINGS` in hdb.config.

    An identity's views are its photos' augmented views, photo by photo (`encode_identities`).
    """
    check_choice("pairing", pairing, PAIRINGS)
    photo = seed % photos
    if pairing == "independent":
        return photo, (seed >> 8) % views
    per_photo = views // photos  # "same": one of this photo's own views
    return photo, photo * per_photo + (seed >> 8) % per_photo


# ----------------------------------------------------------------------------- setting a run up


def _settings(config: HypernetTrainConfig, manifest: WeightsManifest | None) -> tuple[LiDBConfig, str]:
    """The LiDB and instance token to train with: the pre-optimised weights', refusing options that disagree."""
    if manifest is None:
        return config.lidb or LiDBConfig(), config.instance_token or DEFAULT_INSTANCE_TOKEN
    if config.lidb is not None and config.lidb != manifest.lidb:
        raise HdbError(
            f"The LiDB asked for ({config.lidb}) differs from the one the pre-optimised weights were made with "
            f"({manifest.lidb}); leave it out to use theirs"
        )
    if config.instance_token is not None and config.instance_token != manifest.instance_token:
        raise HdbError(
            f"Instance token {config.instance_token!r} differs from the pre-optimised weights' "
            f"{manifest.instance_token!r}; leave it out to use theirs"
        )
    return manifest.lidb, manifest.instance_token


def _build_hypernet(config: HypernetTrainConfig, lidb: LiDB, resume: Path | None) -> HyperNetwork:
    """The latest checkpoint's hypernetwork, or a fresh one drawn from the run's seed."""
    if resume is not None:  # loaded in eval mode, for inference; it trains in train mode, as a fresh one does
        # a frozen encoder is not in the checkpoints (`checkpoints.save_checkpoint`): loaded again as the run began
        saved = (resume / "hypernet" / ENCODER_DIR).is_dir()
        encoder = None if saved else _image_encoder(config)
        return HyperNetwork.from_pretrained(resume / "hypernet", lidb=lidb, image_encoder=encoder).train()
    return HyperNetwork.for_lidb(lidb, _image_encoder(config), config.image_encoder, config.seed, config.decoder)


def _image_encoder(config: HypernetTrainConfig) -> torch.nn.Module:
    """The run's image encoder as it starts: loaded (or the tiny random one), any missing weight from the seed."""
    if config.image_encoder == "tiny":
        return build_tiny_image_encoder(config.seed)
    with initialised_from(config.seed):  # any weight the encoder's files lack is drawn from the run's seed too
        return load_image_encoder(config.image_encoder)


@dataclass
class Run:
    """What the phases of one stage-2 run work with, handed to each of them explicitly."""

    config: HypernetTrainConfig
    train_config: TrainConfig  # the training loop's settings (and the learning rate each step logs)
    out: Path
    accelerator: Accelerator
    pipe: Pipeline
    lidb: LiDB
    instance_token: str
    model: torch.nn.Module  # the hypernetwork as `accelerator.prepare` wrapped it (DDP over several processes)
    parameters: list[torch.nn.Parameter]  # the hypernetwork's trainable ones
    ema: EMAModel | None  # their moving average, with `ema_decay`
    optimizer: torch.optim.Optimizer
    noise_schedule: DDPMScheduler
    settings: dict[str, object]  # what each checkpoint records, and a resume must match (`checkpoints.run_settings`)
    prompt_tokens: list[torch.Tensor]  # the instance prompt's tokens, for each text encoder
    data: TrainingData  # each identity's views as latents, photos as encoder crops, and pre-optimised (A, B)
    normalise: Callable[[torch.Tensor], torch.Tensor]  # encoder crops -> the image encoder's input, on its device
    train_names: list[str]
    held_out: list[str]  # for validation and the samples
    micro_batches: Iterator[Slice]  # the training micro-batches in order, from the resumed step on
    # filled in as training goes
    step_terms: dict[int, dict[str, list[torch.Tensor]]] = field(default_factory=dict)  # see `micro_batch_loss`
    validation: list[tuple[int, float]] = field(default_factory=list)  # (step, validation loss)


def start_log(run: Run, start_step: int) -> None:
    """Start the trackers (`report_to`); cut losses.jsonl back to the steps before `start_step` (they are redone)."""
    if not run.accelerator.is_main_process:
        return
    run.out.mkdir(parents=True, exist_ok=True)
    run.accelerator.init_trackers(
        "hdb", config={k: v for k, v in asdict(run.config).items() if isinstance(v, (int, float, str, bool))}
    )
    log_path = run.out / LOSSES_FILE
    kept = (
        [line for line in log_path.read_text().splitlines() if json.loads(line)["step"] < start_step]
        if log_path.is_file()
        else []
    )
    log_path.write_text("".join(line + "\n" for line in kept))


# ----------------------------------------------------------------------------- one step


class Slice(NamedTuple):
    """What one process needs of one batch, drawn on the CPU (ahead of time, by DataLoader workers if asked)."""

    draw: int | str  # the micro-batch's number, or "validation"
    seeds: list[int]  # each slot's: its input photo, target view and noise
    crops: torch.Tensor  # uint8 [n, 3, S, S], the input photos before normalisation
    views: torch.Tensor  # [n, 4, h, w], the latents to denoise
    targets: tuple[torch.Tensor, torch.Tensor] | None  # pre-optimised (A, B); None unless every identity has them


def process_slots(batch_size: int, process: int, processes: int) -> range:
    """The slots of a training batch that process `process` of `processes` computes."""
    per_process = batch_size // processes
    return range(process * per_process, (process + 1) * per_process)


def validation_slots(held_out: int, batch_size: int, process: int, processes: int) -> list[range]:
    """The chunks of the held-out identities that process `process` computes: `batch_size` at a time (no
    more memory than a training batch), chunk c on process c % `processes`."""
    chunks = [range(first, min(first + batch_size, held_out)) for first in range(0, held_out, batch_size)]
    return chunks[process::processes]


def draw_slice(
    data: TrainingData, config: HypernetTrainConfig, names: list[str], mine: range, draw: int | str
) -> Slice:
    """The slots `mine` of the batch of identities `names`. `draw` (a micro-batch's number, or "validation")
    fixes the batch's randomness."""
    # one seed per slot of the batch, the same in every process: it picks the slot's input photo and target
    # view, and draws its noise
    seeds = [sample_seed(config.seed, draw, k) for k in mine]
    pairs = [
        pair_photo_and_view(seed, data.photos[names[k]], data.views[names[k]], config.pairing)
        for k, seed in zip(mine, seeds, strict=True)
    ]
    crops = torch.stack([data.crop(names[k], photo) for k, (photo, _) in zip(mine, pairs, strict=True)])
    views = torch.stack([data.view(names[k], view) for k, (_, view) in zip(mine, pairs, strict=True)])
    targets = None
    if config.beta > 0 and all(name in data.with_target for name in names):
        weights = [data.target(names[k]) for k in mine]
        targets = torch.stack([A for A, _ in weights]), torch.stack([B for _, B in weights])
    return Slice(draw, seeds, crops, views, targets)


def sample_losses(
    run: Run, model: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]], part: Slice
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Each sample's loss in a slice of a batch, [n], with `model`'s predictions; and its terms apart (detached)."""
    config, accelerator = run.config, run.accelerator
    A, B = model(run.normalise(part.crops))
    run.lidb.own.use_per_sample(A, B)  # until the next batch: gradient checkpointing re-runs the forward in backward
    views = part.views.to(accelerator.device, non_blocking=True)  # one batch on the device at a time
    with accelerator.autocast():
        diffusion = step_loss(run.pipe, run.noise_schedule, views, run.prompt_tokens, part.seeds)
    terms = {"diffusion_loss": diffusion.detach()}
    loss = config.alpha * diffusion
    if part.targets is not None:
        target_A, target_B = (t.to(A.device, non_blocking=True) for t in part.targets)
        weight = weight_loss(config.weight_loss, A, B, target_A, target_B)
        terms["weight_loss"] = weight.detach()
        loss = loss + config.beta * weight
    return loss, terms


def slice_loss(run: Run, part: Slice) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The mean loss of one process's slice of a training batch, and its terms apart (detached)."""
    losses, terms = sample_losses(run, run.model, part)
    return losses.mean(), {name: values.mean() for name, values in terms.items()}


def batch_loss(run: Run, names: list[str], draw: int | str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss of this process's slice of the training batch `names` (`draw_slice`), and its terms apart."""
    mine = process_slots(len(names), run.accelerator.process_index, run.accelerator.num_processes)
    return slice_loss(run, draw_slice(run.data, run.config, names, mine, draw))


def batch_names(config: HypernetTrainConfig, train_names: list[str], micro: int) -> list[str]:
    """The identities of micro-batch `micro`, drawn from (seed, micro): a resumed run draws the same."""
    generator = torch.Generator().manual_seed(sample_seed(config.seed, "batch", micro))
    return [train_names[k] for k in torch.randint(0, len(train_names), (config.batch_size,), generator=generator)]


class MicroBatches(torch.utils.data.Dataset):
    """The training micro-batches from `first` on, this process's slice of each: what a DataLoader reads ahead."""

    def __init__(
        self,
        data: TrainingData,
        config: HypernetTrainConfig,
        train_names: list[str],
        process: int,
        processes: int,
        first: int,
    ) -> None:
        self.data, self.config, self.train_names = data, config, train_names
        self.process, self.processes, self.first = process, processes, first

    def __len__(self) -> int:
        return self.config.steps * self.config.accumulation_steps - self.first

    def __getitem__(self, index: int) -> Slice:
        micro = self.first + index
        names = batch_names(self.config, self.train_names, micro)
        mine = process_slots(self.config.batch_size, self.process, self.processes)
        return draw_slice(self.data, self.config, names, mine, micro)


def micro_batch_loss(run: Run, micro: int) -> torch.Tensor:
    """The training loss of micro-batch `micro`, read from `run.micro_batches` (they come in order).

    Its terms are kept in `run.step_terms` until `after_step` logs the step: the loop reads a step's loss
    one step late, after the next step's micro-batches already ran.
    """
    part = next(run.micro_batches)
    if part.draw != micro:  # the loop and the loader count micro-batches alike; anything else is a bug here
        raise RuntimeError(f"stage 2 expected micro-batch {micro}, the loader gave {part.draw}")
    loss, terms = slice_loss(run, part)
    for name, value in terms.items():
        run.step_terms.setdefault(micro // run.config.accumulation_steps, {}).setdefault(name, []).append(value)
    return loss


# ----------------------------------------------------------------------------- after a step: validate, sample, log


@contextmanager
def _in_eval_mode(module: torch.nn.Module) -> Iterator[None]:
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


@contextmanager
def averaged_weights(run: Run) -> Iterator[None]:
    """The hypernetwork with its moving average's weights (`ema_decay`), its trained ones back after."""
    if run.ema is None:
        yield
        return
    run.ema.store(run.parameters)
    run.ema.copy_to(run.parameters)
    try:
        yield
    finally:
        run.ema.restore(run.parameters)


@torch.no_grad()
def validation_loss(run: Run) -> float:
    """The mean loss over the held-out identities, drawn the same way every time: comparable over the run.

    Computed `batch_size` at a time, the chunks shared out over the processes, and summed over them.
    """
    accelerator = run.accelerator
    hypernet = accelerator.unwrap_model(run.model)  # not through DDP: processes may compute unequal numbers of chunks
    process, processes = accelerator.process_index, accelerator.num_processes
    chunks = validation_slots(len(run.held_out), run.config.batch_size, process, processes)
    loss_sum = torch.zeros((), device=accelerator.device)
    # validation routes the LiDB to its own predictions
    with _in_eval_mode(hypernet), run.lidb.restored(), averaged_weights(run):
        for mine in chunks:
            part = draw_slice(run.data, run.config, run.held_out, mine, "validation")
            loss_sum += sample_losses(run, hypernet, part)[0].float().sum()
    # the chunks of all processes together cover every held-out identity once
    return (accelerator.reduce(loss_sum, reduction="sum") / len(run.held_out)).item()


@torch.no_grad()
def save_sample(run: Run, step: int) -> None:
    """What the predicted weights draw for the first held-out face: saved to samples/ and to the tracker."""
    from hdb.generate import generate

    hypernet = run.accelerator.unwrap_model(run.model)  # the main process alone: not through DDP
    with _in_eval_mode(hypernet), averaged_weights(run):
        A, B = hypernet(run.normalise(run.data.crop(run.held_out[0], 0)[None]))
    with run.lidb.holding(A[0].float(), B[0].float()), _in_eval_mode(denoiser(run.pipe)):
        prompt = f"a portrait of a {run.instance_token}"
        image = generate(run.pipe, run.lidb, prompt, steps=run.config.sample_steps, seed=0)[0]
    (run.out / "samples").mkdir(exist_ok=True)
    image.save(run.out / "samples" / f"step-{step:06d}.png")
    if run.config.report_to == "tensorboard":
        writer = run.accelerator.get_tracker("tensorboard", unwrap=True)
        writer.add_image("validation/sample", np.asarray(image), step, dataformats="HWC")
    elif run.config.report_to == "wandb":
        import wandb

        run.accelerator.log({"validation/sample": wandb.Image(image)}, step=step)


def log_step(run: Run, record: dict) -> None:
    """One step's record, to TensorBoard and as a line of losses.jsonl."""
    run.accelerator.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])
    with (run.out / LOSSES_FILE).open("a") as file:
        file.write(json.dumps(record) + "\n")


def _due(step: int, every: int, steps: int) -> bool:
    """Whether a task done every `every` steps falls on `step`; the last step does them all."""
    return (step + 1) % every == 0 or step + 1 == steps


def after_step(run: Run, step: int, loss: float) -> None:
    """Log step `step`; validate, sample and checkpoint when due. The loop calls it as it reads the step's loss."""
    config, accelerator = run.config, run.accelerator
    if run.ema is not None:  # the loop calls back once the step's update is in the weights
        run.ema.step(run.parameters)
    terms = run.step_terms.pop(step, {})  # the two terms apart, to see which one moves
    record = {
        "step": step,
        "loss": loss,
        **{name: torch.stack(values).mean().item() for name, values in terms.items()},
        "learning_rate": config.learning_rate * learning_rate_factor(step, run.train_config),
    }
    if run.held_out and _due(step, config.validate_every, config.steps):  # holdout 0: none
        record["validation_loss"] = validation_loss(run)
        run.validation.append((step, record["validation_loss"]))
    if accelerator.is_main_process:
        if "validation_loss" in record and config.sample_steps:
            save_sample(run, step)
        log_step(run, record)
    if _due(step, config.checkpoint_every, config.steps):
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:  # written once, whatever the number of processes
            hypernet = accelerator.unwrap_model(run.model)
            keep = config.checkpoints_total_limit
            checkpoints.save_checkpoint(run.out, step, hypernet, run.optimizer, run.ema, run.settings, keep)
        accelerator.wait_for_everyone()


# ----------------------------------------------------------------------------- the end


def save_hypernetwork(run: Run) -> None:
    """out/hypernet, with how it was trained beside it (training.json: what the model card, hdb.hub, says)."""
    config = run.config
    with averaged_weights(run):  # the moving average, if kept, is the result
        run.accelerator.unwrap_model(run.model).save_pretrained(run.out / "hypernet")
    training = {
        "config": {
            **{k: v for k, v in asdict(config).items() if k != "progress"},
            "image_encoder": public_name(config.image_encoder),  # the record may be shared: no local paths
            "lidb": asdict(run.lidb.config),  # what was trained with, read from the manifest or defaulted
            "instance_token": run.instance_token,
        },
        "steps_run": config.steps,
        "identities": len(run.train_names),
        "held_out": run.held_out,
        "images": public_name(run.data.source),
        "processes": run.accelerator.num_processes,
        "final_validation_loss": run.validation[-1][1] if run.validation else None,
    }
    (run.out / "hypernet" / TRAINING_FILE).write_text(json.dumps(training, indent=1))


def micro_batch_loader(
    data: TrainingData, config: HypernetTrainConfig, train_names: list[str], accelerator: Accelerator, start_step: int
) -> torch.utils.data.DataLoader:
    """This process's micro-batches from `start_step` on, read ahead by `dataloader_workers` processes (0: by this
    one, as they are needed), into pinned memory on a GPU."""
    first = start_step * config.accumulation_steps
    batches = MicroBatches(data, config, train_names, accelerator.process_index, accelerator.num_processes, first)
    workers = config.dataloader_workers
    return torch.utils.data.DataLoader(
        batches,
        batch_size=None,  # each item is already a batch
        num_workers=workers,
        pin_memory=accelerator.device.type == "cuda",
        prefetch_factor=4 if workers else None,
        generator=torch.Generator().manual_seed(config.seed),  # its workers' seeds: not from the process's generator
    )


def training_data(
    images: TrainingImages,
    weights_dir: str | Path | None,
    pipe: Pipeline,
    lidb: LiDB,
    instance_token: str,
    resolution: int,
    encoder_size: int,
    faces_dir: Path | None,
    progress: bool,
) -> TrainingData:
    """A training cache, checked to fit this run; or photos aligned and encoded here, with their stage 1 weights,
    into the same tensors in memory (every process makes them all: for small runs)."""
    if isinstance(images, TrainingData):
        images.check(pipe, lidb, resolution, encoder_size)
        return images
    identities, skipped = resolve_identities(images, crop_size(resolution), faces_dir, progress)
    names = [i.name for i in identities]
    targets = load_weights_dataset(weights_dir, lidb, names) if weights_dir is not None else {}
    source = images.path if isinstance(images, DatasetSource) else images
    source = str(source) if isinstance(source, (str, Path)) else "identities given in Python"
    return TrainingData.in_memory(
        pipe, lidb, instance_token, identities, targets, resolution, encoder_size, source, dict(skipped)
    )


def train_hypernetwork(
    base: str | Path | Pipeline,
    images: TrainingImages,
    out_dir: str | Path,
    weights_dir: str | Path | None = None,
    config: HypernetTrainConfig | None = None,
    device: str = "auto",
) -> dict:
    """Train (or resume training) a hypernetwork; writes out_dir/hypernet, checkpoints and TensorBoard logs.

    `base`: hub id or directory, or a pipeline already loaded; `images`: a training cache (`TrainingData.open`,
    which holds the pre-optimised weights too), or a folder, a dataset or prepared `Identity`s with `weights_dir`,
    the folder stage 1 wrote.
    """
    # the options, checked before any work
    config = config or HypernetTrainConfig()
    out = Path(out_dir)
    accelerator = _accelerator(config, out, device)
    cached = _check_sources(config, images, weights_dir)
    check_shared_folder(accelerator, out)  # every process resumes from out/checkpoints/latest
    manifest = images.manifest() if cached else read_manifest(weights_dir) if weights_dir is not None else None
    lidb_config, instance_token = _settings(config, manifest)

    # the base model, and the identities' latents, encoder crops and targets; the first `holdout` are held out
    dtype = MIXED_PRECISIONS[config.mixed_precision]
    pipe = load_pipeline(str(base), dtype, str(accelerator.device)) if isinstance(base, (str, Path)) else base
    resolution = config.resolution or native_resolution(pipe)
    with (
        LiDB.attached(pipe, lidb_config) as lidb,
        training_stage(pipe, lidb, "training the hypernetwork", MEMORY_OPTIONS, config.gradient_checkpointing),
    ):
        if manifest is not None:
            check_manifest(manifest, lidb, "the training cache" if cached else weights_dir)
        main = accelerator.is_main_process
        data = training_data(
            images, weights_dir, pipe, lidb, instance_token, resolution, encoder_image_size(config.image_encoder),
            out / "faces" if main else None, config.progress and main,
        )  # fmt: skip
        held_out, train_names = _held_out_and_trained(data, config.holdout)

        # the hypernetwork and its optimizer, fresh or from the latest checkpoint, if that was made with these settings
        settings = checkpoints.run_settings(config, lidb_config, instance_token, resolution, train_names, held_out)
        run, start_step = _set_up_run(
            config, settings, out, accelerator, pipe, lidb, instance_token, data, train_names, held_out
        )
        start_log(run, start_step)

        # train: the loop calls back after each step to log, validate, sample and checkpoint
        result = train(
            run.parameters,
            lambda micro: micro_batch_loss(run, micro),
            run.train_config,
            lambda step, loss: after_step(run, step, loss),
            optimizer=run.optimizer,
            accelerator=accelerator,
            start_step=start_step,
            model=run.model,
        )

        # the trained hypernetwork, written once
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            save_hypernetwork(run)
        accelerator.end_training()
    return {
        "main_process": accelerator.is_main_process,
        "start_step": start_step,
        "losses": result.losses,
        "skipped_steps": result.skipped_steps,  # fp16 overflows the loss scaler skipped
        "validation": run.validation,
        "identities": len(run.train_names),
        "held_out": run.held_out,
        "skipped_photos": data.skipped_photos,
        "processes": accelerator.num_processes,
    }


def _held_out_and_trained(data: TrainingData, holdout: int) -> tuple[list[str], list[str]]:
    """The first `holdout` identities, held out for validation, and those trained on: the rest, but those without
    pre-optimised weights where there are any (they cannot take the weight loss)."""
    if len(data.names) <= holdout:
        raise HdbError(
            f"Need more than {holdout} usable identities "
            f"(found {len(data.names)}; {data.skipped_photos} photos skipped)"
        )
    targets = data.with_target
    return data.names[:holdout], [name for name in data.names[holdout:] if not targets or name in targets]


def _accelerator(config: HypernetTrainConfig, out: Path, device: str) -> Accelerator:
    """The run's accelerate Accelerator (one process, or one of those `accelerate launch` started)."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    check_choice("pairing", config.pairing, PAIRINGS)  # before any work, not at the first step
    accelerator = Accelerator(
        mixed_precision=config.mixed_precision,
        log_with=None if config.report_to == "none" else config.report_to,
        project_dir=str(out),
        cpu=device == "cpu",
        # every process waits at the first collective while the others set up: give it long enough
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=PROCESS_GROUP_TIMEOUT_S))],
    )
    if config.batch_size % accelerator.num_processes:
        raise HdbError(
            f"`batch_size={config.batch_size}` must be a multiple of the {accelerator.num_processes} processes"
        )
    return accelerator


def _check_sources(config: HypernetTrainConfig, images: TrainingImages, weights_dir: str | Path | None) -> bool:
    """Refuse sources that do not go together; returns whether `images` is a training cache."""
    cached = isinstance(images, TrainingData)
    if cached and weights_dir is not None:
        raise HdbError("A training cache holds the pre-optimised weights: leave out `weights_dir`")
    if config.beta > 0 and weights_dir is None and not cached:
        raise HdbError(
            "`beta` > 0 needs pre-optimised weights: `weights_dir`, the folder stage 1 (preoptimize) wrote; "
            "or set `beta=0`"
        )
    return cached


def _trainables(
    config: HypernetTrainConfig, lidb: LiDB, resume: Path | None, device: torch.device
) -> tuple[HyperNetwork, list[torch.nn.Parameter], torch.optim.Optimizer, object | None]:
    """The hypernetwork, what of it trains, its optimizer and (with `ema_decay`) the moving average of its weights:
    fresh, or as the checkpoint `resume` left them."""
    hypernet = _build_hypernet(config, lidb, resume).to(device)
    if config.freeze_encoder:  # saved and loaded with the rest all the same; only the optimizer skips it
        hypernet.image_encoder.requires_grad_(False)
    parameters = [p for p in hypernet.parameters() if p.requires_grad]
    optimizer = make_optimizer(parameters, config.optimizer, config.learning_rate)
    if resume is not None:
        load_optimizer(optimizer, resume / "optimizer.safetensors")
    ema = None
    if config.ema_decay:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(parameters, decay=config.ema_decay)
        if resume is not None:
            checkpoints.load_ema(ema, resume / checkpoints.EMA_FILE)
    return hypernet, parameters, optimizer, ema


def _set_up_run(
    config: HypernetTrainConfig,
    settings: dict[str, object],
    out: Path,
    accelerator: Accelerator,
    pipe: Pipeline,
    lidb: LiDB,
    instance_token: str,
    data: TrainingData,
    train_names: list[str],
    held_out: list[str],
) -> tuple[Run, int]:
    """Everything the steps use, in one place, and the step to start from: the hypernetwork and its optimizer fresh,
    or from the latest checkpoint if that was made with these `settings` (`checkpoints.run_settings`)."""
    resume, start_step = checkpoints.resume_point(out, settings)
    hypernet, parameters, optimizer, ema = _trainables(config, lidb, resume, accelerator.device)
    model, optimizer = accelerator.prepare(hypernet, optimizer)
    run = Run(
        config=config,
        train_config=TrainConfig.of_stage(config, "training the hypernetwork"),
        out=out,
        accelerator=accelerator,
        pipe=pipe,
        lidb=lidb,
        instance_token=instance_token,
        model=model,
        parameters=parameters,
        ema=ema,
        optimizer=optimizer,
        noise_schedule=training_scheduler(pipe),
        settings=settings,
        prompt_tokens=tokenize_prompts(pipe, [instance_prompt_for(instance_token)]),
        data=data,
        normalise=hypernet.normalise,
        train_names=train_names,
        held_out=held_out,
        micro_batches=iter(micro_batch_loader(data, config, train_names, accelerator, start_step)),
    )
    return run, start_step

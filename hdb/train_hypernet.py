"""Stage 2: train the hypernetwork to predict a LiDB from a face photo.

    loss = alpha * diffusion loss of the predicted weights on the identity's photos
         + beta  * ||predicted - pre-optimised weights||^2        (beta = 0 needs no stage 1)

The predicted weights of each batch element go through LiDB's per-sample path, so the diffusion
loss reaches every hypernetwork parameter. Runs unchanged on one process or under
`accelerate launch` (DDP): each process takes its slice of the same global batch, drawn from
(seed, step), so several processes compute what one would, and a resumed run continues exactly.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from hdb.diffusion import diffusion_loss, encode_prompts
from hdb.errors import HdbError
from hdb.faces import crop_size
from hdb.identities import Identity, encode_identities, resolve_identities
from hdb.lidb import LiDB, LiDBConfig, text_encoders
from hdb.models import load_pipeline, training_scheduler
from hdb.personal_file import DEFAULT_INSTANCE_TOKEN, instance_prompt_for
from hdb.personalize import native_resolution
from hdb.training import TrainConfig, freeze, load_optimizer, make_optimizer, save_optimizer, train


@dataclass
class HypernetTrainConfig:
    steps: int = 1000
    batch_size: int = 4  # global: split across processes
    learning_rate: float = 1e-4
    alpha: float = 1.0  # diffusion loss weight
    beta: float = 1.0  # weight-space L2 to the pre-optimised weights (0: diffusion loss alone)
    accumulation_steps: int = 1
    optimizer: str = "adamw"
    mixed_precision: str = "no"  # "no", "fp16" or "bf16" (accelerate autocast)
    gradient_checkpointing: bool = False
    checkpoint_every: int = 100
    validate_every: int = 100
    holdout: int = 1  # identities kept out of training for validation
    sample_steps: int = 20  # sampling steps of the validation image (0: no image)
    seed: int = 0
    image_encoder: str = "tiny"  # hub id / local path of a vision model, or "tiny" (random, for tests)
    width: int = 512
    depth: int = 4
    heads: int = 8
    iterations: int = 4
    resolution: int | None = None
    instance_token: str = DEFAULT_INSTANCE_TOKEN
    progress: bool = True


def _latest_checkpoint(out: Path) -> Path | None:
    pointer = out / "checkpoints" / "latest"
    return out / "checkpoints" / pointer.read_text().strip() if pointer.is_file() else None


def _save_checkpoint(out: Path, step: int, hypernet, optimizer) -> None:
    """Write checkpoint-<step> fully, then point `latest` at it: a kill never leaves a half checkpoint in use."""
    folder = out / "checkpoints"
    target, partial = folder / f"checkpoint-{step}", folder / f"checkpoint-{step}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    hypernet.save_pretrained(partial / "hypernet")
    save_optimizer(optimizer, partial / "optimizer.safetensors")
    (partial / "state.json").write_text(json.dumps({"step": step}))
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)
    (folder / "latest.tmp").write_text(target.name)
    (folder / "latest.tmp").replace(folder / "latest")
    for old in folder.glob("checkpoint-*"):  # keep the newest only
        if old != target:
            shutil.rmtree(old, ignore_errors=True)


def _build_hypernet(config: HypernetTrainConfig, lidb: LiDB, resume: Path | None):
    from hdb.hypernet import HyperNetwork, build_tiny_image_encoder, load_image_encoder

    if resume is not None:
        return HyperNetwork.from_pretrained(resume / "hypernet", lidb=lidb)
    torch.manual_seed(config.seed)
    encoder = (
        build_tiny_image_encoder(config.seed)
        if config.image_encoder == "tiny"
        else load_image_encoder(config.image_encoder)
    )
    return HyperNetwork.for_lidb(
        lidb,
        encoder,
        config.image_encoder,
        width=config.width,
        depth=config.depth,
        heads=config.heads,
        iterations=config.iterations,
    )


def train_hypernetwork(
    base,
    images: str | Path | list[Identity],
    out_dir: str | Path,
    weights_dir: str | Path | None = None,
    config: HypernetTrainConfig = HypernetTrainConfig(),
    device: str = "auto",
) -> dict:
    """Train (or resume training) a hypernetwork; writes out_dir/hypernet, checkpoints and TensorBoard logs.

    `base`: hub id or directory, or a pipeline already loaded; `images`: a folder or prepared `Identity`s.
    """
    from accelerate import Accelerator

    from hdb.preoptimize import load_weights_dataset

    out = Path(out_dir)
    accelerator = Accelerator(
        mixed_precision=config.mixed_precision, log_with="tensorboard", project_dir=str(out), cpu=device == "cpu"
    )
    if config.batch_size % accelerator.num_processes:
        raise HdbError(
            f"--batch-size {config.batch_size} must be a multiple of the {accelerator.num_processes} processes"
        )
    if config.beta > 0 and weights_dir is None:
        raise HdbError(
            "--beta > 0 needs pre-optimised weights (--weights DIR from `python -m hdb preoptimize`); or pass --beta 0"
        )
    base_dtype = {"no": "fp32", "fp16": "fp16", "bf16": "bf16"}[config.mixed_precision]  # the frozen base's weights
    pipe = load_pipeline(base, base_dtype, str(accelerator.device)) if isinstance(base, (str, Path)) else base
    resolution = config.resolution or native_resolution(pipe)
    identities, skipped = resolve_identities(
        images,
        crop_size(resolution),
        out / "faces" if accelerator.is_main_process else None,
        config.progress and accelerator.is_main_process,
    )
    if len(identities) <= config.holdout:
        raise HdbError(
            f"Need more than {config.holdout} usable identities (found {len(identities)}; {dict(skipped)} photos skipped)"
        )
    latents = encode_identities(pipe, identities, resolution)
    held_ids, held_latents = identities[: config.holdout], latents[: config.holdout]
    lidb = LiDB(pipe, LiDBConfig())
    targets = load_weights_dataset(weights_dir, lidb, [i.name for i in identities]) if weights_dir is not None else {}
    # identities without pre-optimised weights cannot take the weight loss: leave them out of training
    train_pairs = [
        (i, l)
        for i, l in zip(identities[config.holdout :], latents[config.holdout :])
        if not targets or i.name in targets
    ]
    train_ids, train_latents = [i for i, _ in train_pairs], [l for _, l in train_pairs]
    resume = _latest_checkpoint(out)
    hypernet = _build_hypernet(config, lidb, resume).to(accelerator.device)
    start_step = json.loads((resume / "state.json").read_text())["step"] + 1 if resume is not None else 0

    freeze(pipe.unet, pipe.vae, *text_encoders(pipe).values())
    if config.gradient_checkpointing:
        pipe.unet.enable_gradient_checkpointing()
    pipe.unet.train()
    parameters = [p for p in hypernet.parameters() if p.requires_grad]
    optimizer = make_optimizer(parameters, config.optimizer, config.learning_rate)
    if resume is not None:
        load_optimizer(optimizer, resume / "optimizer.safetensors")
    model, optimizer = accelerator.prepare(hypernet, optimizer)
    scheduler = training_scheduler(pipe)
    prompt = instance_prompt_for(config.instance_token)
    pixels = {i.name: hypernet.preprocess(i.faces) for i in identities}  # [photos, 3, S, S] per identity
    rank, count = accelerator.process_index, config.batch_size // accelerator.num_processes

    def batch_loss(names, views, step_seed: int, predict) -> torch.Tensor:
        generator = torch.Generator().manual_seed(step_seed)
        photo = [pixels[n][(step_seed + k) % len(pixels[n])] for k, n in enumerate(names)]
        batch = torch.stack([v[(step_seed + k) % len(v)] for k, v in enumerate(views)])
        noise = torch.randn(batch.shape, generator=generator)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(names),), generator=generator)
        mine = slice(rank * count, (rank + 1) * count) if len(names) == config.batch_size else slice(None)
        A, B = predict(torch.stack(photo[mine]))
        lidb.use_per_sample(A, B)
        with accelerator.autocast():
            loss = (
                config.alpha
                * diffusion_loss(
                    pipe,
                    scheduler,
                    batch[mine],
                    encode_prompts(pipe, [prompt] * A.shape[0]),
                    noise[mine].to(batch.device),
                    timesteps[mine].to(batch.device),
                ).mean()
            )
        if config.beta > 0 and all(n in targets for n in names):
            target_A = torch.stack([targets[n][0] for n in names])[mine].to(A.device)
            target_B = torch.stack([targets[n][1] for n in names])[mine].to(A.device)
            loss = loss + config.beta * (
                torch.nn.functional.mse_loss(A.float(), target_A) + torch.nn.functional.mse_loss(B.float(), target_B)
            )
        return loss

    def loss_fn(micro: int) -> torch.Tensor:
        seed = config.seed * 1_000_003 + micro
        order = torch.randint(
            0, len(train_ids), (config.batch_size,), generator=torch.Generator().manual_seed(seed)
        ).tolist()
        return batch_loss([train_ids[k].name for k in order], [train_latents[k] for k in order], seed, model)

    @torch.no_grad()
    def validate(step: int) -> float:
        model.eval()
        loss = batch_loss(
            [i.name for i in held_ids], held_latents, 10**9, model
        ).item()  # fixed draws: comparable over time
        model.train()
        return loss

    @torch.no_grad()
    def sample(step: int) -> None:
        """What the predicted weights draw for the first held-out face: saved and logged to TensorBoard."""
        from hdb.generate import generate

        A, B = accelerator.unwrap_model(model).predict(held_ids[0].faces[0])
        lidb.start_from(A, B)
        pipe.unet.eval()
        image = generate(pipe, lidb, f"a portrait of {config.instance_token}", steps=config.sample_steps, seed=0)[0]
        pipe.unet.train()
        (out / "samples").mkdir(exist_ok=True)
        image.save(out / "samples" / f"step-{step:06d}.png")
        writer = accelerator.get_tracker("tensorboard", unwrap=True)
        writer.add_image("validation/sample", np.asarray(image), step, dataformats="HWC")

    log_path = out / "losses.jsonl"
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        accelerator.init_trackers(
            "hdb", config={k: v for k, v in asdict(config).items() if isinstance(v, (int, float, str, bool))}
        )
        kept = (
            [line for line in log_path.read_text().splitlines() if json.loads(line)["step"] < start_step]
            if log_path.is_file()
            else []
        )
        log_path.write_text("".join(line + "\n" for line in kept))  # steps after the checkpoint will be redone

    history: dict = {"validation": []}

    def on_step(step: int, loss: float) -> None:
        record = {"step": step, "loss": loss}
        if (step + 1) % config.validate_every == 0 or step + 1 == config.steps:
            record["validation_loss"] = validate(step)
            history["validation"].append((step, record["validation_loss"]))
        if accelerator.is_main_process:
            if "validation_loss" in record and config.sample_steps:
                sample(step)
            accelerator.log({k: v for k, v in record.items() if k != "step"}, step=step)
            with log_path.open("a") as file:
                file.write(json.dumps(record) + "\n")
        if (step + 1) % config.checkpoint_every == 0 or step + 1 == config.steps:
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:  # written once, whatever the number of processes
                _save_checkpoint(out, step, accelerator.unwrap_model(model), optimizer)
            accelerator.wait_for_everyone()

    train_config = TrainConfig(
        steps=config.steps,
        learning_rate=config.learning_rate,
        optimizer=config.optimizer,
        accumulation_steps=config.accumulation_steps,
        progress=config.progress,
        description="training the hypernetwork",
    )
    losses = train(
        parameters, loss_fn, train_config, on_step, optimizer=optimizer, accelerator=accelerator, start_step=start_step
    )
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        accelerator.unwrap_model(model).save_pretrained(out / "hypernet")
    accelerator.end_training()
    lidb.detach()
    pipe.unet.eval()
    return {
        "main_process": accelerator.is_main_process,
        "start_step": start_step,
        "losses": losses,
        "validation": history["validation"],
        "identities": len(train_ids),
        "held_out": [i.name for i in held_ids],
        "skipped_photos": dict(skipped),
        "processes": accelerator.num_processes,
    }

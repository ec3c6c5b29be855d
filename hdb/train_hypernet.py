"""Stage 2: train the hypernetwork to predict a LiDB from a face photo.

    loss = alpha * diffusion loss of the predicted weights on the identity's photos
         + beta  * ||predicted dW - pre-optimised dW||^2 / ||pre-optimised dW||^2   (beta = 0 needs no stage 1)

The weight term compares each layer's dense update, not the raw factors (`hdb.lidb.weight_distance`):
factors of the same update can differ, and the normalisation makes beta free of the weights' scale.

The predicted weights of each batch element go through LiDB's per-sample path, so the diffusion
loss reaches every hypernetwork parameter. Runs unchanged on one process or under
`accelerate launch` (DDP): each process takes its slice of the same global batch, drawn from
(seed, step), and each sample's noise from its own seed, so several processes compute what one would,
and a resumed run continues exactly.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from hdb.config import (
    DEFAULT_INSTANCE_TOKEN,
    MIXED_PRECISIONS,
    PAIRINGS,
    DatasetSource,
    HypernetTrainConfig,
    LiDBConfig,
    instance_prompt_for,
)
from hdb.diffusion import sample_seed, step_loss, tokenize_prompts
from hdb.errors import HdbError, check_choice
from hdb.faces import crop_size
from hdb.files import write_atomically
from hdb.hypernet import TRAINING_FILE, HyperNetwork, build_tiny_image_encoder, load_image_encoder
from hdb.identities import (
    Identity,
    WeightsManifest,
    check_manifest,
    encode_identities,
    load_weights_dataset,
    read_manifest,
    resolve_identities,
)
from hdb.lidb import LiDB, weight_distance
from hdb.models import Pipeline, load_pipeline, native_resolution, training_scheduler
from hdb.stage import training_stage
from hdb.training import TrainConfig, learning_rate_factor, load_optimizer, make_optimizer, save_optimizer, train

MEMORY_OPTIONS = (
    "a smaller --batch-size with --accumulation-steps, --gradient-checkpointing, --mixed-precision fp16 or bf16, "
    "--optimizer adamw8bit"
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


def _latest_checkpoint(out: Path) -> Path | None:
    pointer = out / "checkpoints" / "latest"
    return out / "checkpoints" / pointer.read_text().strip() if pointer.is_file() else None


def _save_checkpoint(out: Path, step: int, hypernet: HyperNetwork, optimizer: torch.optim.Optimizer) -> None:
    """Write checkpoint-<step> whole, then point `latest` at it: a kill never leaves a half checkpoint in use."""
    folder = out / "checkpoints"
    target = folder / f"checkpoint-{step}"

    def write_checkpoint(partial: Path) -> None:
        hypernet.save_pretrained(partial / "hypernet")
        save_optimizer(optimizer, partial / "optimizer.safetensors")
        (partial / "state.json").write_text(json.dumps({"step": step}))

    write_atomically(target, write_checkpoint)
    write_atomically(folder / "latest", lambda partial: partial.write_text(target.name))
    for old in folder.glob("checkpoint-*"):  # keep the newest only
        if old != target:
            shutil.rmtree(old, ignore_errors=True)


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
    base: str | Path | Pipeline,
    images: str | Path | list[Identity] | DatasetSource,
    out_dir: str | Path,
    weights_dir: str | Path | None = None,
    config: HypernetTrainConfig | None = None,
    device: str = "auto",
) -> dict:
    """Train (or resume training) a hypernetwork; writes out_dir/hypernet, checkpoints and TensorBoard logs.

    `base`: hub id or directory, or a pipeline already loaded; `images`: a folder, a dataset or prepared
    `Identity`s.
    """
    from accelerate import Accelerator

    config = config or HypernetTrainConfig()
    check_choice("pairing", config.pairing, PAIRINGS)  # before any work, not at the first step
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
    manifest = read_manifest(weights_dir) if weights_dir is not None else None
    lidb_config, instance_token = _settings(config, manifest)
    if isinstance(base, (str, Path)):
        pipe = load_pipeline(str(base), MIXED_PRECISIONS[config.mixed_precision], str(accelerator.device))
    else:
        pipe = base
    resolution = config.resolution or native_resolution(pipe)
    identities, skipped = resolve_identities(
        images,
        crop_size(resolution),
        out / "faces" if accelerator.is_main_process else None,
        config.progress and accelerator.is_main_process,
    )
    if len(identities) <= config.holdout:
        raise HdbError(
            f"Need more than {config.holdout} usable identities "
            f"(found {len(identities)}; {dict(skipped)} photos skipped)"
        )
    latents = encode_identities(pipe, identities, resolution)
    held_ids, held_latents = identities[: config.holdout], latents[: config.holdout]
    lidb = LiDB(pipe, lidb_config)
    with training_stage(
        pipe, lidb, "training the hypernetwork", MEMORY_OPTIONS, config.gradient_checkpointing, detach_after=True
    ):
        if manifest is not None:
            check_manifest(manifest, lidb, weights_dir)
        targets = (
            load_weights_dataset(weights_dir, lidb, [i.name for i in identities]) if weights_dir is not None else {}
        )
        # identities without pre-optimised weights cannot take the weight loss: leave them out of training
        train_pairs = [
            (identity, views)
            for identity, views in zip(identities[config.holdout :], latents[config.holdout :], strict=True)
            if not targets or identity.name in targets
        ]
        train_ids, train_latents = [i for i, _ in train_pairs], [views for _, views in train_pairs]
        resume = _latest_checkpoint(out)
        hypernet = _build_hypernet(config, lidb, resume).to(accelerator.device)
        if config.freeze_encoder:  # saved and loaded with the rest all the same; only the optimizer skips it
            hypernet.image_encoder.requires_grad_(False)
        start_step = json.loads((resume / "state.json").read_text())["step"] + 1 if resume is not None else 0

        parameters = [p for p in hypernet.parameters() if p.requires_grad]
        optimizer = make_optimizer(parameters, config.optimizer, config.learning_rate)
        if resume is not None:
            load_optimizer(optimizer, resume / "optimizer.safetensors")
        model, optimizer = accelerator.prepare(hypernet, optimizer)
        scheduler = training_scheduler(pipe)
        prompt_tokens = tokenize_prompts(pipe, [instance_prompt_for(instance_token)])
        pixels = {i.name: hypernet.preprocess(i.faces) for i in identities}  # [photos, 3, S, S] per identity
        rank, count = accelerator.process_index, config.batch_size // accelerator.num_processes

        def batch_loss(
            names: list[str], views: list[torch.Tensor], draw: int | str
        ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            """The loss of this process's slice of one global batch, and its terms apart (detached);
            `draw` (a micro-batch) fixes its randomness."""
            mine = range(rank * count, (rank + 1) * count) if len(names) == config.batch_size else range(len(names))
            # one seed per slot of the global batch, the same in every process: it picks the slot's input photo
            # and target view, and draws its noise
            pick = [sample_seed(config.seed, draw, k) for k in mine]
            pairs = [
                pair_photo_and_view(p, len(pixels[names[k]]), len(views[k]), config.pairing)
                for k, p in zip(mine, pick, strict=True)
            ]
            photos = torch.stack([pixels[names[k]][photo] for k, (photo, _) in zip(mine, pairs, strict=True)])
            batch = torch.stack([views[k][view] for k, (_, view) in zip(mine, pairs, strict=True)])
            A, B = model(photos)
            lidb.use_per_sample(A, B)
            with accelerator.autocast():
                diffusion = step_loss(pipe, scheduler, batch, prompt_tokens, pick).mean()
            terms = {"diffusion_loss": diffusion.detach()}
            loss = config.alpha * diffusion
            if config.beta > 0 and all(n in targets for n in names):
                target_A = torch.stack([targets[names[k]][0] for k in mine]).to(A.device)
                target_B = torch.stack([targets[names[k]][1] for k in mine]).to(A.device)
                weight = weight_distance(A, B, target_A, target_B).mean()
                terms["weight_loss"] = weight.detach()
                loss = loss + config.beta * weight
            return loss, terms

        # each step's loss terms (this process's micro-batches), kept until the step is logged: the loop
        # reads a step's loss one step late, after the next step's micro-batches already ran
        step_terms: dict[int, dict[str, list[torch.Tensor]]] = {}

        def loss_fn(micro: int) -> torch.Tensor:
            generator = torch.Generator().manual_seed(sample_seed(config.seed, "batch", micro))
            order = torch.randint(0, len(train_ids), (config.batch_size,), generator=generator).tolist()
            loss, terms = batch_loss([train_ids[k].name for k in order], [train_latents[k] for k in order], micro)
            for name, value in terms.items():
                step_terms.setdefault(micro // config.accumulation_steps, {}).setdefault(name, []).append(value)
            return loss

        @torch.no_grad()
        def validate(step: int) -> float:
            model.eval()
            loss = batch_loss([i.name for i in held_ids], held_latents, "validation")[0].item()  # comparable over time
            model.train()
            return loss

        @torch.no_grad()
        def sample(step: int) -> None:
            """What the predicted weights draw for the first held-out face: saved and logged to TensorBoard."""
            from hdb.generate import generate

            A, B = accelerator.unwrap_model(model).predict(held_ids[0].faces[0])
            lidb.start_from(A, B)
            pipe.unet.eval()
            image = generate(pipe, lidb, f"a portrait of a {instance_token}", steps=config.sample_steps, seed=0)[0]
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
            terms = step_terms.pop(step, {})  # the two terms apart, to see which one moves
            record = {
                "step": step,
                "loss": loss,
                **{k: torch.stack(v).mean().item() for k, v in terms.items()},
                "learning_rate": config.learning_rate * learning_rate_factor(step, train_config),
            }
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
            warmup_steps=config.warmup_steps,
            lr_schedule=config.lr_schedule,
            progress=config.progress,
            description="training the hypernetwork",
        )
        result = train(
            parameters,
            loss_fn,
            train_config,
            on_step,
            optimizer=optimizer,
            accelerator=accelerator,
            start_step=start_step,
        )
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            accelerator.unwrap_model(model).save_pretrained(out / "hypernet")
            training = {  # what the model card (hdb.hub) says about how it was trained
                "config": {
                    **{k: v for k, v in asdict(config).items() if k != "progress"},
                    "lidb": asdict(lidb_config),  # what was trained with, read from the manifest or defaulted
                    "instance_token": instance_token,
                },
                "steps_run": config.steps,
                "identities": len(train_ids),
                "held_out": [i.name for i in held_ids],
                "images": str(images)
                if isinstance(images, (str, Path, DatasetSource))
                else "identities given in Python",
                "processes": accelerator.num_processes,
                "final_validation_loss": history["validation"][-1][1] if history["validation"] else None,
            }
            (out / "hypernet" / TRAINING_FILE).write_text(json.dumps(training, indent=1))
        accelerator.end_training()
    return {
        "main_process": accelerator.is_main_process,
        "start_step": start_step,
        "losses": result.losses,
        "skipped_steps": result.skipped_steps,  # fp16 overflows the loss scaler skipped
        "validation": history["validation"],
        "identities": len(train_ids),
        "held_out": [i.name for i in held_ids],
        "skipped_photos": dict(skipped),
        "processes": accelerator.num_processes,
    }

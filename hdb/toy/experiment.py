"""The toy experiment: the paper's Table 3 in miniature, on a CPU in minutes (`python -m hdb toy`).

    random identities (colours, proportions, hair, glasses, beard), jittered renders at 64 px
    -> pre-train the tiny base UNet on renders of many people ("a photo of a person")
    -> stage 1: pre-optimise a LiDB per training identity        (hdb.preoptimize)
    -> stage 2: train the hypernetwork on the training identities (hdb.train_hypernet)
    -> held-out identities, personalised from ONE render each    (hdb.personalize)
    -> diffusion loss on OTHER renders of the same person, fixed noise and timesteps for every method

Every training stage goes through `hdb.training.train` and `hdb.stage.training_stage`, as the real
model does. The numbers are small-scale evidence that the pipeline learns, not a claim about SD1.5.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from hdb.config import DEFAULT_INSTANCE_PROMPT, HypernetTrainConfig, PersonalizeConfig, PreoptimizeConfig
from hdb.diffusion import diffusion_loss, encode_images, encode_prompts, sample_seed, step_loss, to_pixels
from hdb.faces import AlignedFace
from hdb.hypernet import HyperNetwork
from hdb.identities import Identity, load_weights_dataset
from hdb.lidb import LiDB
from hdb.models import Pipeline, build_tiny_pipeline, training_scheduler
from hdb.personalize import personalize
from hdb.preoptimize import preoptimize
from hdb.stage import training_stage
from hdb.toy.report import plot_losses, renders_sheet, results_table
from hdb.toy.world import JITTER, Person, sample_people
from hdb.train_hypernet import train_hypernetwork
from hdb.training import TrainConfig, TrainingDiverged, train

GENERIC_PROMPT = "a photo of a person"
T = TypeVar("T")


@dataclass
class ToyConfig:
    # base model: pre-trained on renders of people who appear nowhere else
    pretrain_identities: int = 600
    pretrain_renders: int = 4
    pretrain_steps: int = 1000
    pretrain_batch: int = 16
    pretrain_lr: float = 1e-3
    # stages 1 and 2: training identities, a few renders each
    train_identities: int = 200
    train_renders: int = 3
    preopt_steps: int = 150  # per identity
    preopt_group: int = 8  # identities trained together
    preopt_lr: float = 5e-3
    hyper_steps: int = 2000
    hyper_batch: int = 8
    hyper_lr: float = 3e-4
    hyper_alpha: float = 1.0  # diffusion loss weight
    hyper_beta: float = 100.0  # weight-space loss weight (its MSE is ~1e-2, the diffusion loss ~0.2)
    hyper_width: int = 128
    hyper_depth: int = 2
    hyper_heads: int = 4
    iterations: int = 4  # the hypernetwork's refinement iterations s
    compare_s1: bool = True  # also train a hypernetwork with s=1 (the paper's ablation)
    # held out from both stages: personalised from one render, scored on others
    test_identities: int = 12
    eval_renders: int = 4
    eval_draws: int = 16  # noise/timestep draws per eval render
    finetune_steps: int = 40
    finetune_lr: float = 1e-3  # personalize's default
    long_finetune_steps: int = 200  # zero init with the steps personalize gives it by default (0: skip)
    upper_bound_renders: int = 8  # a LiDB pre-optimised on this many OTHER renders of the person (0: skip)


QUICK = ToyConfig(
    pretrain_identities=150,
    pretrain_steps=240,
    train_identities=96,
    preopt_steps=80,
    hyper_steps=300,
    test_identities=8,
    eval_renders=3,
    eval_draws=12,
    long_finetune_steps=0,
    compare_s1=False,
    upper_bound_renders=0,
)


def _encode(pipe: Pipeline, images: list[Image.Image], chunk: int = 64) -> torch.Tensor:
    return torch.cat(
        [encode_images(pipe, to_pixels(images[i : i + chunk])) for i in range(0, len(images), chunk)]
    ).float()


def calibrate_latents(pipe: Pipeline, images: list[Image.Image]) -> tuple[torch.Tensor, float]:
    """Set the VAE's scaling factor so latents have unit standard deviation (SD's recipe for 0.18215).

    The tiny VAE is random: with SD's factor its latents have std ~0.04, so at almost every timestep
    the noisy latent is pure noise and the loss could not tell one person from another.
    """
    latents = _encode(pipe, images)
    std = latents.std().item()
    factor = pipe.vae.config.scaling_factor / std
    pipe.vae.register_to_config(scaling_factor=factor)
    return latents / std, factor


def pretrain_base(
    pipe: Pipeline, latents: torch.Tensor, config: ToyConfig, seed: int, progress: bool = True
) -> list[float]:
    """Train every UNet weight on renders of many people with one generic prompt (text encoder and VAE stay random)."""
    scheduler = training_scheduler(pipe)
    with torch.no_grad():
        cond = encode_prompts(pipe, [GENERIC_PROMPT])  # the text encoder is frozen: encode once

    def loss_fn(step: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(sample_seed(seed, "pretrain batch", step))
        batch = latents[torch.randint(0, len(latents), (config.pretrain_batch,), generator=generator)]
        seeds = [sample_seed(seed, "pretrain", step, k) for k in range(len(batch))]
        return step_loss(pipe, scheduler, batch, cond, seeds).mean()

    # The learning rate, then a tenth of it for the last quarter: the base should be near converged, or
    # any further training (LiDB included) would lower the loss of every person alike.
    cooldown = config.pretrain_steps // 4
    phases = (
        (config.pretrain_lr, 0, config.pretrain_steps - cooldown),
        (config.pretrain_lr / 10, config.pretrain_steps - cooldown, config.pretrain_steps),
    )
    losses = []
    with training_stage(pipe, None, "pre-training the base", "a smaller pretrain_batch"):
        pipe.unet.requires_grad_(True)  # this stage trains the base itself; the scaffold freezes it again after
        for lr, start, end in phases:
            train_config = TrainConfig(
                steps=end,
                learning_rate=lr,
                weight_decay=0.01,
                progress=progress,
                description="pre-training the base UNet",
            )
            losses += train(list(pipe.unet.parameters()), loss_fn, train_config, start_step=start)
    return losses


def as_identities(people: list[Person]) -> list:
    return [Identity(p.identity.name, p.photos) for p in people]


def preoptimize_people(
    pipe: Pipeline, people: list[Person], out_dir: Path, config: ToyConfig, seed: int, progress: bool = True
) -> dict:
    """Stage 1: a LiDB per training identity, `preopt_group` identities at a time (LiDB's per-sample path)."""
    preopt_config = PreoptimizeConfig(
        steps=config.preopt_steps,
        group_size=config.preopt_group,
        learning_rate=config.preopt_lr,
        seed=seed,
        progress=progress,
    )
    return preoptimize(pipe, as_identities(people), out_dir, preopt_config)["losses"]


def _progress(items: Iterable[T], enabled: bool, description: str) -> tqdm[T]:
    return tqdm(items, desc=description, disable=not enabled, leave=False)


@dataclass
class EvalDraws:
    """Fixed noise and timesteps for one held-out person, shared by every method (paired comparisons)."""

    latents: torch.Tensor  # [renders * draws, 4, 8, 8]
    noise: torch.Tensor
    timesteps: torch.Tensor


def eval_draws(pipe: Pipeline, person: Person, draws: int, seed: int) -> EvalDraws:
    generator = torch.Generator().manual_seed(seed)
    latents = _encode(pipe, person.eval_renders).repeat_interleave(draws, dim=0)
    # evenly spaced timesteps with a random phase per render: every noise level counts, as in training
    grid = (torch.arange(draws) + torch.rand(len(person.eval_renders), 1, generator=generator)) * (1000 / draws)
    timesteps = grid.flatten().long().clamp(0, 999)
    return EvalDraws(latents, torch.randn(latents.shape, generator=generator), timesteps)


@torch.no_grad()
def heldout_loss(pipe: Pipeline, lidb: LiDB, draws: EvalDraws, prompt: str) -> float:
    """Diffusion loss of the LiDB's current shared weights on the person's other renders."""
    lidb.use_shared()
    cond = encode_prompts(pipe, [prompt]).expand(len(draws.latents))
    return (
        diffusion_loss(pipe, training_scheduler(pipe), draws.latents, cond, draws.noise, draws.timesteps).mean().item()
    )


def method_labels(config: ToyConfig) -> dict[str, str]:
    labels = {
        "base": "base model (no personalisation)",
        "zero_ft": f"zero init + {config.finetune_steps} steps",
        "zero_ft_long": f"zero init + {config.long_finetune_steps} steps",
        "hyper_s1": "hypernetwork only, trained with s=1",
        "hyper": f"hypernetwork only, s={config.iterations}",
        "hyper_ft": f"hypernetwork + {config.finetune_steps} rank-relaxed steps",
        "hyper_wrong": "control: hypernetwork fed another person's photo",
        "upper_bound": f"upper bound: LiDB pre-optimised on {config.upper_bound_renders} other renders",
    }
    if not config.long_finetune_steps:
        del labels["zero_ft_long"]
    if not config.compare_s1:
        del labels["hyper_s1"]
    if not config.upper_bound_renders:
        del labels["upper_bound"]
    return labels


def evaluate_methods(
    pipe: Pipeline,
    hypernet: HyperNetwork,
    hypernet_s1: HyperNetwork | None,
    upper_bound_dir: Path | None,
    test: list[Person],
    config: ToyConfig,
    seed: int,
    progress: bool = True,
) -> tuple[dict[str, list[float]], dict[str, int]]:
    """Each method's held-out loss per test person, personalised from that person's one photo; and guard stops."""
    lidb = LiDB(pipe, hypernet.lidb_config)
    upper_bound = (
        load_weights_dataset(upper_bound_dir, lidb, [p.identity.name for p in test]) if upper_bound_dir else {}
    )
    scores: dict[str, list[float]] = {name: [] for name in method_labels(config)}
    stops: dict[str, int] = {}
    for net in (hypernet, hypernet_s1):
        if net is not None:
            net.eval()

    def finetune(name: str, face: AlignedFace, net: HyperNetwork | None, steps: int) -> None:
        ft = PersonalizeConfig(steps=steps, learning_rate=config.finetune_lr, seed=seed, progress=False)
        try:
            personalize(pipe, face, net, ft, lidb=lidb)
        except TrainingDiverged:  # the LiDB holds the last good step's weights: score those, and count the stop
            stops[name] = stops.get(name, 0) + 1

    for k, person in enumerate(_progress(test, progress, "personalising held-out people")):
        draws = eval_draws(pipe, person, config.eval_draws, seed * 7919 + k)
        photo, face = person.photos[0], AlignedFace.from_crop(person.photos[0])  # a render is already an aligned crop

        def score(name: str, draws: EvalDraws = draws) -> None:
            scores[name].append(heldout_loss(pipe, lidb, draws, DEFAULT_INSTANCE_PROMPT))

        lidb.start_from(*lidb.initial_weights())  # B = 0: the base model
        score("base")
        other = test[(k + 1) % len(test)].photos[0]
        with torch.no_grad():
            for name, net, image in (
                ("hyper_s1", hypernet_s1, photo),
                ("hyper", hypernet, photo),
                ("hyper_wrong", hypernet, other),
            ):
                if net is not None:
                    lidb.start_from(*net.predict(image))
                    score(name)
        finetune("zero_ft", face, None, config.finetune_steps)
        score("zero_ft")
        if config.long_finetune_steps:
            finetune("zero_ft_long", face, None, config.long_finetune_steps)
            score("zero_ft_long")
        finetune("hyper_ft", face, hypernet, config.finetune_steps)
        score("hyper_ft")
        if upper_bound:
            lidb.start_from(*upper_bound[person.identity.name])
            score("upper_bound")
    lidb.detach()
    return scores, stops


# ----------------------------------------------------------------------------- the whole run


def run_toy(
    out_dir: str | Path = "docs/toy",
    quick: bool = False,
    seed: int = 0,
    config: ToyConfig | None = None,
    progress: bool = True,
) -> dict:
    """Run the experiment end to end; write results.json, results.md, losses.png, renders.jpg to `out_dir`.

    Intermediate files (stage 1 weights, hypernetwork checkpoint, TensorBoard logs) go to out_dir/work,
    which is emptied first: a resumable stage must not pick up a previous run's state.
    """
    config = config or (QUICK if quick else ToyConfig())
    out, started = Path(out_dir), time.perf_counter()
    work = out / "work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    timings: dict[str, float] = {}

    def lap(name: str, since: float) -> float:
        now = time.perf_counter()
        timings[name] = round(now - since, 1)
        if progress:
            print(f"  {name}: {timings[name]:.1f} s", flush=True)
        return now

    # 1. the world: three disjoint populations
    clock = time.perf_counter()
    crowd = sample_people(seed, 0, config.pretrain_identities, config.pretrain_renders, 0, "crowd")
    train_people = sample_people(seed, 1, config.train_identities, config.train_renders, 0, "train")
    test_people = sample_people(
        seed, 2, config.test_identities, 1, config.eval_renders, "test", config.upper_bound_renders
    )
    clock = lap("render", clock)

    # 2. the base model
    pipe = build_tiny_pipeline("sd15", seed)
    pipe.set_progress_bar_config(disable=True)
    latents, factor = calibrate_latents(pipe, [photo for person in crowd for photo in person.photos])
    pretrain_losses = pretrain_base(pipe, latents, config, seed, progress)
    clock = lap("pretrain", clock)

    # 3. stage 1: a LiDB per training identity
    preopt_losses = preoptimize_people(pipe, train_people, work / "preopt", config, seed, progress)
    clock = lap("preoptimize", clock)

    # 4. stage 2: the hypernetwork. The held-out people go first with holdout=len(test): train_hypernetwork
    # never trains on them, only reports its validation loss on their one photo.
    def train_stage2(iterations: int, folder: str) -> tuple[HyperNetwork, dict]:
        hyper_config = HypernetTrainConfig(
            steps=config.hyper_steps,
            batch_size=config.hyper_batch,
            learning_rate=config.hyper_lr,
            alpha=config.hyper_alpha,
            beta=config.hyper_beta,
            holdout=len(test_people),
            seed=seed,
            image_encoder="tiny",
            freeze_encoder=False,  # a random encoder has nothing to keep; the toy's results were made training it
            warmup_steps=0,  # and with a constant learning rate
            lr_schedule="constant",
            width=config.hyper_width,
            depth=config.hyper_depth,
            heads=config.hyper_heads,
            iterations=iterations,
            checkpoint_every=config.hyper_steps,
            validate_every=max(config.hyper_steps // 10, 1),
            progress=progress,
        )
        summary = train_hypernetwork(
            pipe, as_identities(test_people + train_people), work / folder, work / "preopt", hyper_config, device="cpu"
        )
        return HyperNetwork.from_pretrained(work / folder / "hypernet"), summary

    hypernet, summary = train_stage2(config.iterations, "hypernet")
    clock = lap("hypernetwork", clock)
    hypernet_s1 = None
    if config.compare_s1:  # the paper's iterative-refinement ablation: the same training with one iteration
        hypernet_s1, _ = train_stage2(1, "hypernet_s1")
        clock = lap("hypernetwork_s1", clock)

    # 5. held-out people, personalised from one render, scored on their other renders; and what a LiDB
    # learns from many renders of them (stage 1 on their extra renders), the most one LiDB can do
    upper_bound_dir = None
    if config.upper_bound_renders:
        upper_bound_dir = work / "upper_bound"
        upper = [Person(p.identity, p.extra_renders, [], []) for p in test_people]
        preoptimize_people(pipe, upper, upper_bound_dir, config, seed, progress)
    scores, stops = evaluate_methods(pipe, hypernet, hypernet_s1, upper_bound_dir, test_people, config, seed, progress)
    lap("evaluate", clock)
    timings["total"] = round(time.perf_counter() - started, 1)

    results = {
        "seed": seed,
        "quick": quick,
        "config": asdict(config),
        "timings_s": timings,
        "torch_threads": torch.get_num_threads(),
        "latent_scaling_factor": factor,
        "jitter": JITTER,
        "losses": {
            "pretrain": pretrain_losses,
            "preoptimize": preopt_losses,
            "hypernet": summary["losses"],
            "hypernet_validation": summary["validation"],
        },
        "methods": summarise(scores, config),
        "guard_stops": stops,
        "held_out": [p.identity.name for p in test_people],
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(results_table(results))
    plot_losses(results, out / "losses.png")
    renders_sheet(train_people[:4], test_people[:6]).save(out / "renders.jpg", quality=92)
    return results


def summarise(scores: dict[str, list[float]], config: ToyConfig) -> dict:
    """Per method: mean loss, per-person losses, and on how many people it beats base / zero init / the control."""
    base, zero, wrong = (np.array(scores[k]) for k in ("base", "zero_ft", "hyper_wrong"))
    labels = method_labels(config)
    summary = {}
    for name, values in scores.items():
        v = np.array(values)
        summary[name] = {
            "label": labels[name],
            "mean": float(v.mean()),
            "per_person": [float(x) for x in v],
            "vs_base_pct": float(100 * (v.mean() / base.mean() - 1)),
            "beats_base": int((v < base).sum()),
            "beats_zero_ft": int((v < zero).sum()),
            "beats_wrong_photo": int((v < wrong).sum()),
            "people": len(v),
        }
    return summary

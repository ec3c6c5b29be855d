"""The toy experiment: the paper's Table 3 in miniature, on a CPU in minutes (`python -m hdb toy`).

    random identities (colours, proportions, hair, glasses, beard), jittered renders at 64 px
    -> pre-train the tiny base UNet on renders of many people ("a photo of a person")
    -> stage 1: pre-optimise a LiDB per training identity        (hdb.preoptimize)
    -> stage 2: train the hypernetwork on the training identities (hdb.train_hypernet)
    -> held-out identities, personalised from ONE render each    (hdb.personalize)
    -> diffusion loss on OTHER renders of the same person, fixed noise and timesteps for every method
    -> identification: every person's renders under every personalised model (an N x N matrix); is
       the person's own model the one that fits their renders best? (the paper's Table 3 asks a
       face recogniser the same question of generated pictures)

Every training stage goes through `hdb.training.train` and `hdb.stage.training_stage`, as the real
model does. The numbers are small-scale evidence that the pipeline learns, not a claim about SD1.5.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from hdb.config import (
    DEFAULT_INSTANCE_PROMPT,
    RELAX_MODES,
    HypernetTrainConfig,
    PersonalizeConfig,
    PreoptimizeConfig,
)
from hdb.diffusion import diffusion_loss, encode_images, encode_prompts, sample_seed, step_loss, to_pixels
from hdb.errors import HdbError
from hdb.faces import AlignedFace
from hdb.generate import generate
from hdb.hypernet import HyperNetwork
from hdb.identities import Identity, load_weights_dataset
from hdb.lidb import LiDB
from hdb.models import Pipeline, build_tiny_pipeline, training_scheduler
from hdb.pipeline import PersonalPipeline
from hdb.preoptimize import preoptimize
from hdb.stage import training_stage
from hdb.toy.report import image_sheet, plot_losses, renders_sheet, results_table
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
    hyper_alpha: float = HypernetTrainConfig.alpha  # diffusion loss weight
    hyper_beta: float = HypernetTrainConfig.beta  # weight loss weight (normalised: 1 at a zero prediction)
    hyper_width: int = 128
    hyper_depth: int = 2
    hyper_heads: int = 4
    iterations: int = 4  # the hypernetwork's refinement iterations s
    compare_s1: bool = True  # also train a hypernetwork with s=1 (the paper's ablation)
    compare_beta0: bool = True  # also train a hypernetwork on the diffusion loss alone (beta = 0)
    compare_relax: bool = True  # also finetune with the relaxation that is not personalize's default
    # held out from both stages: personalised from one render, scored on others
    test_identities: int = 12
    eval_renders: int = 4
    eval_draws: int = 16  # noise/timestep draws per eval render
    finetune_steps: int = 40
    finetune_lr: float = 1e-3  # personalize's default
    long_finetune_steps: int = 200  # zero init with the steps personalize gives it by default (0: skip)
    sample_steps: int = 25  # sampling steps of the samples sheet
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
    compare_beta0=False,
    compare_relax=False,
    preopt_group=16,  # an identity's weights do not depend on its group (hdb.preoptimize): only faster
    upper_bound_renders=0,
)
SAMPLED_PEOPLE = 2  # held-out people drawn by the base and personalised models for the samples sheet
SAMPLED_METHODS = ("base", "zero_ft", "hyper", "hyper_ft_lora", "hyper_ft_lidb")


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
            losses += train(list(pipe.unet.parameters()), loss_fn, train_config, start_step=start).losses
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
    summary = preoptimize(pipe, as_identities(people), out_dir, preopt_config)
    if summary["failed"]:  # stage 1 carries on past a diverging group; the toy's results need every person
        raise HdbError(f"Pre-optimisation diverged for {', '.join(summary['failed'])}; see {out_dir}/weights")
    return summary["losses"]


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


@dataclass(frozen=True)
class Method:
    """How one row of the table personalises a held-out person."""

    label: str
    hypernet: str | None = None  # which hypernetwork predicts the start ("s", "s1", "beta0"); None: zero
    steps: int = 0  # rank-relaxed finetune steps after the start (0: the start alone)
    relax: str = "lora"  # the zero-init rows: a plain LoRA from zero is ordinary (DreamBooth-)LoRA finetuning
    wrong_photo: bool = False  # the control: the hypernetwork is shown the next person's photo
    upper_bound: bool = False  # a LiDB pre-optimised on many other renders of the person


def toy_methods(config: ToyConfig) -> dict[str, Method]:
    steps, s = config.finetune_steps, config.iterations
    methods = {
        "base": Method("base model (no personalisation)"),
        "zero_ft": Method(f"zero init + {steps} steps", steps=steps),
        "zero_ft_long": Method(f"zero init + {config.long_finetune_steps} steps", steps=config.long_finetune_steps),
        "hyper_s1": Method("hypernetwork only, trained with s=1", "s1"),
        "hyper": Method(f"hypernetwork only, s={s}", "s"),
        "hyper_ft_lora": Method(f"hypernetwork + {steps} steps, plain LoRA on top (paper)", "s", steps, "lora"),
        "hyper_ft_lidb": Method(f"hypernetwork + {steps} steps, relaxed inside LiDB", "s", steps, "lidb"),
        "hyper_beta0": Method("hypernetwork only, trained with beta=0", "beta0"),
        "hyper_beta0_ft_lora": Method(f"beta=0 hypernetwork + {steps} steps, plain LoRA", "beta0", steps, "lora"),
        "hyper_beta0_ft_lidb": Method(f"beta=0 hypernetwork + {steps} steps, inside LiDB", "beta0", steps, "lidb"),
        "hyper_wrong": Method("control: hypernetwork fed another person's photo", "s", wrong_photo=True),
        "upper_bound": Method(
            f"upper bound: LiDB pre-optimised on {config.upper_bound_renders} other renders", upper_bound=True
        ),
    }
    dropped = {
        "zero_ft_long": not config.long_finetune_steps,
        "hyper_s1": not config.compare_s1,
        "hyper_beta0": not config.compare_beta0,
        "hyper_beta0_ft_lora": not config.compare_beta0,
        "hyper_beta0_ft_lidb": not config.compare_beta0,
        "upper_bound": not config.upper_bound_renders,
        **{f"hyper_ft_{mode}": not config.compare_relax for mode in RELAX_MODES if mode != PersonalizeConfig.relax},
    }
    return {name: method for name, method in methods.items() if not dropped.get(name)}


def method_labels(config: ToyConfig) -> dict[str, str]:
    return {name: method.label for name, method in toy_methods(config).items()}


def evaluate_methods(
    pipe: Pipeline,
    hypernets: dict[str, HyperNetwork],
    upper_bound_dir: Path | None,
    test: list[Person],
    config: ToyConfig,
    seed: int,
    progress: bool = True,
) -> tuple[dict[str, list[list[float]]], dict[str, int], list[list[Image.Image]]]:
    """Personalise each held-out person from their one photo by every method, and score the result on the
    other renders of EVERY held-out person: `losses[method][k][j]` is person j's renders under person k's
    model (the diagonal is the person's own score). Also the guard's stops, and the samples sheet's rows."""
    personal = PersonalPipeline(pipe, lidb_config=hypernets["s"].lidb_config)  # each method brings its own start
    lidb = personal.lidb
    upper_bound = (
        load_weights_dataset(upper_bound_dir, lidb, [p.identity.name for p in test]) if upper_bound_dir else {}
    )
    methods = toy_methods(config)
    losses: dict[str, list[list[float]]] = {name: [] for name in methods}
    stops: dict[str, int] = {}
    samples: list[list[Image.Image]] = []
    for net in hypernets.values():
        net.eval()
    draws = [eval_draws(pipe, person, config.eval_draws, seed * 7919 + k) for k, person in enumerate(test)]

    def personalise(name: str, method: Method, person: Person, other: Person) -> None:
        """Put the pipeline in the state `method` leaves for `person`."""
        net = hypernets[method.hypernet] if method.hypernet else None
        photo = (other if method.wrong_photo else person).photos[0]
        with torch.no_grad():
            prediction = net.predict(photo) if net is not None else None
        if method.upper_bound:
            personal.use_weights(*upper_bound[person.identity.name])
        elif method.steps:
            face = AlignedFace.from_crop(person.photos[0])  # a render is already an aligned crop
            ft = PersonalizeConfig(
                steps=method.steps, learning_rate=config.finetune_lr, relax=method.relax, seed=seed, progress=False
            )
            try:
                personal.personalize(face, ft, start=prediction)
            except TrainingDiverged as stop:  # score the last good step's weights, and count the stop
                personal.use(stop.last_good)
                stops[name] = stops.get(name, 0) + 1
        elif prediction is not None:
            personal.use_weights(*prediction)
        else:
            personal.forget()  # B = 0: the base model

    for k, person in enumerate(_progress(test, progress, "personalising held-out people")):
        other = test[(k + 1) % len(test)]
        row = [person.photos[0]]
        for name, method in methods.items():
            personalise(name, method, person, other)
            losses[name].append([heldout_loss(pipe, lidb, d, DEFAULT_INSTANCE_PROMPT) for d in draws])
            if k < SAMPLED_PEOPLE and name in SAMPLED_METHODS:
                row.append(sample_picture(pipe, lidb, seed, config.sample_steps))
        if k < SAMPLED_PEOPLE:
            samples.append(row)
    personal.unload()
    return losses, stops, samples


@torch.no_grad()
def sample_picture(pipe: Pipeline, lidb: LiDB, seed: int, steps: int) -> Image.Image:
    """What the model draws for the instance prompt (no guidance: the toy base never saw an empty prompt)."""
    return generate(pipe, lidb, DEFAULT_INSTANCE_PROMPT, negative_prompt="", guidance=1.0, steps=steps, seed=seed)[0]


# ----------------------------------------------------------------------------- the whole run


def code_version() -> str:
    """The git commit this code is at (with "+changes" when the checkout differs from it), or hdb's version."""
    folder = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=folder, capture_output=True, text=True)
        changed = subprocess.run(["git", "status", "--porcelain", "--", "."], cwd=folder.parent.parent,
                                 capture_output=True, text=True)  # fmt: skip
    except OSError:  # no git
        commit = None
    if commit is None or commit.returncode != 0:
        from hdb import __version__

        return f"hdb {__version__}"
    return commit.stdout.strip() + ("+changes" if changed.stdout.strip() else "")


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
    def train_stage2(iterations: int, beta: float, folder: str) -> tuple[HyperNetwork, dict]:
        hyper_config = HypernetTrainConfig(
            steps=config.hyper_steps,
            batch_size=config.hyper_batch,
            learning_rate=config.hyper_lr,
            alpha=config.hyper_alpha,
            beta=beta,
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

    # the hypernetwork, and the ablations asked for: s=1 (the paper's iteration ablation) and beta=0
    hypernets, summary = {}, {}
    variants = {
        "s": (True, config.iterations, config.hyper_beta),
        "s1": (config.compare_s1, 1, config.hyper_beta),
        "beta0": (config.compare_beta0, config.iterations, 0.0),
    }
    for variant, (wanted, iterations, beta) in variants.items():
        if wanted:
            hypernets[variant], summary[variant] = train_stage2(iterations, beta, f"hypernet_{variant}")
            clock = lap(f"hypernetwork_{variant}", clock)

    # 5. held-out people, personalised from one render, scored on their other renders; and what a LiDB
    # learns from many renders of them (stage 1 on their extra renders), the most one LiDB can do
    upper_bound_dir = None
    if config.upper_bound_renders:
        upper_bound_dir = work / "upper_bound"
        upper = [Person(p.identity, p.extra_renders, [], []) for p in test_people]
        preoptimize_people(pipe, upper, upper_bound_dir, config, seed, progress)
    losses, stops, samples = evaluate_methods(pipe, hypernets, upper_bound_dir, test_people, config, seed, progress)
    lap("evaluate", clock)
    timings["total"] = round(time.perf_counter() - started, 1)

    results = {
        "seed": seed,
        "quick": quick,
        "code": code_version(),  # the figures come from this code, as committed
        "config": asdict(config),
        "timings_s": timings,
        "torch_threads": torch.get_num_threads(),
        "latent_scaling_factor": factor,
        "jitter": JITTER,
        "losses": {
            "pretrain": pretrain_losses,
            "preoptimize": preopt_losses,
            "hypernet": summary["s"]["losses"],
            "hypernet_validation": summary["s"]["validation"],
            "hypernet_terms": _logged_terms(work / "hypernet_s" / "losses.jsonl"),
        },
        "methods": summarise(losses, config),
        "guard_stops": stops,
        "held_out": [p.identity.name for p in test_people],
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(results_table(results))
    plot_losses(results, out / "losses.png")
    renders_sheet(train_people[:4], test_people[:6]).save(out / "renders.jpg", quality=92)
    image_sheet(samples).save(out / "samples.jpg", quality=92)
    return results


def _logged_terms(path: Path) -> dict[str, list[float]]:
    """The diffusion and weight terms of stage 2's loss, step by step, from its losses.jsonl."""
    records = [json.loads(line) for line in path.read_text().splitlines()]
    return {key: [r[key] for r in records if key in r] for key in ("diffusion_loss", "weight_loss")}


def summarise(losses: dict[str, list[list[float]]], config: ToyConfig) -> dict:
    """Per method: the own-renders loss (mean, per person, people it beats base / zero init / the control on),
    and identification from the N x N matrix: for how many people their own model fits their renders best
    (top-1, chance 1/N), and by how much: the margin to the best other model, in % of the base loss."""
    own = {name: np.diag(np.array(matrix)) for name, matrix in losses.items()}
    base, zero, wrong = own["base"], own["zero_ft"], own["hyper_wrong"]
    labels = method_labels(config)
    summary = {}
    for name, matrix in losses.items():
        v, grid = own[name], np.array(matrix)  # grid[k, j]: person j's renders under person k's model
        others = np.where(np.eye(len(v), dtype=bool), np.inf, grid).min(axis=0)  # best other model, per person
        identifies = name != "base"  # the base is one model for everyone: nothing to identify
        summary[name] = {
            "label": labels[name],
            "mean": float(v.mean()),
            "per_person": [float(x) for x in v],
            "vs_base_pct": float(100 * (v.mean() / base.mean() - 1)),
            "beats_base": int((v < base).sum()),
            "beats_zero_ft": int((v < zero).sum()),
            "beats_wrong_photo": int((v < wrong).sum()),
            "people": len(v),
            "identified": int((v < others).sum()) if identifies else None,
            "margin_pct": float(100 * ((others - v) / base).mean()) if identifies else None,
            "matrix": grid.tolist(),
        }
    return summary

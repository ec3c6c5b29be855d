"""The toy experiment: the paper's Table 3 in miniature, on a CPU in minutes (`python -m hdb toy`).

    random identities (colours, proportions, hair, glasses, beard), renders at 64 px that vary pose, scale,
       light and background so much that matching the photo's pixels identifies few people (a baseline row)
    -> pre-train the tiny base UNet on renders of many people, in two contexts: "a photo of a person" and
       "a black and white photo of a person"
    -> stage 1: pre-optimise a LiDB per training identity        (hdb.preoptimize)
    -> stage 2: train the hypernetwork on the training identities (hdb.train_hypernet)
    -> held-out identities, personalised from ONE render each    (hdb.personalize)
    -> diffusion loss on OTHER renders of the same person, fixed noise and timesteps for every method
    -> identification: every person's renders under every personalised model (an N x N matrix); is
       the person's own model the one that fits their renders best, and what rank / AUC does it get?
       (the paper's Table 3 asks a face recogniser the same question of generated pictures)
    -> editability: how much each personalised model worsens on OTHER people in both contexts, and how well
       it fits its person in the context the photo was not in ("a black and white photo of a sks face")

Every training stage goes through `hdb.training.train` and `hdb.stage.training_stage`, as the real
model does. The numbers are small-scale evidence that the pipeline learns, not a claim about SD1.5.
"""

from __future__ import annotations

import json
import multiprocessing
import queue
import shutil
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from hdb.config import (
    DEFAULT_INSTANCE_PROMPT,
    RELAX_MODES,
    STEPS_FROM_ZERO,
    STEPS_WITH_HYPERNET,
    DecoderConfig,
    HypernetTrainConfig,
    PersonalizeConfig,
    PreoptimizeConfig,
)
from hdb.diffusion import (
    Conditioning,
    diffusion_loss,
    encode_images,
    encode_prompts,
    sample_seed,
    step_loss,
    to_pixels,
)
from hdb.errors import HdbError
from hdb.faces import AlignedFace
from hdb.families import denoiser
from hdb.generate import generate
from hdb.hypernet import DECODER_FIELDS, HyperNetwork
from hdb.identities import Identity, load_weights_dataset
from hdb.models import Pipeline, build_tiny_pipeline, training_scheduler
from hdb.options import DREAMBOOTH_LORA_LR
from hdb.pipeline import PersonalPipeline
from hdb.preoptimize import LOSSES_FILE as PREOPTIMIZE_LOSSES
from hdb.preoptimize import preoptimize
from hdb.stage import training_stage
from hdb.toy.drawing import toy_autoencoder, train_autoencoder
from hdb.toy.pictures import (
    PICTURES,
    PictureScores,
    Recogniser,
    galleries,
    load_recogniser,
    photo_copy_row,
    picture_summary,
    save_recogniser,
    score_pictures,
    train_recogniser,
)
from hdb.toy.report import code_version, image_sheet, plot_losses, renders_sheet, results_table
from hdb.toy.resume import kept, load_json, save_json
from hdb.toy.scores import identified, memoriser_rows
from hdb.toy.world import JITTER, Person, in_black_and_white, sample_people
from hdb.train_hypernet import train_hypernetwork
from hdb.training import TrainConfig, TrainingDiverged, train

GENERIC_PROMPT = "a photo of a person"
CONTEXT_PROMPT = "a black and white photo of a person"  # the base's second context (black-and-white renders)
INSTANCE_IN_CONTEXT = f"a black and white photo of {DEFAULT_INSTANCE_PROMPT}"  # the person where the photo was not
INSTANCE_PROMPTS = (DEFAULT_INSTANCE_PROMPT, INSTANCE_IN_CONTEXT)  # the person in the base's two contexts
PROMPTS = (GENERIC_PROMPT, CONTEXT_PROMPT)  # the base's two contexts (pretrain_base's `contexts`: 0 and 1)
T = TypeVar("T")
R = TypeVar("R")


@dataclass
class ToyConfig:
    # base model: pre-trained on renders of people who appear nowhere else, every other one in black and white
    pretrain_identities: int = 600
    pretrain_renders: int = 4
    vae_steps: int = 4000  # a VAE trained on the crowd's renders (hdb.toy.drawing; 0: the tiny pipeline's random one)
    pretrain_steps: int = 3000
    pretrain_batch: int = 16
    pretrain_lr: float = 1e-3
    # the share of the base's renders shown with an empty prompt (SD's caption dropout), which classifier-free
    # guidance needs; 0 in hdb toy's runs, which draw without guidance (scripts/toy_guidance_probe.py sets it)
    pretrain_unconditional: float = 0.0
    # stages 1 and 2: training identities, a few renders each
    train_identities: int = 200
    train_renders: int = 3
    preopt_steps: int = 150  # per identity
    preopt_group: int = 8  # identities trained together
    preopt_lr: float = 5e-3
    hyper_steps: int = 2000
    hyper_batch: int = 8
    # hdb's default; 3e-4 until 7e302c8, where the weight term exploded at step 1,867 of seed 0 in the shaded world
    hyper_lr: float = HypernetTrainConfig.learning_rate
    hyper_alpha: float = HypernetTrainConfig.alpha  # diffusion loss weight
    hyper_beta: float = HypernetTrainConfig.beta  # weight loss weight (normalised: 1 at a zero prediction)
    hyper_width: int = 128
    hyper_depth: int = 2
    hyper_heads: int = 4
    iterations: int = 4  # the hypernetwork's refinement iterations s
    compare_s1: bool = False  # also train a hypernetwork with s=1 (the paper's ablation)
    compare_beta0: bool = False  # also train a hypernetwork on the diffusion loss alone (beta = 0)
    paper_variants: bool = False  # also train hypernetworks with the paper's weight loss, zero start, concatenation
    # also train the paper's recipe, its three choices together, at each beta of PAPER_RECIPE_BETAS (the raw L2's
    # scale is not the normalised distance's: the sweep gives the paper its best beta, chosen on the same people)
    paper_recipe: bool = False
    ablation: bool = True  # the finetune's prediction frozen or trained x relaxed inside the aux bases or free
    # held out from both stages: personalised from one render, scored on others
    test_identities: int = 48
    eval_renders: int = 4
    eval_draws: int = 8  # noise/timestep draws per eval render (2 identified 12 of 48 people by the upper bound, 8: 20)
    finetune_steps: int = STEPS_WITH_HYPERNET
    finetune_lr: float = PersonalizeConfig.learning_rate
    long_finetune_steps: int = STEPS_FROM_ZERO  # zero init with the steps the app gives it by default (0: skip)
    dreambooth_steps: int = 400  # DreamBooth-LoRA (rank 4 from zero), fewer steps than usual: CPU time (0: skip)
    dreambooth_lr: float = DREAMBOOTH_LORA_LR
    other_people: int = 16  # people seen nowhere else, on whom editability is measured
    other_draws: int = 2  # draws per render of the other people (their loss is averaged over all: fewer suffice)
    sample_steps: int = 25  # sampling steps of every picture the models draw
    recogniser_steps: int = 3000  # the toy's face recogniser (hdb.toy.pictures), trained on the crowd's renders
    upper_bound_renders: int = 8  # a LiDB pre-optimised on this many OTHER renders of the person (0: skip)


QUICK = ToyConfig(
    pretrain_identities=150,
    vae_steps=0,  # the random VAE: the suite's time (its pictures are noise, but scored all the same)
    pretrain_steps=240,
    recogniser_steps=300,
    train_identities=96,
    preopt_steps=80,
    hyper_steps=300,
    hyper_lr=3e-4,  # 300 steps: the learning rate the quick run's tests were made with
    ablation=False,
    test_identities=8,
    eval_renders=3,
    eval_draws=4,
    long_finetune_steps=0,
    dreambooth_steps=0,
    other_people=4,
    preopt_group=16,  # an identity's weights do not depend on its group (hdb.preoptimize): only faster
    upper_bound_renders=0,
    sample_steps=10,
)
# The paper's variants against hdb's choices (`hdb toy --paper-variants`): hdb's hypernetwork, one with each of the
# paper's choices swapped in alone, the paper's recipe (the three together) at each beta of PAPER_RECIPE_BETAS, and
# the paper's k=1 and beta=0 ablations, on the same world, base and stage 1, judged on the same 48 held-out people;
# at a smaller scale than the full run (fewer training people and steps, for CPU time), the same for all
PAPER_VARIANTS = ToyConfig(
    train_identities=96,
    preopt_steps=80,
    preopt_group=16,
    hyper_steps=600,
    paper_variants=True,
    paper_recipe=True,
    compare_s1=True,
    compare_beta0=True,
    ablation=False,
    long_finetune_steps=0,
    dreambooth_steps=0,
    upper_bound_renders=0,
)
SAMPLED_PEOPLE = 2  # held-out people drawn by the base and personalised models for the samples sheet
SAMPLED_METHODS = ("base", "zero_ft_long_lora", "dreambooth_lora", "hyper", "hyper_ft_lora", "hyper_ft_lidb")
EVAL_CHUNK = 256  # samples per UNet forward when scoring


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
    pipe: Pipeline, latents: torch.Tensor, contexts: torch.Tensor, config: ToyConfig, seed: int, progress: bool = True
) -> list[float]:
    """Train every UNet weight on renders of many people, each with its context's prompt (`contexts[i]`: 0 for
    GENERIC_PROMPT, 1 for CONTEXT_PROMPT), a `config.pretrain_unconditional` share of them with the empty prompt
    instead; the text encoder stays random, the VAE as it is."""
    scheduler = training_scheduler(pipe)
    with torch.no_grad():
        # the text encoder is frozen: encode once (the empty prompt apart, so the others' embeddings stay bit-exact)
        prompts = torch.cat([encode_prompts(pipe, list(PROMPTS)).embeds, encode_prompts(pipe, [""]).embeds])
    empty = len(PROMPTS)

    def loss_fn(step: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(sample_seed(seed, "pretrain batch", step))
        picked = torch.randint(0, len(latents), (config.pretrain_batch,), generator=generator)
        captions = contexts[picked]
        if config.pretrain_unconditional:  # its own generator: without dropout, the batches of earlier runs
            dropped = torch.Generator().manual_seed(sample_seed(seed, "pretrain captions", step))
            captions = captions.masked_fill(torch.rand(len(picked), generator=dropped) < config.pretrain_unconditional,
                                            empty)  # fmt: skip
        seeds = [sample_seed(seed, "pretrain", step, k) for k in range(len(picked))]
        return step_loss(pipe, scheduler, latents[picked], Conditioning(prompts[captions]), seeds).mean()

    # The learning rate, then a tenth of it for the last quarter: the base should be near converged, or
    # any further training (LiDB included) would lower the loss of every person alike.
    cooldown = config.pretrain_steps // 4
    phases = (
        (config.pretrain_lr, 0, config.pretrain_steps - cooldown),
        (config.pretrain_lr / 10, config.pretrain_steps - cooldown, config.pretrain_steps),
    )
    losses = []
    with training_stage(pipe, None, "pre-training the base", "a smaller pretrain_batch"):
        denoiser(pipe).requires_grad_(True)  # this stage trains the base itself; the scaffold freezes it again after
        for lr, start, end in phases:
            train_config = TrainConfig(
                steps=end,
                learning_rate=lr,
                weight_decay=0.01,
                progress=progress,
                description="pre-training the base UNet",
            )
            losses += train(list(denoiser(pipe).parameters()), loss_fn, train_config, start_step=start).losses
    return losses


def as_identities(people: list[Person]) -> list:
    return [Identity(p.identity.name, p.photos) for p in people]


def preoptimize_people(
    pipe: Pipeline, people: list[Person], out_dir: Path, config: ToyConfig, seed: int, progress: bool = True
) -> dict[str, list[float]]:
    """Stage 1: a LiDB per training identity, `preopt_group` identities at a time (LiDB's per-sample path); each
    identity's first and last loss, of this run and of the one it resumes (its weights there were kept)."""
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
    records = [json.loads(line) for line in (out_dir / PREOPTIMIZE_LOSSES).read_text().splitlines()]
    return {r["identity"]: [r["first_loss"], r["last_loss"]] for r in records}


def _progress(items: Iterable[T], enabled: bool, description: str) -> tqdm[T]:
    return tqdm(items, desc=description, disable=not enabled, leave=False)


@dataclass
class EvalDraws:
    """Fixed noise and timesteps for the renders of several people, shared by every method (paired comparisons)."""

    latents: torch.Tensor  # [people * renders * draws, 4, 8, 8], person by person
    noise: torch.Tensor
    timesteps: torch.Tensor
    people: int

    def of(self, person: int) -> EvalDraws:
        """Person `person`'s draws alone."""
        size = len(self.latents) // self.people
        part = slice(person * size, (person + 1) * size)
        return EvalDraws(self.latents[part], self.noise[part], self.timesteps[part], 1)


def eval_draws(pipe: Pipeline, renders: list[list[Image.Image]], draws: int, seed: int) -> EvalDraws:
    """`draws` noise/timestep draws of each render of each person (`renders[j]`: person j's)."""
    generator = torch.Generator().manual_seed(seed)
    flat = [render for person in renders for render in person]
    latents = _encode(pipe, flat).repeat_interleave(draws, dim=0)
    # evenly spaced timesteps with a random phase per render: every noise level counts, as in training
    grid = (torch.arange(draws) + torch.rand(len(flat), 1, generator=generator)) * (1000 / draws)
    timesteps = grid.flatten().long().clamp(0, 999)
    return EvalDraws(latents, torch.randn(latents.shape, generator=generator), timesteps, len(renders))


@torch.no_grad()
def heldout_loss(pipe: Pipeline, draws: EvalDraws, prompt: str) -> np.ndarray:
    """Diffusion loss of the pipeline as it stands (the caller puts a person's weights in) on each person's
    renders: [people]."""
    cond, scheduler = encode_prompts(pipe, [prompt]), training_scheduler(pipe)
    losses = torch.cat(
        [
            diffusion_loss(pipe, scheduler, latents, cond.expand(len(latents)), noise, timesteps)
            for latents, noise, timesteps in zip(
                *(t.split(EVAL_CHUNK) for t in (draws.latents, draws.noise, draws.timesteps)), strict=True
            )
        ]
    )
    return losses.view(draws.people, -1).mean(dim=1).numpy()


@dataclass(frozen=True)
class Method:
    """How one row of the table personalises a held-out person."""

    label: str
    hypernet: str | None = None  # which hypernetwork predicts the start ("s", "s1", ...); None: zero
    steps: int = 0  # rank-relaxed finetune steps after the start (0: the start alone)
    relax: str = PersonalizeConfig.relax
    train_prediction: bool | None = None  # PersonalizeConfig.train_prediction: the ablation crosses it with relax
    learning_rate: float | None = None  # None: the toy's finetune_lr
    wrong_photo: bool = False  # the control: the hypernetwork is shown the next person's photo
    upper_bound: bool = False  # a LiDB pre-optimised on many other renders of the person
    iterations: int | None = None  # the hypernetwork read at this many refinement iterations (None: its own s)

    def finetune(self, config: ToyConfig, seed: int) -> PersonalizeConfig:
        """The rank-relaxed finetune this row runs after its start (when `steps`), quietly."""
        return PersonalizeConfig(
            steps=self.steps,
            learning_rate=self.learning_rate or config.finetune_lr,
            relax=self.relax,
            train_prediction=self.train_prediction,
            seed=seed,
            progress=False,
        )


@dataclass(frozen=True)
class ToyHypernet:
    """One hypernetwork the toy can train: how it differs from the toy's own (None: as the toy's config has it)."""

    asked_by: str = ""  # the ToyConfig flag that asks for it ("": always trained)
    iterations: int | None = None  # the paper's s
    beta: float | None = None
    weight_loss: str | None = None  # HypernetTrainConfig's
    refine_from: str | None = None  # DecoderConfig's
    decoder_input: str | None = None  # DecoderConfig's

    def wanted(self, config: ToyConfig) -> bool:
        return not self.asked_by or getattr(config, self.asked_by)


PAPER_RECIPE_BETAS = {"paper_recipe": 1.0, "paper_recipe_b01": 0.1, "paper_recipe_b001": 0.01}
PAPER_RECIPE = {"weight_loss": "paper", "refine_from": "zero", "decoder_input": "concatenated"}
HYPERNETS = {
    "s": ToyHypernet(),
    "s1": ToyHypernet("compare_s1", iterations=1),
    "beta0": ToyHypernet("compare_beta0", beta=0.0),
    "paper_loss": ToyHypernet("paper_variants", weight_loss="paper"),
    "zero_start": ToyHypernet("paper_variants", refine_from="zero"),
    "concatenated": ToyHypernet("paper_variants", decoder_input="concatenated"),
    **{name: ToyHypernet("paper_recipe", beta=beta, **PAPER_RECIPE) for name, beta in PAPER_RECIPE_BETAS.items()},
}
VARIANT_LABELS = {
    "paper_loss": "the paper's raw L2 weight loss",
    "zero_start": "the paper's zero start",
    "concatenated": "the paper's concatenated decoder input",
    **{name: f"the paper's recipe (all three), beta {beta:g}" for name, beta in PAPER_RECIPE_BETAS.items()},
}


def toy_methods(config: ToyConfig) -> dict[str, Method]:
    steps, long, s = config.finetune_steps, config.long_finetune_steps, config.iterations
    default = PersonalizeConfig.relax
    methods = {
        "base": Method("base model (no personalisation)"),
        "zero_ft": Method(f"zero init + {steps} steps ({default})", steps=steps),
        **{
            f"zero_ft_long_{mode}": Method(f"zero init + {long} steps, {mode}", steps=long, relax=mode)
            for mode in RELAX_MODES
            if long
        },
        "dreambooth_lora": Method(
            f"DreamBooth-LoRA: rank-4 LoRA from zero, {config.dreambooth_steps} steps at lr {config.dreambooth_lr:g}",
            steps=config.dreambooth_steps,
            relax="lora",
            learning_rate=config.dreambooth_lr,
        ),
        "hyper": Method(f"hypernetwork only, s={s}", "s"),
        "hyper_ft_lora": Method(f"hypernetwork + {steps} steps, lora: frozen prediction, free (paper)", "s", steps),
        "hyper_ft_lidb": Method(f"hypernetwork + {steps} steps, lidb: trained, confined", "s", steps, "lidb"),
        "hyper_ft_lora_trained": Method(
            f"hypernetwork + {steps} steps, trained prediction, free", "s", steps, "lora", train_prediction=True
        ),
        "hyper_ft_lidb_frozen": Method(
            f"hypernetwork + {steps} steps, frozen prediction, confined", "s", steps, "lidb", train_prediction=False
        ),
        "hyper_s1": Method("hypernetwork only, trained with s=1", "s1"),
        "hyper_k1": Method(f"hypernetwork only, trained with s={s}, read at k=1", "s", iterations=1),
        "hyper_beta0": Method("hypernetwork only, trained with beta=0", "beta0"),
        "hyper_beta0_ft_lora": Method(f"beta=0 hypernetwork + {steps} steps, lora", "beta0", steps, "lora"),
        **{
            name: method
            for variant, what in VARIANT_LABELS.items()
            for name, method in (
                (f"hyper_{variant}", Method(f"hypernetwork only, {what}", variant)),
                (f"hyper_{variant}_ft_lora", Method(f"{what} + {steps} steps, lora", variant, steps, "lora")),
            )
        },
        "hyper_wrong": Method("control: hypernetwork fed another person's photo", "s", wrong_photo=True),
        "upper_bound": Method(
            f"upper bound: LiDB pre-optimised on {config.upper_bound_renders} other renders", upper_bound=True
        ),
    }
    dropped = {
        "dreambooth_lora": not config.dreambooth_steps,
        "hyper_ft_lora_trained": not config.ablation,
        "hyper_ft_lidb_frozen": not config.ablation,
        "upper_bound": not config.upper_bound_renders,
    }
    dropped["hyper_k1"] = not config.compare_s1  # read beside the network trained with s=1
    wanted = {name for name, hypernet in HYPERNETS.items() if hypernet.wanted(config)}
    return {
        name: method
        for name, method in methods.items()
        if not dropped.get(name) and (method.hypernet is None or method.hypernet in wanted)
    }


def method_labels(config: ToyConfig) -> dict[str, str]:
    return {name: method.label for name, method in toy_methods(config).items()}


@dataclass
class Scores:
    """What evaluate_methods measures of each method, person by person (k: whose model)."""

    losses: dict[str, list[list[float]]]  # [method][k][j]: person j's renders under person k's model
    other_people: dict[str, list[list[float]]]  # [method][k]: % vs base on other people, per context
    in_context: dict[str, list[float]]  # [method][k]: % vs base on person k's black-and-white renders
    stops: dict[str, int]  # finetunes that train()'s divergence guard stopped early
    pictures: dict[str, list[PictureScores]]  # [method][k]: the pictures person k's model draws, scored
    samples: list[list[Image.Image]]  # the samples sheet's rows


def evaluate_methods(
    pipe: Pipeline,
    hypernets: dict[str, HyperNetwork],
    upper_bound_dir: Path | None,
    recogniser: Recogniser,
    test: list[Person],
    others: list[Person],
    config: ToyConfig,
    seed: int,
    progress: bool = True,
    workers: int = 1,
    kept_in: Path | None = None,
) -> Scores:
    """Personalise each held-out person from their one photo by every method, and score the result on the
    other renders of EVERY held-out person; on other people, in both contexts; and on the person's own renders
    in black and white, with the prompt of that context. Each model also draws the person in both contexts, and
    `recogniser` judges whom it drew (hdb.toy.pictures). `workers` > 1 shares the people out among that many
    forked processes (`in_forked_workers`): the same scores, sooner on as many cores. `kept_in`: a folder where each
    person's scores are kept as they are made, and read back by a run that resumes (`kept`)."""
    scoring = _Scoring(pipe, hypernets, upper_bound_dir, recogniser, test, others, config, seed)

    def score_person(k: int) -> PersonScores:
        if kept_in is None:
            return scoring.score_person(k)
        return kept(kept_in / f"{k:03d}", lambda: scoring.score_person(k), PersonScores.save, PersonScores.load)

    try:
        everyone = in_forked_workers(score_person, len(test), workers, progress, "personalising held-out people")
    finally:
        scoring.personal.unload()
    methods = scoring.methods
    scores = Scores(*({name: [] for name in methods} for _ in range(3)), {}, {name: [] for name in methods}, [])
    for person in everyone:
        for name, (row, drift_pct, context_pct) in person.measured.items():
            scores.losses[name].append(row)
            scores.other_people[name].append(drift_pct)
            scores.in_context[name].append(context_pct)
            scores.pictures[name].append(person.pictures[name])
        for name in person.stopped:
            scores.stops[name] = scores.stops.get(name, 0) + 1
        scores.samples += person.sheet_rows
    return scores


class _Scoring:
    """What scoring every held-out person shares: the pipeline's person, the methods' starts, the draws each model is
    measured on, the recogniser and the people it compares pictures with, and the base model's own scores."""

    def __init__(
        self,
        pipe: Pipeline,
        hypernets: dict[str, HyperNetwork],
        upper_bound_dir: Path | None,
        recogniser: Recogniser,
        test: list[Person],
        others: list[Person],
        config: ToyConfig,
        seed: int,
    ) -> None:
        self.pipe, self.hypernets, self.test, self.config, self.seed = pipe, hypernets, test, config, seed
        self.recogniser, self.gallery = recogniser, galleries(recogniser, test)
        self.personal = PersonalPipeline(pipe, lidb_config=hypernets["s"].lidb_config)  # each method its own start
        self.upper_bound = (
            load_weights_dataset(upper_bound_dir, self.personal.lidb, [p.identity.name for p in test])
            if upper_bound_dir
            else {}
        )
        self.methods = toy_methods(config)
        for net in hypernets.values():
            net.eval()
        self.draws = eval_draws(pipe, [p.eval_renders for p in test], config.eval_draws, seed * 7919)
        in_grey = [[in_black_and_white(r) for r in p.eval_renders] for p in test]
        self.in_context = eval_draws(pipe, in_grey, 1, seed * 7919 + 1)
        other_renders = [p.eval_renders for p in others]
        self.other_draws = (  # one set per context: the people as they are, and in black and white
            eval_draws(pipe, other_renders, config.other_draws, seed * 7919 + 2),
            eval_draws(pipe, [[in_black_and_white(r) for r in rs] for rs in other_renders], config.other_draws,
                       seed * 7919 + 3),
        )  # fmt: skip
        self.personal.forget()
        self.base_row, self.base_drift, self.base_context = self.measure(None)
        self.base_pictures = self.draw()

    def personalise(self, method: Method, person: Person, other: Person) -> bool:
        """Put the pipeline in the state `method` leaves for `person`; True if the divergence guard stopped it."""
        net = self.hypernets[method.hypernet] if method.hypernet else None
        photo = (other if method.wrong_photo else person).photos[0]
        with torch.no_grad():
            prediction = net.predict(photo, method.iterations) if net is not None else None
        if method.upper_bound:
            self.personal.use_weights(*self.upper_bound[person.identity.name])
        elif method.steps:
            face = AlignedFace.from_crop(person.photos[0])  # a render is already an aligned crop
            try:
                self.personal.personalize(face, method.finetune(self.config, self.seed), start=prediction)
            except TrainingDiverged as stop:  # score the last good step's weights, and count the stop
                self.personal.use(stop.last_good)
                return True
        elif prediction is not None:
            self.personal.use_weights(*prediction)
        else:
            self.personal.forget()  # B = 0: the base model
        return False

    def measure(self, k: int | None) -> tuple[list[float], list[float], np.ndarray]:
        """The personalised model's scores: on every held-out person, on other people, and in context on person k
        (None: on everyone)."""
        lidb, pipe = self.personal.lidb, self.pipe
        lidb.own.use_shared()
        # folded into the weights once: ~1,800 samples then skip the low-rank path in every layer (~30% faster;
        # the same losses to 1e-7), and unmerging puts the exact base weights back
        with lidb.merged_into_weights():
            row = heldout_loss(pipe, self.draws, DEFAULT_INSTANCE_PROMPT).tolist()
            drift = [
                float(heldout_loss(pipe, d, prompt).mean()) for d, prompt in zip(self.other_draws, PROMPTS, strict=True)
            ]
            in_context = self.in_context if k is None else self.in_context.of(k)
            context = heldout_loss(pipe, in_context, INSTANCE_IN_CONTEXT)
        return row, drift, context

    @torch.no_grad()
    def draw(self) -> list[list[Image.Image]]:
        """What the model as it stands draws of the person in each context (INSTANCE_PROMPTS), PICTURES each, from the
        same seeds for every model; no guidance: the toy's base never saw an empty prompt (pretrain_unconditional 0)."""
        return [
            generate(self.pipe, self.personal.lidb, prompt, negative_prompt="", guidance=1.0,
                     steps=self.config.sample_steps, seed=self.seed, num_images=PICTURES)
            for prompt in INSTANCE_PROMPTS
        ]  # fmt: skip

    def score_person(self, k: int) -> PersonScores:
        """Person k personalised by every method (from person k+1's photo for the control), measured, and drawn."""
        person, other = self.test[k], self.test[(k + 1) % len(self.test)]
        measured, stopped, pictures = {}, [], {}
        sheet_rows = [[person.photos[0]], [in_black_and_white(person.photos[0])]] if k < SAMPLED_PEOPLE else []
        for name, method in self.methods.items():
            if self.personalise(method, person, other):
                stopped.append(name)
            if name == "base":  # one model for everyone: measured and drawn once, as the scoring began
                measured[name], drawn = (self.base_row, [0.0] * len(PROMPTS), 0.0), self.base_pictures
            else:
                row, drift, context = self.measure(k)
                drift_pct = [100 * (d / b - 1) for d, b in zip(drift, self.base_drift, strict=True)]
                measured[name] = (row, drift_pct, float(100 * (context[0] / self.base_context[k] - 1)))
                drawn = self.draw()
            pictures[name] = score_pictures(self.recogniser, self.gallery, drawn)
            if name in SAMPLED_METHODS:
                for sheet_row, in_context in zip(sheet_rows, drawn, strict=False):
                    sheet_row.append(in_context[0])
        return PersonScores(measured, stopped, pictures, sheet_rows)


@dataclass
class PersonScores:
    """One held-out person's results, as `evaluate_methods` gathers them from its workers."""

    measured: dict[str, tuple[list[float], list[float], float]]  # per method: own row, % on others, % in context
    stopped: list[str]  # the methods whose finetune the divergence guard stopped
    pictures: dict[str, PictureScores]  # per method: its pictures of the person, scored
    sheet_rows: list[list[Image.Image]]  # the samples sheet's rows (one per context), for the first SAMPLED_PEOPLE

    def save(self, folder: Path) -> None:
        """The scores as JSON and the sheet's pictures as PNG files, for `load`."""
        figures = {"measured": self.measured, "stopped": self.stopped}
        figures["pictures"] = {name: asdict(scores) for name, scores in self.pictures.items()}
        figures["sheet_rows"] = [len(row) for row in self.sheet_rows]
        (folder / "scores.json").write_text(json.dumps(figures))
        for r, row in enumerate(self.sheet_rows):
            for c, picture in enumerate(row):
                picture.save(folder / f"sheet_{r}_{c}.png")

    @classmethod
    def load(cls, folder: Path) -> PersonScores:
        figures = json.loads((folder / "scores.json").read_text())
        return cls(
            {name: tuple(scores) for name, scores in figures["measured"].items()},
            figures["stopped"],
            {name: PictureScores(**scores) for name, scores in figures["pictures"].items()},
            [[_png(folder / f"sheet_{r}_{c}.png") for c in range(n)] for r, n in enumerate(figures["sheet_rows"])],
        )


def _png(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")  # read now: the file is not kept open


def in_forked_workers(
    work: Callable[[int], R], count: int, workers: int, progress: bool = False, description: str = ""
) -> list[R]:
    """[work(0), ..., work(count - 1)], item i computed by worker i % `workers`: forked processes of one torch
    thread each, which start with the caller's memory (models, data) and send their results back; in this
    process when `workers` is 1. An error in a worker is raised here, with the worker's traceback."""
    if workers <= 1:
        return [work(i) for i in _progress(range(count), progress, description)]
    context = multiprocessing.get_context("fork")  # the work and its models are inherited, never pickled
    results = context.Queue()

    def serve(worker: int) -> None:
        torch.set_num_threads(1)  # the worker's own process; a thread pool inherited across fork could hang
        try:
            for i in range(worker, count, workers):
                results.put((i, work(i), None))
        except BaseException:
            results.put((-1, None, traceback.format_exc()))

    processes = [context.Process(target=serve, args=(w,), daemon=True) for w in range(workers)]
    for process in processes:
        process.start()
    done: dict[int, R] = {}
    try:
        with tqdm(total=count, desc=description, disable=not progress, leave=False) as bar:
            while len(done) < count:
                try:
                    i, result, error = results.get(timeout=10)
                except queue.Empty:
                    if any(p.exitcode not in (None, 0) for p in processes):  # killed (e.g. out of memory)
                        codes = [p.exitcode for p in processes]
                        raise HdbError(f"A worker died before sending its results (exit codes {codes})") from None
                    continue
                if error is not None:
                    raise HdbError(f"A worker failed:\n{error}")
                done[i] = result
                bar.update()
    finally:
        for process in processes:
            if len(done) < count:  # an error: the other workers' results are not wanted
                process.terminate()
            process.join()
    return [done[i] for i in range(count)]


# ----------------------------------------------------------------------------- the whole run


def run_toy(
    out_dir: str | Path = "docs/toy/seed0",
    quick: bool = False,
    seed: int = 0,
    config: ToyConfig | None = None,
    progress: bool = True,
    workers: int = 1,
    resume: bool = False,
) -> dict:
    """Run the experiment end to end; write results.json, results.md, losses.png, renders.jpg, samples.jpg to
    `out_dir`. `workers`: processes that score the held-out people (the run's longest part), one torch thread each.

    Each phase's output (the base, the recogniser, stage 1's weights, the hypernetworks, each held-out person's
    scores) goes to out_dir/work. That folder is emptied first, or with `resume` read back: a run stopped part way
    goes on where it stopped (`kept`), as long as the code, seed and config are those it started with (checked).
    """
    config = config or (QUICK if quick else ToyConfig())
    out, started, code = Path(out_dir), time.perf_counter(), code_version()  # the code as the run starts
    work = work_folder(out, resume, seed, config)
    lap = Laps(progress)

    # 1. the world: four disjoint populations
    crowd, train_people, test_people, other_people = toy_world(config, seed)
    lap("render")
    # 2. the base model, on the crowd's renders; and a face recogniser, on the same renders
    base = kept(work / "base", partial(pretrained_base, crowd, config, seed, progress), Base.save,
                partial(Base.load, seed=seed))  # fmt: skip
    pipe = base.pipe
    lap("pretrain")
    train = partial(train_recogniser, crowd, config.recogniser_steps, seed, progress)
    recogniser, recogniser_losses = kept(work / "recogniser", train, save_recogniser, load_recogniser)
    lap("recogniser")
    # 3. stage 1: a LiDB per training identity
    preopt = work / "preopt"
    preopt_losses = preoptimize_people(pipe, train_people, preopt, config, seed, progress)
    lap("preoptimize")
    # 4. stage 2: the hypernetworks
    hypernets, summary = train_toy_hypernets(pipe, test_people, train_people, preopt, work, config, seed, lap)
    # 5. held-out people, personalised from one render, scored on their other renders, and drawn
    upper_bound_dir = upper_bound_weights(pipe, test_people, work, config, seed, progress)
    scores = evaluate_methods(
        pipe, hypernets, upper_bound_dir, recogniser, test_people, other_people, config, seed, progress, workers,
        kept_in=work / "scores",
    )  # fmt: skip
    lap("evaluate")
    lap.timings["total"] = round(time.perf_counter() - started, 1)

    results = {
        "seed": seed,
        "quick": quick,
        "code": code,  # the figures come from this code, as committed
        "config": asdict(config),
        "timings_s": lap.timings,  # of this run's phases: one resumed read the earlier ones' outputs back
        "resumed": resume,
        "torch_threads": torch.get_num_threads(),
        "scoring_workers": workers,
        "latent_scaling_factor": base.latent_scaling_factor,
        "jitter": JITTER,
        "losses": {
            "vae": base.vae_losses,
            "pretrain": base.pretrain_losses,
            "recogniser": recogniser_losses,
            "preoptimize": preopt_losses,
            "hypernet": summary["s"]["losses"],
            "hypernet_validation": summary["s"]["validation"],
            "hypernet_terms": _logged_terms(work / "hypernet_s" / "losses.jsonl"),
        },
        "methods": summarise(scores, memoriser_rows(test_people), photo_copy_row(recogniser, test_people), config),
        "picture_prompts": INSTANCE_PROMPTS,
        "guard_stops": scores.stops,
        "held_out": [p.identity.name for p in test_people],
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(results_table(results))
    plot_losses(results, out / "losses.png")
    renders_sheet(train_people[:4], test_people[:6]).save(out / "renders.jpg", quality=92)
    image_sheet(scores.samples).save(out / "samples.jpg", quality=92)
    return results


def upper_bound_weights(
    pipe: Pipeline, test_people: list[Person], work: Path, config: ToyConfig, seed: int, progress: bool
) -> Path | None:
    """What a LiDB learns from many renders of each held-out person (stage 1 on their extra renders), the most one
    LiDB can do: the folder of their weights (None where `config` asks for no upper bound)."""
    if not config.upper_bound_renders:
        return None
    upper = [Person(p.identity, p.extra_renders, [], []) for p in test_people]
    preoptimize_people(pipe, upper, work / "upper_bound", config, seed, progress)
    return work / "upper_bound"


def work_folder(out: Path, resume: bool, seed: int, config: ToyConfig) -> Path:
    """out/work, where each phase keeps its output: emptied, or with `resume` kept for a run that must be the one it
    holds (`check_resumable`)."""
    work = out / "work"
    if not resume:
        shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    hdb_code = code_version("HEAD:./")  # a resumed run may be at a later commit that leaves hdb's code as it was
    check_resumable(work / "run.json", {"seed": seed, "code": hdb_code, "config": asdict(config), "jitter": JITTER})
    return work


def train_toy_hypernets(
    pipe: Pipeline,
    test_people: list[Person],
    train_people: list[Person],
    preopt: Path,
    work: Path,
    config: ToyConfig,
    seed: int,
    lap: Laps,
) -> tuple[dict[str, HyperNetwork], dict[str, dict]]:
    """Stage 2: every hypernetwork `config` asks for (HYPERNETS), each kept in work/hypernet_NAME (`kept`), and each
    one's training summary."""
    hypernets, summary = {}, {}
    for variant, asked in HYPERNETS.items():
        if asked.wanted(config):
            folder = work / f"hypernet_{variant}"
            people = (test_people, train_people)
            train = partial(train_toy_hypernet, pipe, asked, *people, preopt, folder, config, seed, lap.progress)
            summary[variant] = kept(folder, train, save_json, load_json)
            hypernets[variant] = HyperNetwork.from_pretrained(folder / "hypernet")
            lap(f"hypernetwork_{variant}")
    return hypernets, summary


def toy_world(config: ToyConfig, seed: int) -> tuple[list[Person], list[Person], list[Person], list[Person]]:
    """The toy's four disjoint populations: the crowd the base learns from, stage 1 and 2's training people, the
    held-out people (one photo, renders to score on, and extra renders for the upper bound) and other people."""
    crowd = sample_people(seed, 0, config.pretrain_identities, config.pretrain_renders, 0, "crowd")
    train_people = sample_people(seed, 1, config.train_identities, config.train_renders, 0, "train")
    test_people = sample_people(
        seed, 2, config.test_identities, 1, config.eval_renders, "test", config.upper_bound_renders
    )
    other_people = sample_people(seed, 3, config.other_people, 0, config.eval_renders, "other")
    return crowd, train_people, test_people, other_people


def check_resumable(path: Path, run: dict) -> None:
    """Record what the run in this work folder is; a resumed run must be the same one (its phases' outputs are)."""
    if path.is_file():
        before = json.loads(path.read_text())
        if before != json.loads(json.dumps(run)):
            changed = sorted(key for key in run if before.get(key) != json.loads(json.dumps(run[key])))
            raise HdbError(
                f"{path.parent} holds a run with another {', '.join(changed)}; run without --resume to start afresh"
            )
    path.write_text(json.dumps(run))


class Laps:
    """Each phase's seconds since the last (`lap(name)`), printed as it ends when `progress`."""

    def __init__(self, progress: bool) -> None:
        self.progress, self.timings, self.since = progress, {}, time.perf_counter()

    def __call__(self, name: str) -> None:
        now = time.perf_counter()
        self.timings[name] = round(now - self.since, 1)
        if self.progress:
            print(f"  {name}: {self.timings[name]:.1f} s", flush=True)
        self.since = now


@dataclass
class Base:
    """The toy's base model and how it was made."""

    pipe: Pipeline
    latent_scaling_factor: float
    vae_losses: list[float]  # empty: the tiny pipeline's random VAE
    pretrain_losses: list[float]

    def save(self, folder: Path) -> None:
        """The trained weights (the denoiser's and the VAE's) and the figures, for `load`."""
        save_file(denoiser(self.pipe).state_dict(), folder / "denoiser.safetensors")
        save_file(self.pipe.vae.state_dict(), folder / "vae.safetensors")
        figures = {key: value for key, value in vars(self).items() if key != "pipe"}
        (folder / "base.json").write_text(json.dumps(figures))

    @classmethod
    def load(cls, folder: Path, seed: int) -> Base:
        """The base `save` wrote, in a tiny pipeline built from the same seed."""
        figures = json.loads((folder / "base.json").read_text())
        pipe = build_tiny_pipeline("sd15", seed)
        pipe.set_progress_bar_config(disable=True)
        if figures["vae_losses"]:  # a trained VAE, not the pipeline's own
            pipe.vae = toy_autoencoder(seed).eval().requires_grad_(False)
        pipe.vae.load_state_dict(load_file(folder / "vae.safetensors"))
        pipe.vae.register_to_config(scaling_factor=figures["latent_scaling_factor"])
        denoiser(pipe).load_state_dict(load_file(folder / "denoiser.safetensors"))
        return cls(pipe, **figures)


def pretrained_base(crowd: list[Person], config: ToyConfig, seed: int, progress: bool) -> Base:
    """The toy's base model: a VAE trained on the crowd's colour renders (`config.vae_steps`), then the UNet trained on
    its latents of the crowd's renders, every other one in black and white with that context's prompt."""
    pipe = build_tiny_pipeline("sd15", seed)
    pipe.set_progress_bar_config(disable=True)
    vae_losses = []
    if config.vae_steps:
        colour = [photo for person in crowd for photo in person.photos]
        pipe.vae, vae_losses = train_autoencoder(colour, config.vae_steps, seed, progress=progress)
    renders, contexts = crowd_in_context(crowd)
    latents, factor = calibrate_latents(pipe, renders)
    return Base(pipe, factor, vae_losses, pretrain_base(pipe, latents, contexts, config, seed, progress))


def crowd_in_context(crowd: list[Person]) -> tuple[list[Image.Image], torch.Tensor]:
    """The crowd's renders as the base learns them, every other one in black and white, and each one's context
    (`pretrain_base`'s: 0 for GENERIC_PROMPT, 1 for CONTEXT_PROMPT)."""
    renders = [photo for person in crowd for photo in person.photos]
    contexts = torch.arange(len(renders)) % 2
    return [in_black_and_white(r) if c else r for r, c in zip(renders, contexts.tolist(), strict=True)], contexts


def train_toy_hypernet(
    pipe: Pipeline,
    asked: ToyHypernet,
    test_people: list[Person],
    train_people: list[Person],
    weights_dir: Path,
    folder: Path,
    config: ToyConfig,
    seed: int,
    progress: bool,
) -> dict:
    """Train one of the toy's hypernetworks into `folder` on stage 1's `weights_dir` (its summary back). The held-out
    people go first with holdout=len(test): train_hypernetwork never trains on them, only reports its validation loss
    on their photo."""
    shape = (config.hyper_width, config.hyper_depth, config.hyper_heads, asked.iterations or config.iterations)
    changes = {key: value for key, value in vars(asked).items() if key in DECODER_FIELDS and value is not None}
    hyper_config = HypernetTrainConfig(
        steps=config.hyper_steps,
        batch_size=config.hyper_batch,
        learning_rate=config.hyper_lr,
        alpha=config.hyper_alpha,
        beta=config.hyper_beta if asked.beta is None else asked.beta,
        holdout=len(test_people),
        seed=seed,
        image_encoder="tiny",
        freeze_encoder=False,  # a random encoder has nothing to keep; the toy's results were made training it
        warmup_steps=0,  # and with a constant learning rate
        lr_schedule="constant",
        decoder=replace(DecoderConfig(*shape), **changes),
        checkpoint_every=config.hyper_steps,
        validate_every=max(config.hyper_steps // 10, 1),
        progress=progress,
        weight_loss=asked.weight_loss or HypernetTrainConfig.weight_loss,
    )
    people = as_identities(test_people + train_people)
    return train_hypernetwork(pipe, people, folder, weights_dir, hyper_config, device="cpu")


def _logged_terms(path: Path) -> dict[str, list[float]]:
    """The diffusion and weight terms of stage 2's loss, step by step, from its losses.jsonl."""
    records = [json.loads(line) for line in path.read_text().splitlines()]
    return {key: [r[key] for r in records if key in r] for key in ("diffusion_loss", "weight_loss")}


def summarise(scores: Scores, memorisers: dict[str, dict], photo_copy: dict[str, dict], config: ToyConfig) -> dict:
    """Per method: the own-renders loss (mean, per person, vs base), identification from the N x N matrix (how many
    people their own model fits best, chance 1/N; mean rank; AUC with a bootstrap interval; the margin to the best
    other model in % of the base loss), editability (% vs base on other people per context, and on the person in
    the other context), and its pictures judged (`picture_summary`). The memorising baselines' rows
    (`memoriser_rows`) come first, then the pictures' own baseline (`photo_copy_row`)."""
    base = np.diag(np.array(scores.losses["base"]))
    labels = method_labels(config)
    summary = dict(memorisers) | photo_copy
    for name, matrix in scores.losses.items():
        grid = np.array(matrix)
        v = np.diag(grid)
        row = {
            "label": labels[name],
            "mean": float(v.mean()),
            "per_person": v.tolist(),
            "vs_base_pct": float(100 * (v.mean() / base.mean() - 1)),
            "beats_base": int((v < base).sum()),
            "people": len(v),
            "other_people_pct": np.mean(scores.other_people[name], axis=0).tolist(),  # per context
            "in_context_pct": float(np.mean(scores.in_context[name])),
            "in_context_per_person": scores.in_context[name],
            "matrix": grid.tolist(),
        }
        if name != "base":  # the base is one model for everyone: nothing to identify
            others = np.where(np.eye(len(v), dtype=bool), np.inf, grid).min(axis=0)  # best other model, per person
            margin = 100 * (others - v) / base
            row |= identified(labels[name], grid)
            row |= {"margin_pct": float(margin.mean()), "margin_per_person": margin.tolist()}
        row["pictures"] = picture_summary(labels[name], scores.pictures[name], identify=name != "base")
        summary[name] = row
    return summary

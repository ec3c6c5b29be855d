"""The options of hdb's commands and of the demo that are no stage's settings, each declared once with its default,
help and range (`hdb.config.setting`): the command line (`hdb.cli`) and the app (`hdb.app.main`) build their options
from these, and the functions the commands run take their defaults from them.

The stages' own settings (PersonalizeConfig, PreoptimizeConfig, HypernetTrainConfig, GenerateOptions, ...) are
hdb.config's. Paths and other inputs a command is run on (a photo, a file, --out) are its own arguments, not here.
Light like hdb.config (no torch), so that `python -m hdb --help` stays instant.
"""

from __future__ import annotations

from dataclasses import dataclass

from hdb.config import (
    COMPILE_MODES,
    DEFAULT_BASE,
    DTYPE_CHOICES,
    FILE_DTYPES,
    LORA_FORMATS,
    QUANTIZATIONS,
    RELAX_MODES,
    TINY_ARCHS,
    Checked,
    count_setting,
    seed_setting,
    setting,
    steps_setting,
)
from hdb.example_photos import ASSETS

HYPERNET_HELP = "trained hypernetwork: hub id or directory"  # the commands' and the app's --hypernet
QUANTIZE_HELP = "the frozen base in 4 (nf4) or 8 (int8) bits, for cards with less memory, CUDA only"


@dataclass
class ModelOptions(Checked):
    """Which base model a command (or the demo) loads, and how. `env` metadata: the app's environment variables."""

    base: str = setting(DEFAULT_BASE, "base model: hub id or local directory", env=("HDB_BASE",))
    device: str = setting("auto", "auto, cpu, cuda, cuda:1, ...", env=("HDB_DEVICE",))
    dtype: str = setting(
        "auto", "auto: bf16 on GPUs that have it (else fp16), fp32 on CPU", DTYPE_CHOICES, env=("HDB_DTYPE",)
    )
    quantize: str = setting(QUANTIZATIONS[0], QUANTIZE_HELP, QUANTIZATIONS, env=("HDB_QUANTIZE",))


# The demo compiles the denoiser's repeated blocks (`--compile`): minutes less than the whole model, the same speed
APP_COMPILE_MODE = "regional"


@dataclass
class AppOptions(Checked):
    """The demo's own options (`python app.py`, `hdb demo`), besides ModelOptions and PersonalizeConfig's optimizer."""

    tiny: bool = setting(False, "tiny random pipeline: the whole flow offline, in seconds, on a CPU", env=("HDB_TINY",))
    compile: bool = setting(
        False,
        f"dedicated GPU: torch.compile ({APP_COMPILE_MODE}) while the page is already served; not on ZeroGPU",
        env=("HDB_COMPILE",),
    )
    host: str = setting("127.0.0.1", "0.0.0.0 to serve the network (Spaces set it)", env=("GRADIO_SERVER_NAME",))
    port: int = setting(7860, "the server's port", between=(1, 65535), env=("HDB_PORT", "GRADIO_SERVER_PORT"))
    share: bool = setting(False, "also serve it through a public gradio.live link")


@dataclass
class TinyModelOptions(Checked):
    """`hdb tiny-model`: a tiny random pipeline of one of the families."""

    arch: str = setting(TINY_ARCHS[0], "the base family whose tiny pipeline is built", TINY_ARCHS)
    seed: int = seed_setting()


@dataclass
class ExportOptions(Checked):
    """`hdb export`: a personal file as a standard LoRA."""

    format: str = setting(
        LORA_FORMATS[0], "key format: diffusers/peft, or kohya (AUTOMATIC1111, ComfyUI)", LORA_FORMATS
    )
    dtype: str = setting(FILE_DTYPES[0], "precision of the written LoRA", FILE_DTYPES)
    push: str | None = setting(None, "also upload it to the Hugging Face Hub, with a model card")
    private: bool = setting(False, "with --push: a private repository")


@dataclass
class PushOptions(Checked):
    """`hdb push`: a trained hypernetwork to the Hugging Face Hub."""

    private: bool = setting(False, "a private repository")


# identities per shard of a training cache (hdb.cache), in name order
SHARD_SIZE = 1024


@dataclass
class CacheOptions(Checked):
    """`hdb cache`: stage 2's training data, made once."""

    shard_size: int = count_setting(SHARD_SIZE, "identities per shard file", high=1 << 20)


@dataclass
class ToyOptions(Checked):
    """`hdb toy`: the small-scale experiment (hdb.toy)."""

    quick: bool = setting(False, "the shortened run the tests use (~5 min on one core)")
    paper_variants: bool = setting(
        False,
        "hdb's hypernetwork against ones with the paper's weight loss, zero start and concatenated input "
        "(docs/toy/paper_variants/seed<SEED>)",
    )
    seed: int = seed_setting()
    threads: int | None = setting(
        None, "torch CPU threads (1 is faster when other work shares the cores)", between=(1, 1024)
    )
    workers: int = count_setting(
        1,
        "processes that score the held-out people, one torch thread each (the run's longest part: 2 on 2 cores)",
        high=64,
    )
    resume: bool = setting(
        False, "go on with the run that stopped in the output folder (its work/: the same code, seed and config)"
    )


# DreamBooth-LoRA as users usually run it (diffusers' example): a rank-4 LoRA from zero, ~1,000 steps at lr 1e-4
DREAMBOOTH_LORA_STEPS = 1000
DREAMBOOTH_LORA_LR = 1e-4
# `hdb eval`'s models for the paper's metrics: CLIP ViT-L/14 (CLIP-I, CLIP-T) and DreamBooth's DINO ViT-S/16
DEFAULT_CLIP, DEFAULT_DINO = "openai/clip-vit-large-patch14", "facebook/dino-vits16"


@dataclass
class EvalOptions(Checked):
    """`hdb eval`: the paper's metrics, and the baseline rows of its protocol."""

    dreambooth_steps: int = steps_setting(DREAMBOOTH_LORA_STEPS, "the DreamBooth-LoRA row's steps (0: no such row)", 0)
    clip: str = setting(DEFAULT_CLIP, "CLIP model: hub id or directory")
    dino: str = setting(DEFAULT_DINO, "DINO model: hub id or directory")


@dataclass
class BenchOptions(Checked):
    """`hdb bench`: personalisation timed against DreamBooth and DreamBooth-LoRA."""

    device: str = setting("auto", "auto, cpu or cuda")
    arch: str = setting("sd15", "the base family timed: its models are SD1.5-shaped", ("sd15",))
    tiny: bool = setting(False, "tiny random pipeline instead of SD1.5-shaped (for CPUs)")
    steps: int = steps_setting(40, "fast-finetune steps")
    relax: str = setting(RELAX_MODES[0], "the timed finetune's relaxation", RELAX_MODES)
    baseline_steps: int = steps_setting(50, "measured baseline steps (then extrapolated)")
    compile: str = setting(
        COMPILE_MODES[0],
        "torch.compile: full (CUDA graphs), regional (the UNet's repeated blocks) or none",
        COMPILE_MODES,
    )
    repeats: int = count_setting(3, "warm personalisations (and generations) timed (best reported)", high=1000)
    generate_steps: int = count_setting(25, "sampling steps of the timed generations", high=1000)
    first_images: int = count_setting(4, "pictures of the first grid, in the time to first images", high=64)
    photo: str = setting(
        str(ASSETS / "obama.jpg"), "face photo the time to first images starts from; aligning it needs dlib"
    )
    baselines: bool = setting(True, "time DreamBooth and DreamBooth-LoRA")
    channels_last: bool = setting(False, "also time eager steps with a channels-last UNet")
    cold_start: bool = setting(
        False, "also time a fresh process's first personalisation, compile cache empty, then warm"
    )
    count_operations: bool = setting(
        False, "only count the operations of a training step, per method (no timing; quick anywhere)"
    )
    dtype: str = setting("auto", "of the base model; auto: bf16 on GPUs that have it, fp32 on CPU", DTYPE_CHOICES)


BENCH_TRAINING_RESOLUTION = 256  # the tiny model's side: latents big enough to show in memory
BENCH_GROUP_SIZES = (1, 2, 4, 8)  # --step-costs: stage 1's identities a group, stage 2's samples


@dataclass
class BenchTrainingOptions(Checked):
    """`hdb bench-training`: stage 2's set-up, or a training step's costs (hdb.bench_training)."""

    identities: list[int] = setting([64, 1024], "identity counts", between=(2, 1 << 20))
    resolution: int = setting(
        BENCH_TRAINING_RESOLUTION, "training side of the tiny model", between=(64, 1024), multiple_of=8
    )
    step_costs: bool = setting(
        False,
        "instead: the per-sample training step's operations and FLOPs at a base's full-size shapes, its time on the "
        "tiny model here, an H200 estimate, per group size, and the frozen weights' memory",
    )
    group_sizes: list[int] = setting(list(BENCH_GROUP_SIZES), "with --step-costs", between=(1, 64))
    arch: str = setting(
        TINY_ARCHS[0],
        "with --step-costs: the base family whose full-size shapes are counted (sd15, flux: FLUX.1 [dev], sd3: "
        "SD3.5 Large)",
        TINY_ARCHS,
    )
    device: str = setting(
        "cpu",
        "with --step-costs, where the step is timed: cpu (the tiny model) or cuda (SD1.5-shaped)",
        ("cpu", "cuda"),
    )

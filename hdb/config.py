"""Every option a user can set, with its default, written once: the library, the CLI and the app read it here.

Plain dataclasses and choice lists, importable in a blink (no torch, no diffusers), so `python -m hdb
--help` is instant and every CLI default is the dataclass's own.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hdb.errors import HdbError

OPTIMIZERS = ("adamw", "adamw8bit")  # torch's AdamW, bitsandbytes' 8-bit AdamW
DTYPE_CHOICES = ("auto", "fp32", "fp16", "bf16")  # the precision the base model runs in
FILE_DTYPES = ("fp32", "fp16")  # what personal files and LoRA exports are written in
LORA_FORMATS = ("diffusers", "kohya")  # diffusers/peft keys; kohya keys (AUTOMATIC1111, ComfyUI)
TINY_ARCHS = ("sd15", "sdxl", "sd2")  # the tiny random pipelines hdb builds for offline tries and tests
# How the fast finetune relaxes the predicted rank-1 LiDB, the default first: "lidb", hdb's compact variant
# (the rank grows inside the aux bases: ~420 KB at SD1.5 size), or "lora", the paper's (a plain rank-r LoRA
# on top of the prediction, free of the aux bases: ~4.4 MB). The toy identifies people at least as well
# with "lidb" (docs/TOY.md); at SD scale, where the bases confine updates, it is unmeasured.
RELAX_MODES = ("lidb", "lora")
# Which augmented view of an identity stage 2 denoises, given the photo the hypernetwork sees: one of any of
# the identity's photos ("independent": it must predict the person, not the photo), or one of that very photo
# ("same": the paper's setting, one photo per CelebA-HQ identity). With one photo per identity they agree.
PAIRINGS = ("independent", "same")
LR_SCHEDULES = ("constant", "cosine")  # after the warm-up: keep the learning rate, or let it fall to 0 by the last step
MIXED_PRECISIONS = {"no": "fp32", "fp16": "fp16", "bf16": "bf16"}  # accelerate's choice -> the frozen base's dtype

# A rare token + the class noun; prompts name the person with "[V]", which stands for all of it ("sks face").
DEFAULT_INSTANCE_TOKEN = "sks face"


def instance_prompt_for(instance_token: str) -> str:
    """The prompt a person is trained with: the paper's "a [V] face" ("a sks face" with the default token)."""
    return f"a {instance_token}"


DEFAULT_INSTANCE_PROMPT = instance_prompt_for(DEFAULT_INSTANCE_TOKEN)


MAX_PHOTOS = 5  # photos of one person a personalisation takes
MAX_SEED = 2**63 - 1  # seeds go from 0 to this: what every torch generator accepts
SAME_PERSON = 0.9  # face similarity below which two photos probably show different people (see faces.py)
STEPS_WITH_HYPERNET = 40  # the paper's fast finetuning
STEPS_FROM_ZERO = 200  # no prediction to start from: more steps


@dataclass(frozen=True)
class LiDBConfig:
    """Shape of the personal weights. `a`, `b`: widths of the frozen aux bases; `rank`: the LoRA rank."""

    rank: int = 1
    a: int = 100
    b: int = 50
    seed: int = 0  # seeds the aux bases; weights only make sense with the seed they were made with

    def __post_init__(self) -> None:
        if min(self.rank, self.a, self.b) < 1:
            raise HdbError(f"LiDB rank, a and b must be positive, got r={self.rank}, a={self.a}, b={self.b}")


@dataclass
class PersonalizeConfig:
    """Options of `hdb.pipeline.PersonalPipeline.personalize` (fast finetuning from one photo)."""

    steps: int | None = None  # None: 40 from a hypernetwork prediction, 200 from zero
    relax: str = RELAX_MODES[0]  # see RELAX_MODES
    relaxed_rank: int = 4  # rank of what the fast finetune trains: the plain LoRA's, or the LiDB's
    learning_rate: float = 1e-3
    optimizer: str = OPTIMIZERS[0]  # or "adamw8bit" (bitsandbytes)
    gradient_checkpointing: bool = False
    seed: int = 0
    resolution: int | None = None  # None: the base model's native size (512 for SD1.5)
    instance_token: str = DEFAULT_INSTANCE_TOKEN
    lidb: LiDBConfig | None = None  # None: the hypernetwork's LiDB, else the default; a LiDB passed in must match
    progress: bool = True


@dataclass(frozen=True)
class DatasetSource:
    """Training photos from a Hugging Face dataset (`--dataset`) instead of a folder."""

    path: str  # hub id, or a folder written by `datasets.Dataset.save_to_disk`
    split: str = "train"
    image_column: str = "image"
    identity_column: str | None = None  # rows with the same value are one person; None: one person per row


@dataclass
class PreoptimizeConfig:
    """Options of `hdb.preoptimize.preoptimize` (stage 1)."""

    steps: int = 300  # per group of identities
    group_size: int = 4  # identities trained together, one batch element each
    learning_rate: float = 5e-3
    optimizer: str = OPTIMIZERS[0]
    gradient_checkpointing: bool = False
    seed: int = 0
    resolution: int | None = None
    instance_token: str = DEFAULT_INSTANCE_TOKEN
    lidb: LiDBConfig = field(default_factory=LiDBConfig)
    progress: bool = True


@dataclass
class HypernetTrainConfig:
    """Options of `hdb.train_hypernet.train_hypernetwork` (stage 2)."""

    steps: int = 1000
    batch_size: int = 4  # global: split across processes
    learning_rate: float = 1e-4
    alpha: float = 1.0  # diffusion loss weight
    beta: float = 1.0  # weight-space L2 to the pre-optimised weights (0: diffusion loss alone)
    accumulation_steps: int = 1
    optimizer: str = OPTIMIZERS[0]
    mixed_precision: str = "no"  # one of MIXED_PRECISIONS (accelerate autocast)
    gradient_checkpointing: bool = False
    checkpoint_every: int = 100
    validate_every: int = 100
    holdout: int = 1  # identities kept out of training for validation
    sample_steps: int = 20  # sampling steps of the validation image (0: no image)
    seed: int = 0
    # hub id / local path of a vision model (the paper's ViT-H), or "tiny" (random, for tests and the toy)
    image_encoder: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
    freeze_encoder: bool = True  # keep the pretrained encoder's features (the toy trains its random one)
    warmup_steps: int = 50  # 5% of the default steps: the freshly initialised decoder starts gently
    lr_schedule: str = "cosine"  # one of LR_SCHEDULES
    width: int = 512
    depth: int = 4
    heads: int = 8
    iterations: int = 4
    pairing: str = PAIRINGS[0]  # see PAIRINGS
    resolution: int | None = None
    # None: what the pre-optimised weights (--weights) were made with, else the defaults; a value that
    # disagrees with the weights' manifest is refused
    instance_token: str | None = None
    lidb: LiDBConfig | None = None
    progress: bool = True


# torch.compile of the base model: not at all; "full": the UNet and text encoder whole, with CUDA graphs (fastest
# steps, minutes to compile); "regional": each of the UNet's repeated transformer blocks (compiles much sooner)
COMPILE_MODES = ("none", "full", "regional")
# `app.py --compile`: regional compiles in a fraction of full's minutes, and needs no CUDA graphs, which would
# be re-recorded each time a visitor's person is merged into the weights
APP_COMPILE_MODE = "regional"


@dataclass
class BenchOptions:
    """Options of `python -m hdb bench`."""

    device: str = "auto"
    tiny: bool = False
    steps: int = 40
    relax: str = RELAX_MODES[0]  # how the timed finetune relaxes the prediction (see RELAX_MODES)
    baseline_steps: int = 50  # measured steps per baseline, then extrapolated
    compile: str = COMPILE_MODES[0]
    repeats: int = 3  # warm personalisations (and generations) timed; the best is reported
    generate_steps: int = 25  # sampling steps of the timed generations
    first_images: int = 4  # pictures of the first grid, in the time to first images
    photo: str = "assets/obama.jpg"  # the time to first images starts from it (aligning it needs dlib)
    baselines: bool = True
    channels_last: bool = False  # also time eager finetune steps with the UNet in channels-last layout
    cold_start: bool = False  # also time the first personalisation of two fresh processes: compile cache empty, warm
    count_operations: bool = False  # only count each way's operations per training step (no timing; quick anywhere)
    dtype: str = "auto"  # of the base model; "auto": bf16 on GPUs that have it, fp32 on CPU

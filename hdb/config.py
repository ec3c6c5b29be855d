"""Every option a user can set, with its default and help, written once: the library, the CLI and the app read it here.

Plain dataclasses and choice lists, importable in a blink (no torch, no diffusers), so `python -m hdb
--help` is instant. Each field carries its help (and allowed values) in its metadata, as peft's
`LoraConfig` does; the CLI builds its options from them (`hdb.arguments.config_option`), so an option's
default and help stand together, here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

from hdb.errors import HdbError

DEFAULT_BASE = "stable-diffusion-v1-5/stable-diffusion-v1-5"  # the base model users get by default
OPTIMIZERS = ("adamw", "adamw8bit")  # torch's AdamW, bitsandbytes' 8-bit AdamW
DTYPE_CHOICES = ("auto", "fp32", "fp16", "bf16")  # the precision the base model runs in
FILE_DTYPES = ("fp32", "fp16")  # what personal files and LoRA exports are written in
LORA_FORMATS = ("diffusers", "kohya")  # diffusers/peft keys; kohya keys (AUTOMATIC1111, ComfyUI)
# The frozen base's weights: as loaded ("none"), or quantised by bitsandbytes (through diffusers, on a CUDA GPU):
# "nf4", 4-bit NormalFloat as QLoRA's, or "int8"; the denoiser and the text encoders LiDB leaves alone (T5)
QUANTIZATIONS = ("none", "nf4", "int8")
TINY_ARCHS = ("sd15", "sdxl", "sd2", "flux", "sd3")  # the tiny random pipelines hdb builds for offline tries and tests
# Which layers LiDB targets (`hdb.families.Family.lidb_components`), the default first: "all", the attention
# projections of the denoiser and of the text encoder (CLIP's, for FLUX.1: not T5); "denoiser", the denoiser's alone;
# "double-blocks", FLUX.1's double-stream blocks (both streams) and CLIP, not its single-stream blocks. A family
# offers the choices that mean something for it (`Family.layer_choices`); docs/PAPER.md says why "all".
LIDB_LAYERS = ("all", "denoiser", "double-blocks")
# How the fast finetune relaxes the predicted rank-1 LiDB, the default first: "lora", the paper's (a plain rank-r
# LoRA on top of the prediction, free of the aux bases: ~4.4 MB at SD1.5 size), or "lidb", hdb's compact variant
# (the rank grows inside the aux bases: ~420 KB). The paper's is the default until evidence says otherwise: the
# toy's comparison of the two is in docs/TOY.md; at SD scale, where the bases confine updates, it is unmeasured.
RELAX_MODES = ("lora", "lidb")
# Stage 2's weight term: "dense" compares each layer's update B @ A to the target's, normalised by the target's
# energy (gauge-free, `hdb.lidb.weight_distance`); "paper" is the paper's raw L2 between the factors themselves.
WEIGHT_LOSSES = ("dense", "paper")
# Where the hypernetwork's refinement starts: "lora" (A random, B zero, as LoRA starts: the diffusion loss has a
# gradient at once) or "zero", the paper's (A = B = 0: a saddle, where only the weight term pulls at first).
HYPERNET_STARTS = ("lora", "zero")
# How the hypernetwork's decoder reads the face: "cross" (weight tokens cross-attend to the image tokens) or
# "concatenated", the paper's (image and weight tokens one sequence through self-attention layers).
DECODER_INPUTS = ("cross", "concatenated")
# Which augmented view of an identity stage 2 denoises, given the photo the hypernetwork sees: one of any of
# the identity's photos ("independent": it must predict the person, not the photo), or one of that very photo
# ("same": the paper's setting, one photo per CelebA-HQ identity). With one photo per identity they agree.
PAIRINGS = ("independent", "same")
LR_SCHEDULES = ("constant", "cosine")  # after the warm-up: keep the learning rate, or let it fall to 0 by the last step
REPORT_TO = ("tensorboard", "wandb", "none")  # stage 2's loss logs besides losses.jsonl (accelerate's trackers)
MIXED_PRECISIONS = {"no": "fp32", "fp16": "fp16", "bf16": "bf16"}  # accelerate's choice -> the frozen base's dtype
# torch.compile of the base model: not at all; "full": the UNet and text encoder whole, with CUDA graphs (fastest
# steps, minutes to compile); "regional": each of the UNet's repeated transformer blocks (compiles much sooner)
COMPILE_MODES = ("none", "full", "regional")

# A rare token + the class noun; prompts name the person with "[V]", which stands for all of it ("sks face").
DEFAULT_INSTANCE_TOKEN = "sks face"
MAX_TOKEN_CHARS = 100  # a token is a few words: every prompt carries it, once per [V]


def token_problem(token: object) -> str:
    """What is wrong with `token` as an instance token (a few words on one line), or ''. The token itself is not
    echoed: it may be long, or hold line breaks."""
    if not isinstance(token, str):
        return f"must be text, not {type(token).__name__}"
    if not token.strip():
        return f"is empty; it names the person in prompts, e.g. {DEFAULT_INSTANCE_TOKEN!r}"
    if len(token) > MAX_TOKEN_CHARS:
        return f"is {len(token):,} characters; at most {MAX_TOKEN_CHARS}"
    if not token.isprintable():  # control characters, line breaks, lone surrogates, separators other than a space
        return "holds line breaks, control characters or other unprintable ones; it is a few words on one line"
    return ""


def instance_prompt_for(instance_token: str) -> str:
    """The prompt a person is trained with: the paper's "a [V] face" ("a sks face" with the default token)."""
    return f"a {instance_token}"


DEFAULT_INSTANCE_PROMPT = instance_prompt_for(DEFAULT_INSTANCE_TOKEN)


MAX_PHOTOS = 5  # photos of one person a personalisation takes
MAX_SEED = 2**63 - 1  # seeds go from 0 to this: what every torch generator accepts
SAME_PERSON = 0.9  # face similarity below which two photos probably show different people (see faces.py)
STEPS_WITH_HYPERNET = 40  # the paper's fast finetuning
STEPS_FROM_ZERO = 200  # no prediction to start from: more steps


MAX_RANK = 64  # LiDB and plain LoRA ranks, in training and in files
MAX_AUX = 1024  # aux basis widths a, b (the paper's: 100, 50)
MAX_STEPS = 1_000_000
MAX_SIDE = 2048  # pixels of a training resolution or a picture side (SDXL's native 1024, twice)
# Messages show a value that may be anyone's input short: whole numbers from this size in scientific notation
# (1e+308, not 309 digits), other values' text cut after SHOWN_CHARS characters.
LONG_NUMBER, SHOWN_CHARS = 10**15, 40


def setting(
    default: Any = MISSING,
    help: str = "",
    choices: Sequence[str] | None = None,
    between: tuple[float, float] | None = None,
    multiple_of: int | None = None,
    problem: Callable[[object], str] | None = None,
    env: tuple[str, ...] = (),
) -> Any:
    """A dataclass field holding in its metadata its help, the values it allows where they are few (`choices`),
    the range of a number or of each number of a list (`between`, both ends included; `multiple_of`), and for other
    values a function that says what is wrong with one (`problem`, '' when nothing is), which `check_settings`
    enforces; `env`: the environment variables that set it where the app runs (the first one set wins)."""
    metadata: dict[str, Any] = {"help": help}
    if env:
        metadata["env"] = env
    if choices is not None:
        metadata["choices"] = tuple(choices)
    if between is not None:
        metadata["between"] = between
    if multiple_of is not None:
        metadata["multiple_of"] = multiple_of
    if problem is not None:
        metadata["problem"] = problem
    if isinstance(default, list):  # each config its own list
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def kept_on_resume(spec: Any) -> Any:
    """Mark a stage-2 setting (a `setting()` field) that a resumed run must share with the run it resumes: its
    checkpoints record it (hdb.checkpoints.check_resumable). The others, how often to checkpoint or where to
    report say, may change between restarts."""
    default = {"default": spec.default} if spec.default is not MISSING else {"default_factory": spec.default_factory}
    return field(**default, metadata={**spec.metadata, "kept_on_resume": True})


def shown_value(value: object) -> str:
    """`value` as a message shows it: short however large (a seed of 10**308 as 1e+308, a long text cut)."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= LONG_NUMBER:
        try:
            return f"{value:.3g}"
        except OverflowError:  # past a float's range (and str() refuses past 4,300 digits)
            digits = int(value.bit_length() * math.log10(2))
            return f"a {'negative ' if value < 0 else ''}number of about {digits:,} digits"
    text = repr(value)
    return text if len(text) <= SHOWN_CHARS else f"{text[:SHOWN_CHARS]}..."


def value_problem(value: object, between: tuple[float, float], whole: bool, multiple_of: int | None = None) -> str:
    """What is wrong with `value` as a number in `between` (whole, a multiple of `multiple_of`), or ''."""
    low, high = (f"{end:,}" if isinstance(end, int) else f"{end:g}" for end in between)
    kind = f"a whole number{f' and a multiple of {multiple_of}' if multiple_of else ''}" if whole else "a number"
    wrong = f"must be {kind} from {low} to {high}, not {shown_value(value)}"
    low, high = between
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:  # NaN fails too
        return wrong
    if whole and (value != int(value) or (multiple_of and int(value) % multiple_of)):
        return wrong
    return ""


def check_settings(config: object) -> None:
    """Refuse a config whose numbers are out of their fields' ranges, whose values are not among their fields'
    choices, or whose other values their fields' `problem` refuses, naming the setting as Python does."""
    hints = {f.name: f.type for f in fields(config)}
    for item in fields(config):
        value = getattr(config, item.name)
        if value is None:
            continue
        problem = ""
        if "between" in item.metadata:
            whole = "int" in str(hints[item.name])
            numbers = value if isinstance(value, list) else [value]
            problems = [
                value_problem(n, item.metadata["between"], whole, item.metadata.get("multiple_of")) for n in numbers
            ]
            problem = next((problem for problem in problems if problem), "")
        if "choices" in item.metadata and value not in item.metadata["choices"]:
            problem = f"must be one of {', '.join(map(str, item.metadata['choices']))}, not {shown_value(value)}"
        if "problem" in item.metadata:
            problem = problem or item.metadata["problem"](value)
        if problem:
            raise HdbError(f"`{item.name}` {problem}")


class Checked:
    """Mixin: a config checks its numbers when it is made (`check_settings`)."""

    def __post_init__(self) -> None:
        check_settings(self)


# Settings of the same meaning in several stages, described once
def _optimizer() -> Any:
    return setting(OPTIMIZERS[0], "adamw (torch's) or adamw8bit (bitsandbytes': less memory)", OPTIMIZERS)


def _gradient_checkpointing() -> Any:
    return setting(False, "less memory, slower steps")


def seed_setting() -> Any:
    return setting(0, "random seed: the same seed repeats a run", between=(0, MAX_SEED))


def _resolution() -> Any:
    return setting(
        None, "training resolution (default: the base model's, 512 for SD1.5)", between=(64, MAX_SIDE), multiple_of=64
    )


def _learning_rate(default: float) -> Any:
    return setting(default, "learning rate", between=(1e-12, 1.0))


def steps_setting(default: int | None, help: str, low: int = 1) -> Any:
    return setting(default, help, between=(low, MAX_STEPS))


def count_setting(default: int, help: str, low: int = 1, high: int = 65536) -> Any:
    return setting(default, help, between=(low, high))


def _instance_token() -> Any:
    return setting(
        DEFAULT_INSTANCE_TOKEN, "the rare token and class noun that [V] stands for in prompts", problem=token_problem
    )


def _progress() -> Any:
    return setting(True, "show a progress bar")


@dataclass(frozen=True)
class LiDBConfig(Checked):
    """Shape of the personal weights. `a`, `b`: widths of the frozen aux bases; `rank`: the LoRA rank."""

    rank: int = setting(1, "LiDB rank: the personal weights' rank as a LoRA (the paper's: 1)", between=(1, MAX_RANK))
    a: int = setting(100, "width of the frozen aux basis on the input side", between=(1, MAX_AUX))
    b: int = setting(50, "width of the frozen aux basis on the output side", between=(1, MAX_AUX))
    seed: int = setting(
        0, "seeds the aux bases; weights only make sense with the seed they were made with", between=(0, MAX_SEED)
    )
    layers: str = setting(
        LIDB_LAYERS[0],
        "the layers LiDB targets: all (the denoiser's and the text encoder's attention), denoiser (its alone), "
        "double-blocks (FLUX.1: its double-stream blocks and CLIP)",
        LIDB_LAYERS,
    )


@dataclass
class PersonalizeConfig(Checked):
    """Options of `hdb.pipeline.PersonalPipeline.personalize` (fast finetuning from one photo)."""

    steps: int | None = steps_setting(
        None,
        f"finetune steps (default {STEPS_WITH_HYPERNET} with a hypernetwork, {STEPS_FROM_ZERO} without; "
        "0: the hypernetwork's prediction alone)",
        low=0,
    )
    relax: str = setting(RELAX_MODES[0], "lora: a plain LoRA on top (the paper); lidb: compact", RELAX_MODES)
    relaxed_rank: int = setting(4, "rank of the relaxed finetune (the plain LoRA's or LiDB's)", between=(1, MAX_RANK))
    train_prediction: bool | None = setting(
        None, "whether the prediction itself trains too (default: lidb yes, lora no; the toy crosses them)"
    )
    learning_rate: float = _learning_rate(1e-3)
    optimizer: str = _optimizer()
    gradient_checkpointing: bool = _gradient_checkpointing()
    seed: int = seed_setting()
    resolution: int | None = _resolution()
    instance_token: str = _instance_token()
    lidb: LiDBConfig | None = setting(
        None, "shape of the personal weights (default: the hypernetwork's, else LiDBConfig()); one passed in must match"
    )
    progress: bool = _progress()


@dataclass(frozen=True)
class DatasetSource:
    """Training photos from a Hugging Face dataset instead of a folder."""

    path: str = setting(help="Hugging Face dataset: hub id, or a folder from Dataset.save_to_disk")
    split: str = setting("train", "dataset split")
    image_column: str = setting("image", "column holding the photos")
    identity_column: str | None = setting(None, "rows with the same value are one person (default: one per row)")


@dataclass
class PreoptimizeConfig(Checked):
    """Options of `hdb.preoptimize.preoptimize` (stage 1)."""

    steps: int = steps_setting(300, "steps per group of identities")
    group_size: int = count_setting(4, "identities trained together (one batch element each)")
    learning_rate: float = _learning_rate(5e-3)
    optimizer: str = _optimizer()
    gradient_checkpointing: bool = _gradient_checkpointing()
    seed: int = seed_setting()
    resolution: int | None = _resolution()
    instance_token: str = _instance_token()
    lidb: LiDBConfig = field(default_factory=LiDBConfig, metadata={"help": "shape of the pre-optimised weights"})
    # A group whose training diverges leaves a `<name>.failed.json` per identity and is not retried with the same
    # settings, where it would likely diverge again; retry after changing them (a lower learning rate).
    retry_failed: bool = setting(False, "train again the identities whose training diverged in an earlier run")
    progress: bool = _progress()


@dataclass(frozen=True)
class DecoderConfig(Checked):
    """The hypernetwork's transformer decoder, which stage 2 trains (`HypernetTrainConfig.decoder`) and which is saved
    with the weights it makes (`HyperNetworkConfig.decoder`, config.json), as nanoGPT saves its model_args."""

    width: int = count_setting(512, "width of the hypernetwork's transformer decoder")
    depth: int = count_setting(4, "layers of the decoder", high=256)
    heads: int = count_setting(8, "attention heads of the decoder", high=256)
    iterations: int = count_setting(4, "refinement iterations s", high=256)
    refine_from: str = setting(HYPERNET_STARTS[0], "refinement starts at lora (A random, B 0) or zero", HYPERNET_STARTS)
    decoder_input: str = setting(DECODER_INPUTS[0], "the decoder reads the face: cross or concatenated", DECODER_INPUTS)


@dataclass
class HypernetTrainConfig(Checked):
    """Options of `hdb.train_hypernet.train_hypernetwork` (stage 2)."""

    steps: int = kept_on_resume(steps_setting(1000, "training steps"))
    batch_size: int = kept_on_resume(count_setting(4, "global batch, split across processes"))
    learning_rate: float = kept_on_resume(_learning_rate(1e-4))
    alpha: float = kept_on_resume(setting(1.0, "diffusion loss weight", between=(0.0, 1e6)))
    beta: float = kept_on_resume(
        setting(
            1.0, "weight-L2 loss weight, to the pre-optimised weights (0: diffusion loss alone)", between=(0.0, 1e6)
        )
    )
    accumulation_steps: int = kept_on_resume(count_setting(1, "batches whose gradients add up to one step"))
    optimizer: str = kept_on_resume(_optimizer())
    mixed_precision: str = setting("no", "accelerate's autocast (the frozen base runs in it too)", MIXED_PRECISIONS)
    gradient_checkpointing: bool = _gradient_checkpointing()
    checkpoint_every: int = steps_setting(100, "steps between checkpoints (training resumes from the last)")
    checkpoints_total_limit: int = count_setting(1, "checkpoints kept, the newest (older ones go as new ones come)")
    validate_every: int = steps_setting(100, "steps between validations on the held-out identities")
    # diffusers' EMAModel: its decay warms up as (1 + n) / (10 + n) after n updates, up to `ema_decay`
    ema_decay: float = kept_on_resume(
        setting(
            0.0,
            "average the weights over the steps, e.g. 0.9999; the average is validated and saved (0: none)",
            between=(0.0, 0.999999),
        )
    )
    holdout: int = kept_on_resume(count_setting(1, "identities held out for validation", low=0, high=MAX_STEPS))
    sample_steps: int = count_setting(20, "sampling steps of the validation image (0: no image)", low=0, high=1000)
    dataloader_workers: int = count_setting(
        0, "processes that read batches ahead (0: the training process)", low=0, high=64
    )
    report_to: str = setting(REPORT_TO[0], "where the losses (and samples) go besides losses.jsonl", REPORT_TO)
    seed: int = kept_on_resume(seed_setting())
    image_encoder: str = kept_on_resume(
        setting(
            "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
            "vision model (the paper's ViT-H): hub id or directory, or tiny (random, for tests and the toy)",
        )
    )
    freeze_encoder: bool = kept_on_resume(
        setting(True, "freeze the pretrained image encoder (the toy trains its random one)")
    )
    # 5% of the default steps: the freshly initialised decoder starts gently
    warmup_steps: int = kept_on_resume(steps_setting(50, "linear learning-rate warm-up", low=0))
    lr_schedule: str = kept_on_resume(setting("cosine", "after the warm-up", LR_SCHEDULES))
    decoder: DecoderConfig = kept_on_resume(setting(DecoderConfig(), "the hypernetwork's decoder (DecoderConfig)"))
    weight_loss: str = kept_on_resume(
        setting(WEIGHT_LOSSES[0], "the weight term: dense (gauge-free) or paper (raw L2)", WEIGHT_LOSSES)
    )
    pairing: str = kept_on_resume(
        setting(PAIRINGS[0], "target view from any photo, or the input photo's own", PAIRINGS)
    )
    resolution: int | None = _resolution()
    instance_token: str | None = setting(
        None,
        f"default: what the pre-optimised weights were made with, else {DEFAULT_INSTANCE_TOKEN!r}; "
        "one that disagrees is refused",
        problem=token_problem,
    )
    lidb: LiDBConfig | None = setting(
        None, "default: what the pre-optimised weights were made with, else LiDBConfig(); one that disagrees is refused"
    )
    progress: bool = _progress()


@dataclass
class GenerateOptions(Checked):
    """How pictures of a person are drawn (`PersonalPipeline.generate`, `hdb generate`, `hdb eval`, the app's
    sliders): each default written once, here. None: the base's own (its family's and variant's)."""

    style: str = setting("None", "style preset (hdb.styles.STYLE_PRESETS)")
    negative_prompt: str | None = setting(None, "negative prompt (default: the style's)")
    steps: int | None = setting(None, "sampling steps (default: the base's own)", between=(1, 1000))
    guidance: float | None = setting(None, "guidance scale (default: the base's own)", between=(0.0, 100.0))
    seed: int = seed_setting()
    num_images: int = setting(1, "pictures drawn", between=(1, 64))
    strength: float = setting(
        1.0, "identity strength: 0 draws the base model, 1 the person as trained", between=(0.0, 10.0)
    )
    height: int | None = setting(
        None, "picture height (default: the base model's)", between=(64, MAX_SIDE), multiple_of=8
    )
    width: int | None = setting(
        None, "picture width (default: the base model's)", between=(64, MAX_SIDE), multiple_of=8
    )

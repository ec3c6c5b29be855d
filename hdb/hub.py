"""hdb on the Hugging Face Hub: hypernetworks and people's LoRAs, each uploaded with a model card.

`HyperNetwork.from_pretrained` and `--hypernet` take a hub id as well as a directory; this module is the
other direction. A card says what a user needs before trusting the files: for a hypernetwork, the base
model and its architecture fingerprint, the LiDB it predicts, how it was trained, its evaluation if one
was run, the licence and responsible use; for a person's LoRA, its base model, trigger phrase, how to
load it and the pictures its maker chose to show (the card's widget). Cards are built with huggingface_hub's
`ModelCard` and checked twice before anything is uploaded: here (the metadata parses back, `base_model` is a
hub id), then by the Hub itself (`ModelCard.validate`).

Nothing private is published: a base model or image encoder loaded from a local folder is named by the
folder's name only (and is not `base_model`, which the Hub requires to be a hub id), and the held-out
identities and the training photos' location stay out of the card and of the uploaded training.json.
A LoRA card whose base was a local folder loads its family's reference model instead (`Variant.reference`),
so its snippet runs for everyone. The card goes into the upload itself; the user's folder is left as it was.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hdb.errors import HdbError
from hdb.families import BASE_FAMILIES, FAMILIES, Variant, recorded_variant, variant_of
from hdb.files import read_regular_file, shown
from hdb.hypernet import CONFIG_FILE, TRAINING_FILE, HyperNetwork, config_values
from hdb.personal_file import PersonalWeights, hub_id, is_repo_id, public_name
from hdb.styles import expand_prompt

if TYPE_CHECKING:
    from huggingface_hub import CommitOperationAdd, ModelCard

CARD_FILE = "README.md"
PROJECT = "https://github.com/hdb-project/hdb"
# The licence of weights made from a base model is the base's (`Variant.license`): a base of unknown family gets
# none in a LoRA card's metadata.
RESPONSIBLE_USE = [
    "## Licence and responsible use",
    "",
    "The weights are released under the base model's licence terms (CreativeML OpenRAIL-M for Stable Diffusion",
    "1.5), whose use restrictions apply to everything generated with them. Only personalise or publish photos",
    "of yourself or of people who agreed to it; do not make images that deceive, harass or sexualise anyone,",
    "or that suggest a real person's endorsement.",
]
# A card for a person or hypernetwork made from a local folder, whose name means nothing to anyone else, loads the
# reference model of its base's variant instead (`hdb.families.Variant.reference`): the weights fit every base of
# that architecture.
UNKNOWN_BASE = "BASE_MODEL_ID"  # the snippet's stand-in when neither the base nor its family is known
# The pictures a LoRA card shows: the formats the Hub's gallery displays, each at most this large
PICTURE_SUFFIXES = {"PNG": ".png", "JPEG": ".jpg", "WEBP": ".webp"}
MAX_PICTURE_BYTES = 20 * 2**20


@dataclass
class Upload:
    url: str  # the repository on the Hub
    notes: list[str]  # warnings worth showing, e.g. a base model that is a local folder, not a hub id


def check_repo_id(repo_id: str) -> None:
    """Refuse, before anything is built or uploaded, a repository name the Hub would not take."""
    if not is_repo_id(repo_id):
        raise HdbError(f"{repo_id!r} is not a Hugging Face repository id; give one like 'your-name/hdb-hypernet'")


# ----------------------------------------------------------------------------- hypernetworks


def published_config(config: dict[str, Any]) -> dict[str, Any]:
    """A hypernetwork's config.json as the Hub gets it: the base model and image encoder by public name."""
    names = {key: public_name(config[key]) for key in ("base_model", "image_encoder") if config.get(key)}
    return {**config, **names}


def published_training(training: dict[str, Any]) -> dict[str, Any]:
    """training.json as the Hub gets it: how many identities were held out, not who (they may be real people),
    and not where the photos were; the image encoder by public name."""
    settings = dict(training["config"])
    if settings.get("image_encoder"):
        settings["image_encoder"] = public_name(settings["image_encoder"])
    private = ("held_out", "images")
    return {
        **{key: value for key, value in training.items() if key not in private},
        "config": settings,
        "held_out_identities": len(training.get("held_out", [])),
    }


def model_card(directory: str | Path, repo_id: str, evaluation: str | None = None) -> tuple[ModelCard, list[str]]:
    """The card of a saved hypernetwork directory to be published as `repo_id`, and notes for the user.

    `evaluation`: a Markdown table (`hdb eval`'s table.md). It is built from what would be uploaded
    (`published_config`, `published_training`), so it cannot say more than the upload does.
    """
    from huggingface_hub import ModelCardData

    directory = Path(directory)
    recorded = json.loads((directory / CONFIG_FILE).read_text())
    config = published_config(recorded)
    decoder = config_values(recorded)["decoder"]
    training_file = directory / TRAINING_FILE
    training = published_training(json.loads(training_file.read_text())) if training_file.is_file() else None
    base_id, base_text, notes = _base_model(recorded.get("base_model", ""))
    family = recorded.get("base_family", "")  # "" in configs from before hdb kept it
    variant = variant_of(family, recorded_variant(recorded), recorded.get("base_model", ""))
    reference_id, reference_name = (variant.reference, variant.title) if variant else ("", "")
    base_argument = base_id or reference_id or public_name(recorded.get("base_model", "")) or "unknown"
    if not base_id and reference_id:
        notes.append(f"The card's commands load {reference_id}, the reference model of the base's family.")
    licence = variant or FAMILIES[BASE_FAMILIES[0]].variant("")  # unknown: hdb's default base's, SD1.5
    data = ModelCardData(
        library_name="hdb",
        **_licence(licence),
        base_model=base_id,
        tags=["hyperdreambooth", "lora", "stable-diffusion", "face-personalization"],
    )
    lines = [
        "# HyperDreamBooth hypernetwork (hdb)",
        "",
        "Predicts a person's LiDB weights (a rank-1 LoRA through frozen random bases) from one face photo, the",
        "first step of [HyperDreamBooth](https://arxiv.org/abs/2307.06949); `hdb personalize` then finetunes",
        f"them for ~40 steps. Made with [hdb]({PROJECT}).",
        "",
        "## Use it",
        "",
        "```bash",
        f"pip install git+{PROJECT}",
        f"hdb personalize me.jpg --base {base_argument} --hypernet {repo_id} -o me.safetensors",
        "```",
        "",
        "```python",
        "from hdb.pipeline import PersonalPipeline",
        "",
        f'personal = PersonalPipeline.load("{base_argument}", hypernet="{repo_id}")',
        'personal.personalize("me.jpg")',
        'images = personal.generate("a [V] as an astronaut", num_images=4)',
        "```",
        "",
        "## What it predicts for",
        "",
        f"- Base model: {base_text}, architecture fingerprint `{config['arch_fingerprint']}`"
        f" ({config['num_layers']} LiDB layers). hdb refuses it for any other architecture.",
        *(
            [
                f"- The commands above load {reference_name} ([`{reference_id}`](https://huggingface.co/{reference_id})),"
                " the reference model of that base's family: the same architecture, on the Hub."
            ]
            if reference_id and not base_id
            else []
        ),
        f"- LiDB: rank {config['rank']}, a={config['a']}, b={config['b']}, aux seed {config['lidb_seed']}"
        f" (fingerprint `{config['aux_fingerprint']}`).",
        f"- Image encoder: `{config['image_encoder']}`; decoder width {decoder['width']}, depth {decoder['depth']},"
        f" {decoder['iterations']} refinement iterations.",
        "",
        "## Training",
        "",
        *_training_lines(training),
        "",
        "## Evaluation",
        "",
        evaluation.strip() if evaluation else "Not evaluated yet (`hdb eval`).",
        "",
        *RESPONSIBLE_USE,
    ]
    return _card(data, lines), notes


def _training_lines(training: dict[str, Any] | None) -> list[str]:
    """The card's account of a run (`published_training`'s record), or that none was kept."""
    if training is None:
        return ["Not recorded (no training.json beside the weights)."]
    settings = training["config"]
    return [
        f"- {training['steps_run']} steps on {training['identities']} identities, {training['processes']}"
        f" process(es); {training['held_out_identities']} more held out for validation.",
        f"- Batch {settings['batch_size']}, learning rate {settings['learning_rate']}, alpha {settings['alpha']}"
        f" (diffusion), beta {settings['beta']} (weights), mixed precision {settings['mixed_precision']}.",
        f"- Final validation loss: {training['final_validation_loss']}.",
    ]


def push_to_hub(
    directory: str | Path, repo_id: str, evaluation: str | None = None, private: bool = False, token: str | None = None
) -> Upload:
    """Check the directory loads as a hypernetwork, build and check its card, upload both in one commit."""
    from huggingface_hub import CommitOperationAdd

    check_repo_id(repo_id)
    directory = Path(directory)
    if not directory.is_dir():
        raise HdbError(f"Hypernetwork directory {directory} does not exist")
    HyperNetwork.from_pretrained(directory)  # a broken checkpoint fails here, not for the people who download it
    card, notes = model_card(directory, repo_id, evaluation)
    published = {CONFIG_FILE: published_config, TRAINING_FILE: published_training}
    files = []
    for path in sorted(directory.rglob("*")):
        relative = path.relative_to(directory)
        if not path.is_file() or relative.as_posix() == CARD_FILE or any(p.startswith(".") for p in relative.parts):
            continue  # an old card is replaced; hidden files (caches) are not the model's
        if relative.as_posix() in published:
            content = published[relative.as_posix()](json.loads(path.read_text()))
            files.append(CommitOperationAdd(relative.as_posix(), json.dumps(content, indent=2).encode()))
        else:
            files.append(CommitOperationAdd(relative.as_posix(), str(path)))
    return _upload(repo_id, files, card, notes, private, token, "hdb hypernetwork")


# ----------------------------------------------------------------------------- a person's LoRA


def lora_card(
    weights: PersonalWeights, repo_id: str, weight_name: str, pictures: Mapping[str, str] | None = None
) -> tuple[ModelCard, list[str]]:
    """The diffusers-style card of a person's exported LoRA (`hdb export`), to be published as `repo_id`
    with the file named `weight_name`: base model, trigger phrase, how to load it; and notes for the user.

    `pictures`: file name in the repository -> the prompt it was made with ([V] for the person), listed in the
    card's widget (the Hub's gallery) as diffusers' DreamBooth LoRA cards list theirs.
    """
    from huggingface_hub import ModelCardData

    pictures = pictures or {}
    base_id, base_text, notes = _base_model(weights.base_model)
    variant = variant_of(weights.base_family, weights.base_variant, weights.base_model)
    reference_id, reference_name = (variant.reference, variant.title) if variant else (None, "")
    loaded = base_id or reference_id or UNKNOWN_BASE  # what the snippet loads: a hub id anyone can download
    family = FAMILIES.get(weights.base_family)
    family_tags = list(family.card_tags if family else FAMILIES[BASE_FAMILIES[0]].card_tags)
    trigger = weights.instance_prompt
    widget = [
        {"text": expand_prompt(prompt, weights.instance_token), "output": {"url": name}}
        for name, prompt in pictures.items()
    ]
    data = ModelCardData(
        library_name="diffusers",
        **(_licence(variant) if variant else {}),
        base_model=base_id,
        instance_prompt=trigger,  # diffusers' DreamBooth cards name the trigger phrase so
        widget=widget or None,
        tags=["text-to-image", "diffusers", "lora", "template:sd-lora", *family_tags, "hyperdreambooth"],
    )
    if base_id:
        about_base = []
    elif reference_id:
        about_base = [
            "",
            f"The person was made on {base_text}, which is not on the Hub; the snippet loads its family's reference "
            f"model, {reference_name} ([`{reference_id}`](https://huggingface.co/{reference_id})), which the LoRA "
            "fits as it fits every base of that architecture. It looks most like its maker's pictures on the base it "
            "was made on.",
        ]
        notes.append(f"The card's snippet loads {reference_id}, the reference model of the base's family.")
    else:
        about_base = ["", f"Replace `{UNKNOWN_BASE}` with the hub id of the base it was made for ({base_text})."]
    lines = [
        "# A person's LoRA, made with hdb (HyperDreamBooth)",
        "",
        *(["<Gallery />", ""] if widget else []),
        f"One person's face as a LoRA for {base_text}: personalised from a photo with [hdb]({PROJECT})",
        f"([HyperDreamBooth](https://arxiv.org/abs/2307.06949)) and exported with `hdb export`. Rank "
        f"{weights.config.rank + weights.lora_rank}, on the attention layers of the UNet and text encoder(s).",
        "",
        f"**Trigger phrase: `{trigger}`**: write it where the person belongs in a prompt.",
        "",
        "## Use it",
        "",
        "```python",
        "import torch",
        "from diffusers import DiffusionPipeline",
        "",
        f'pipe = DiffusionPipeline.from_pretrained("{loaded}", torch_dtype=torch.float16).to("cuda")',
        f'pipe.load_lora_weights("{repo_id}", weight_name="{weight_name}")',
        f'image = pipe("{trigger} as an astronaut, oil painting").images[0]',
        "```",
        *about_base,
        "",
        "The file also loads in AUTOMATIC1111, ComfyUI and other tools that read LoRA files.",
        "",
        *RESPONSIBLE_USE,
    ]
    return _card(data, lines), notes


def push_lora(
    lora: str | Path,
    weights: PersonalWeights,
    repo_id: str,
    private: bool = False,
    token: str | None = None,
    pictures: Mapping[str | Path, str] | None = None,
) -> Upload:
    """Upload an exported LoRA file (`hdb.export.export_lora` of `weights`) with its card, in one commit.

    `pictures`: picture files the person was drawn in -> the prompt each was made with ([V] for the person),
    uploaded beside the LoRA as image_0.png, image_1.jpg, ... (their own names stay private) and shown by the card.
    """
    from huggingface_hub import CommitOperationAdd

    check_repo_id(repo_id)
    lora = Path(lora)
    uploads = [CommitOperationAdd(lora.name, str(lora))]
    shown_pictures = {}
    for index, (path, prompt) in enumerate((pictures or {}).items()):
        data, suffix = _picture(Path(path))
        name = f"image_{index}{suffix}"
        uploads.append(CommitOperationAdd(name, data))
        shown_pictures[name] = prompt
    card, notes = lora_card(weights, repo_id, lora.name, shown_pictures)
    return _upload(repo_id, uploads, card, notes, private, token, "hdb LoRA")


def _picture(path: Path) -> tuple[bytes, str]:
    """The bytes of the picture file `path` and the suffix of its format; an HdbError naming the file unless it is a
    whole PNG, JPEG or WebP picture (what the Hub's gallery shows) of at most MAX_PICTURE_BYTES."""
    from PIL import Image

    data = read_regular_file(path, MAX_PICTURE_BYTES, "Picture")
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.verify()  # the whole file, not only its header
            kind = image.format
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        kind = None
    if kind not in PICTURE_SUFFIXES:
        raise HdbError(f"{shown(path.name)} is not a PNG, JPEG or WebP picture; the card can show only those")
    return data, PICTURE_SUFFIXES[kind]


# ----------------------------------------------------------------------------- both


def _licence(variant: Variant) -> dict[str, str]:
    """A card's licence metadata: the base's licence id, and for "other" its name and link, as the Hub asks."""
    extra = {"license_name": variant.license_name, "license_link": variant.license_link} if variant.license_name else {}
    return {"license": variant.license, **extra}


def _base_model(recorded: str) -> tuple[str | None, str, list[str]]:
    """The base model a file was made for, as a card names it: its hub id (None for a local folder), the words
    the text names it with, and a note for the user when it is a local folder."""
    base_id = hub_id(recorded)
    if base_id:
        return base_id, f"[`{base_id}`](https://huggingface.co/{base_id})", []
    if not recorded:
        return None, "an unrecorded base model", []
    name = public_name(recorded)
    note = (
        f"The base model {recorded} is a local folder, not a hub id: the card names it `{name}` in its text and "
        "gives no base_model (the Hub takes hub ids only). Its users need that same base: train from the base's "
        "hub id to link the two."
    )
    return None, f"a local base named `{name}`", [note]


def _card(data: Any, lines: list[str]) -> ModelCard:
    from huggingface_hub import ModelCard

    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n")


def check_card(card: ModelCard) -> None:
    """What can be checked of a card here, before the Hub's own check: its front matter parses back to the same
    metadata, and its base_model, if any, is a hub id (a local path would be refused, and is private)."""
    from huggingface_hub import ModelCard

    try:
        parsed = ModelCard(str(card))
    except ValueError as error:
        raise HdbError(f"The model card's metadata does not parse: {error}") from None
    if parsed.data.to_dict() != card.data.to_dict():
        raise HdbError("The model card's metadata does not read back as it was written")
    bases = parsed.data.base_model or []
    for base in [bases] if isinstance(bases, str) else bases:
        if hub_id(base) != base:
            raise HdbError(f"The model card's base_model {base!r} is not a hub id")


def _upload(
    repo_id: str,
    files: list[CommitOperationAdd],
    card: ModelCard,
    notes: list[str],
    private: bool,
    token: str | None,
    what: str,
) -> Upload:
    """Check `card` (here, then by the Hub), then create the repository and commit `files` and the card at once."""
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError

    check_card(card)
    # offline, not logged in, no write access: OSError and ValueError, or the Hub's HTTP client's own errors
    # (HfHubHTTPError's other base; huggingface_hub has changed HTTP libraries before)
    failures = (OSError, ValueError, *HfHubHTTPError.__bases__)
    try:
        card.validate()
    except ValueError as error:  # the Hub answered: the card is refused
        raise HdbError(f"The Hub refused the model card for {repo_id}: {error}") from None
    except failures as error:
        raise HdbError(f"Could not reach the Hub to check the card for {repo_id}: {error}") from None
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        api.create_commit(
            repo_id,
            operations=[*files, CommitOperationAdd(CARD_FILE, str(card).encode())],
            commit_message=f"{what}, with its model card",
        )
    except failures as error:
        raise HdbError(f"Could not upload to {repo_id}: {error} (log in with `hf auth login`)") from None
    return Upload(f"https://huggingface.co/{repo_id}", notes)

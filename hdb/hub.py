"""hdb on the Hugging Face Hub: hypernetworks and people's LoRAs, each uploaded with a model card.

`HyperNetwork.from_pretrained` and `--hypernet` take a hub id as well as a directory; this module is the
other direction. A card says what a user needs before trusting the files: for a hypernetwork, the base
model and its architecture fingerprint, the LiDB it predicts, how it was trained, its evaluation if one
was run, the licence and responsible use; for a person's LoRA, its base model, trigger phrase and how to
load it. Cards are built with huggingface_hub's `ModelCard` and checked twice before anything is uploaded:
here (the metadata parses back, `base_model` is a hub id), then by the Hub itself (`ModelCard.validate`).

Nothing private is published: a base model or image encoder loaded from a local folder is named by the
folder's name only (and is not `base_model`, which the Hub requires to be a hub id), and the held-out
identities and the training photos' location stay out of the card and of the uploaded training.json.
The card goes into the upload itself; the user's folder is left as it was.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hdb.errors import HdbError
from hdb.hypernet import CONFIG_FILE, TRAINING_FILE, HyperNetwork
from hdb.personal_file import PersonalWeights, hub_id, is_repo_id, public_name

if TYPE_CHECKING:
    from huggingface_hub import CommitOperationAdd, ModelCard

CARD_FILE = "README.md"
PROJECT = "https://github.com/hdb-project/hdb"
# The licence of weights made from a base model is the base's: SD1.x CreativeML OpenRAIL-M, SD2.x and SDXL
# CreativeML Open RAIL++-M (hub licence ids). A base of unknown family gets none in the metadata.
LICENSES = {"sd1": "creativeml-openrail-m", "sd2": "openrail++", "sdxl": "openrail++"}
RESPONSIBLE_USE = [
    "## Licence and responsible use",
    "",
    "The weights are released under the base model's licence terms (CreativeML OpenRAIL-M for Stable Diffusion",
    "1.5), whose use restrictions apply to everything generated with them. Only personalise or publish photos",
    "of yourself or of people who agreed to it; do not make images that deceive, harass or sexualise anyone,",
    "or that suggest a real person's endorsement.",
]


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
    training_file = directory / TRAINING_FILE
    training = published_training(json.loads(training_file.read_text())) if training_file.is_file() else None
    base_id, base_text, notes = _base_model(recorded.get("base_model", ""))
    base_argument = base_id or public_name(recorded.get("base_model", "")) or "unknown"
    data = ModelCardData(
        library_name="hdb",
        license=LICENSES["sd1"],  # hdb's default base, SD1.5 (a hypernetwork's config does not record the family)
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
        f"- LiDB: rank {config['rank']}, a={config['a']}, b={config['b']}, aux seed {config['lidb_seed']}"
        f" (fingerprint `{config['aux_fingerprint']}`).",
        f"- Image encoder: `{config['image_encoder']}`; decoder width {config['width']}, depth {config['depth']},"
        f" {config['iterations']} refinement iterations.",
        "",
        "## Training",
        "",
    ]
    if training is None:
        lines.append("Not recorded (no training.json beside the weights).")
    else:
        settings = training["config"]
        lines += [
            f"- {training['steps_run']} steps on {training['identities']} identities, {training['processes']}"
            f" process(es); {training['held_out_identities']} more held out for validation.",
            f"- Batch {settings['batch_size']}, learning rate {settings['learning_rate']}, alpha {settings['alpha']}"
            f" (diffusion), beta {settings['beta']} (weights), mixed precision {settings['mixed_precision']}.",
            f"- Final validation loss: {training['final_validation_loss']}.",
        ]
    lines += ["", "## Evaluation", "", evaluation.strip() if evaluation else "Not evaluated yet (`hdb eval`).", ""]
    lines += RESPONSIBLE_USE
    return _card(data, lines), notes


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


def lora_card(weights: PersonalWeights, repo_id: str, weight_name: str) -> tuple[ModelCard, list[str]]:
    """The diffusers-style card of a person's exported LoRA (`hdb export`), to be published as `repo_id`
    with the file named `weight_name`: base model, trigger phrase, how to load it; and notes for the user."""
    from huggingface_hub import ModelCardData

    base_id, base_text, notes = _base_model(weights.base_model)
    base_argument = base_id or public_name(weights.base_model)
    family_tags = {"sdxl": ["stable-diffusion-xl", "stable-diffusion-xl-diffusers"]}.get(
        weights.base_family, ["stable-diffusion", "stable-diffusion-diffusers"]
    )  # the tags diffusers' own LoRA training scripts give
    trigger = weights.instance_prompt
    data = ModelCardData(
        library_name="diffusers",
        license=LICENSES.get(weights.base_family),
        base_model=base_id,
        instance_prompt=trigger,  # diffusers' DreamBooth cards name the trigger phrase so
        tags=["text-to-image", "diffusers", "lora", "template:sd-lora", *family_tags, "hyperdreambooth"],
    )
    lines = [
        "# A person's LoRA, made with hdb (HyperDreamBooth)",
        "",
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
        f'pipe = DiffusionPipeline.from_pretrained("{base_argument}", torch_dtype=torch.float16).to("cuda")',
        f'pipe.load_lora_weights("{repo_id}", weight_name="{weight_name}")',
        f'image = pipe("{trigger} as an astronaut, oil painting").images[0]',
        "```",
        "",
        "The file also loads in AUTOMATIC1111, ComfyUI and other tools that read LoRA files.",
        "",
        *RESPONSIBLE_USE,
    ]
    return _card(data, lines), notes


def push_lora(
    lora: str | Path, weights: PersonalWeights, repo_id: str, private: bool = False, token: str | None = None
) -> Upload:
    """Upload an exported LoRA file (`hdb.export.export_lora` of `weights`) with its card, in one commit."""
    from huggingface_hub import CommitOperationAdd

    check_repo_id(repo_id)
    lora = Path(lora)
    card, notes = lora_card(weights, repo_id, lora.name)
    return _upload(repo_id, [CommitOperationAdd(lora.name, str(lora))], card, notes, private, token, "hdb LoRA")


# ----------------------------------------------------------------------------- both


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

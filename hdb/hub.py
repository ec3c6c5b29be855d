"""Hypernetworks on the Hugging Face Hub: a model card written from what the checkpoint knows, and the upload.

`HyperNetwork.from_pretrained` and `--hypernet` take a hub id as well as a directory; this module is the
other direction. The card says what a user needs before trusting a hypernetwork: the base model and its
architecture fingerprint, the LiDB it predicts, how it was trained, its evaluation if one was run, the
licence, and how to use it responsibly.
"""

from __future__ import annotations

import json
from pathlib import Path

from hdb.errors import HdbError
from hdb.hypernet import CONFIG_FILE, TRAINING_FILE, HyperNetwork

CARD_FILE = "README.md"


def model_card(directory: str | Path, evaluation: str | None = None) -> str:
    """The README.md of a saved hypernetwork directory; `evaluation`: a Markdown table (`hdb eval`'s table.md)."""
    directory = Path(directory)
    config = json.loads((directory / CONFIG_FILE).read_text())
    training_file = directory / TRAINING_FILE
    training = json.loads(training_file.read_text()) if training_file.is_file() else None
    base = config.get("base_model") or "unknown"
    front = ["---", "library_name: hdb", "license: creativeml-openrail-m", "tags:", "- hyperdreambooth", "- lora"]
    front += ["- stable-diffusion", "- face-personalization"] + ([f"base_model: {base}"] if base != "unknown" else [])
    lines = [*front, "---", "", "# HyperDreamBooth hypernetwork (hdb)", ""]
    lines += [
        "Predicts a person's LiDB weights (a rank-1 LoRA through frozen random bases) from one face photo, the",
        "first step of [HyperDreamBooth](https://arxiv.org/abs/2307.06949); `hdb personalize` then finetunes",
        "them for ~40 steps. Made with [hdb](https://github.com/hdb-project/hdb).",
        "",
        "```bash",
        f"python -m hdb personalize me.jpg --base {base} --hypernet REPO_ID -o me.safetensors",
        "```",
        "",
        "## What it predicts for",
        "",
        f"- Base model: `{base}`, architecture fingerprint `{config['arch_fingerprint']}`"
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
            f"- {training['steps_run']} steps on {training['identities']} identities from `{training['images']}`,"
            f" {training['processes']} process(es); held out for validation: {', '.join(training['held_out'])}.",
            f"- Batch {settings['batch_size']}, learning rate {settings['learning_rate']}, alpha {settings['alpha']}"
            f" (diffusion), beta {settings['beta']} (weights), mixed precision {settings['mixed_precision']}.",
            f"- Final validation loss: {training['final_validation_loss']}.",
        ]
    lines += ["", "## Evaluation", "", evaluation.strip() if evaluation else "Not evaluated yet (`hdb eval`)."]
    lines += [
        "",
        "## Licence and responsible use",
        "",
        "The weights are released under the base model's licence terms (CreativeML OpenRAIL-M for Stable",
        "Diffusion 1.5), whose use restrictions apply to everything generated with them. Only personalise",
        "photos of yourself or of people who agreed to it; do not make images that deceive, harass or",
        "sexualise anyone, or that suggest a real person's endorsement.",
    ]
    return "\n".join(lines) + "\n"


def push_to_hub(
    directory: str | Path, repo_id: str, evaluation: str | None = None, private: bool = False, token: str | None = None
) -> str:
    """Check the directory loads as a hypernetwork, write its model card, upload it; returns the repo's URL."""
    from huggingface_hub import HfApi

    directory = Path(directory)
    if not directory.is_dir():
        raise HdbError(f"Hypernetwork directory {directory} does not exist")
    HyperNetwork.from_pretrained(directory)  # a broken checkpoint fails here, not for the people who download it
    (directory / CARD_FILE).write_text(model_card(directory, evaluation))
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=str(directory), commit_message="hdb hypernetwork")
    except (OSError, ValueError) as error:  # offline, not logged in, no write access, malformed id
        raise HdbError(f"Could not upload to {repo_id}: {error} (log in with `hf auth login`)") from None
    return f"https://huggingface.co/{repo_id}"

"""Stage 2's checkpoints: what one holds, writing it whole, and resuming only the run that wrote it.

A checkpoint (OUT/checkpoints/checkpoint-<step>, `latest` naming the newest) holds the hypernetwork, its optimizer's
state, the moving average of its weights if one is kept, and state.json: the step and the settings of its run
(`run_settings`). A run resumes the latest checkpoint only with the same settings (`check_resumable`).
"""

from __future__ import annotations

import json
import shutil
import warnings
from dataclasses import asdict, fields
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from hdb.cache import names_sha256
from hdb.config import HypernetTrainConfig, LiDBConfig
from hdb.errors import HdbError
from hdb.files import PARTIAL_SUFFIX, write_atomically
from hdb.hypernet import HyperNetwork
from hdb.training import save_optimizer

if TYPE_CHECKING:
    from diffusers.training_utils import EMAModel

# What a checkpoint records of its run, and a run resuming it must share (else it would not continue that run):
# the settings that shape the steps still to run (their data, noise, learning rates and loss) and the hypernetwork's,
# each marked where it is declared (`hdb.config.kept_on_resume`). The rest (how often to checkpoint or validate,
# where to report, gradient checkpointing, mixed precision...) may change between restarts, e.g. on other hardware.
RESUMED_SETTINGS = tuple(item.name for item in fields(HypernetTrainConfig) if item.metadata.get("kept_on_resume"))
# Settings added after some checkpoints were written, and what those checkpoints' runs had in effect
SETTINGS_ADDED_LATER = {"ema_decay": 0.0}
EMA_FILE = "ema.safetensors"  # in a checkpoint: the moving average of the trainable weights (`ema_decay`)


def resume_point(out: Path, settings: dict[str, object]) -> tuple[Path | None, int]:
    """The latest checkpoint in `out` and the step after it, if that checkpoint's run had these `settings`
    (`run_settings`); (None, 0) when there is none."""
    resume = latest_checkpoint(out)
    if resume is None:
        return None, 0
    state = json.loads((resume / "state.json").read_text())
    check_resumable(resume, state, settings)
    return resume, state["step"] + 1


def latest_checkpoint(out: Path) -> Path | None:
    pointer = out / "checkpoints" / "latest"
    return out / "checkpoints" / pointer.read_text().strip() if pointer.is_file() else None


def run_settings(
    config: HypernetTrainConfig,
    lidb_config: LiDBConfig,
    instance_token: str,
    resolution: int,
    train_names: list[str],
    held_out: list[str],
) -> dict[str, object]:
    """What a checkpoint records of its run (`RESUMED_SETTINGS`, and what they were resolved to), for
    `check_resumable`: the decoder's settings each by name, the identities as their count and a hash of their names,
    in order."""
    return {
        **{name: getattr(config, name) for name in RESUMED_SETTINGS if name != "decoder"},
        **asdict(config.decoder),
        "lidb": asdict(lidb_config),
        "instance_token": instance_token,
        "resolution": resolution,
        "identities": {
            "trained": len(train_names),
            "held_out": len(held_out),
            "names_sha256": names_sha256([train_names, held_out]),
        },
    }


def check_resumable(checkpoint: Path, state: dict, settings: dict[str, object]) -> None:
    """Refuse to resume `checkpoint` (its state.json's `state`) with other settings than its run's, naming each that
    differs."""
    saved = state.get("settings")
    if saved is None:  # a checkpoint of an hdb that did not record them: nothing to compare
        warnings.warn(f"{checkpoint} does not record its run's settings: resuming it unchecked", stacklevel=4)
        return
    saved = SETTINGS_ADDED_LATER | saved
    if isinstance(saved.get("lidb"), dict):  # its LiDB settings added later (`layers`) as those runs had them
        saved["lidb"] = asdict(LiDBConfig(**saved["lidb"]))
    differences = [
        f"{name}: {saved.get(name)!r} then, {value!r} now"
        for name, value in settings.items()
        if saved.get(name) != json.loads(json.dumps(value))  # as JSON gives it back (tuples become lists)
    ]
    if differences:
        raise HdbError(
            f"Cannot resume {checkpoint}: its run had other settings ({'; '.join(differences)}). "
            "Resume with the run's settings, or start afresh in another `out_dir`"
        )


def save_ema(ema: EMAModel, path: Path) -> None:
    """The moving average as safetensors: its weights in the order of the trainable parameters, and its count."""
    weights = {str(k): weight.detach().cpu().contiguous() for k, weight in enumerate(ema.shadow_params)}
    save_file(weights, str(path), metadata={"optimization_step": str(ema.optimization_step)})


def load_ema(ema: EMAModel, path: Path) -> None:
    with safe_open(str(path), framework="pt") as file:
        steps = int(file.metadata()["optimization_step"])
        weights = [file.get_tensor(str(k)).to(w.device) for k, w in enumerate(ema.shadow_params)]
    ema.load_state_dict({"optimization_step": steps, "shadow_params": weights})


def save_checkpoint(
    out: Path,
    step: int,
    hypernet: HyperNetwork,
    optimizer: torch.optim.Optimizer,
    ema: EMAModel | None,
    settings: dict[str, object],
    keep: int,
) -> None:
    """Write checkpoint-<step> whole, then point `latest` at it: a kill never leaves a half checkpoint in use.

    It holds the trained weights (and their moving average, if kept); its state.json the step and the run's
    `settings`; the newest `keep` checkpoints stay. A frozen image encoder (ViT-H: 2.5 GB) is left out: it is
    the one the run started from, loaded again on resume.
    """
    folder = out / "checkpoints"
    target = folder / f"checkpoint-{step}"

    def write_checkpoint(partial: Path) -> None:
        hypernet.save_pretrained(partial / "hypernet", image_encoder=not settings["freeze_encoder"])
        save_optimizer(optimizer, partial / "optimizer.safetensors")
        if ema is not None:
            save_ema(ema, partial / EMA_FILE)
        (partial / "state.json").write_text(json.dumps({"step": step, "settings": settings}))

    write_atomically(target, write_checkpoint)
    write_atomically(folder / "latest", lambda partial: partial.write_text(target.name))
    checkpoints = [path for path in folder.glob("checkpoint-*") if path.name.removeprefix("checkpoint-").isdigit()]
    checkpoints.sort(key=lambda path: int(path.name.removeprefix("checkpoint-")))
    for old in checkpoints[:-keep]:  # this one, the newest, always stays
        shutil.rmtree(old, ignore_errors=True)
    for stale in folder.glob(f"checkpoint-*{PARTIAL_SUFFIX}"):  # a killed run's unfinished checkpoint
        shutil.rmtree(stale, ignore_errors=True)

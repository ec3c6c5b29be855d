"""Evaluation as in the paper (HyperDreamBooth, Tables 1 and 3): generate each person in each prompt and score it.

`evaluate` scores personal files; `paper_protocol` first personalises each person from one photo by each of the
paper's rows (No Hyper, Only Hyper, k=1, the full method, and DreamBooth-LoRA), then scores each row alike.

Each generated image is compared with the person's reference photo (its aligned face crop):
- Face Rec.: cosine similarity of dlib's 128-d face descriptors (hdb.faces). An image in which no face
  is found gets no score; it counts against the "face detected" rate instead, which is reported beside.
- DINO: cosine of DINO ViT CLS embeddings, reference vs generated (subject fidelity).
- CLIP-I: cosine of CLIP image embeddings, reference vs generated (subject fidelity).
- CLIP-T: cosine of the CLIP embeddings of the prompt ([V] -> "person") and the image (prompt fidelity).
CLIP and DINO are named by hub id or local directory (`hdb eval` defaults: hdb.config.DEFAULT_CLIP and
DEFAULT_DINO; "none" leaves a column out). dlib's descriptors sit close together (different people score ~0.8,
the same person ~0.95), so Face Rec. numbers are not on the scale of the paper's face-recognition network.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from hdb.config import STEPS_WITH_HYPERNET, PersonalizeConfig
from hdb.errors import HdbError, from_hub_or_directory
from hdb.example_photos import ASSETS
from hdb.faces import AlignedFace, ImageSource, align_face, cosine, face_embedding, load_image
from hdb.generate import resolved_guidance, resolved_steps
from hdb.options import DREAMBOOTH_LORA_LR, DREAMBOOTH_LORA_STEPS
from hdb.personal_file import PersonalWeights, load_personal
from hdb.styles import PERSON, expand_prompt

if TYPE_CHECKING:
    from transformers.utils import ModelOutput

    from hdb.hypernet import HyperNetwork
    from hdb.pipeline import PersonalPipeline

COLUMNS = {"face_rec": "Face Rec.", "dino": "DINO", "clip_i": "CLIP-I", "clip_t": "CLIP-T"}
PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
EVAL_PROMPTS = ASSETS / "eval_prompts.txt"  # hdb's 30 prompts: contexts, styles, attributes


def _generated_descriptor(generated: ImageSource) -> np.ndarray | None:
    image = load_image(generated)  # an unreadable file is an error, not a missing face
    try:
        return face_embedding(image)
    except HdbError:  # the only error left: no face found
        return None


def identity_similarity(reference: AlignedFace | ImageSource, generated: ImageSource) -> float | None:
    """Cosine similarity of the dlib face descriptors; None when the generated image shows no face."""
    return identity_score([face_embedding(reference)], generated)


def identity_score(references: list[np.ndarray], generated: ImageSource) -> float | None:
    """Mean similarity of the generated face to reference descriptors (`face_embedding` of each photo,
    computed once); None when the generated image shows no face."""
    descriptor = _generated_descriptor(generated)
    return None if descriptor is None else sum(cosine(r, descriptor) for r in references) / len(references)


def identity_matrix(images: dict[str, ImageSource]) -> dict[tuple[str, str], float]:
    """Face similarity of every ordered pair of different images (each must show a face)."""
    descriptors = {}
    for name, image in images.items():
        try:
            descriptors[name] = face_embedding(image)
        except HdbError as error:
            raise HdbError(f"{name}: {error}") from None
    return {(a, b): cosine(descriptors[a], descriptors[b]) for a in images for b in images if a != b}


def _features(output: torch.Tensor | ModelOutput) -> torch.Tensor:
    # transformers 5 returns a model output (projected pooler_output) where 4.x returned the tensor
    return output if isinstance(output, torch.Tensor) else output.pooler_output


@dataclass
class Reference:
    face: AlignedFace
    descriptor: np.ndarray  # dlib 128-d
    embeddings: dict[str, torch.Tensor] = field(default_factory=dict)  # "clip_i" / "dino" -> image embedding


class Evaluator:
    """Scores generated images against a reference photo; CLIP / DINO models load on first use."""

    def __init__(self, clip: str | None = None, dino: str | None = None, device: str | torch.device = "cpu") -> None:
        self.clip_name, self.dino_name, self.device = clip, dino, torch.device(device)
        self._clip = self._dino = None

    def load(self) -> Evaluator:
        """Load the models now, so a bad name fails before any image is generated."""
        if self.clip_name:
            self._clip_models()
        if self.dino_name:
            self._dino_models()
        return self

    def _clip_models(self):
        if self._clip is None:
            from transformers import CLIPModel, CLIPProcessor

            model, processor = from_hub_or_directory(
                "CLIP model", self.clip_name, lambda p: (CLIPModel.from_pretrained(p), CLIPProcessor.from_pretrained(p))
            )
            self._clip = model.to(self.device).eval(), processor
        return self._clip

    def _dino_models(self):
        if self._dino is None:
            from transformers import AutoImageProcessor, AutoModel

            model, processor = from_hub_or_directory(
                "DINO model",
                self.dino_name,
                lambda p: (AutoModel.from_pretrained(p), AutoImageProcessor.from_pretrained(p)),
            )
            self._dino = model.to(self.device).eval(), processor
        return self._dino

    @torch.no_grad()
    def _clip_image(self, image: Image.Image) -> torch.Tensor:
        model, processor = self._clip_models()
        pixels = processor.image_processor(images=image, return_tensors="pt").pixel_values.to(self.device)
        return _features(model.get_image_features(pixel_values=pixels))[0].float().cpu()

    @torch.no_grad()
    def _clip_text(self, text: str) -> torch.Tensor:
        model, processor = self._clip_models()
        tokens = processor.tokenizer([text], padding=True, truncation=True, return_tensors="pt").to(self.device)
        return _features(model.get_text_features(**tokens))[0].float().cpu()

    @torch.no_grad()
    def _dino_image(self, image: Image.Image) -> torch.Tensor:
        model, processor = self._dino_models()
        pixels = processor(images=image, return_tensors="pt").pixel_values.to(self.device)
        # The CLS token of the last layer, as DreamBooth's DINO metric uses it
        # (ViT's pooler is untrained in DINO checkpoints)
        return model(pixel_values=pixels).last_hidden_state[0, 0].float().cpu()

    def reference(self, source: AlignedFace | ImageSource) -> Reference:
        """Align the reference photo once and embed its face crop with every model in use."""
        face = source if isinstance(source, AlignedFace) else align_face(source, size=512)
        reference = Reference(face, face_embedding(face))
        if self.clip_name:
            reference.embeddings["clip_i"] = self._clip_image(face.image)
        if self.dino_name:
            reference.embeddings["dino"] = self._dino_image(face.image)
        return reference

    def score(
        self, reference: Reference | AlignedFace | ImageSource, generated: ImageSource, prompt: str
    ) -> dict[str, float | None]:
        """Metric -> value for one generated image; face_rec is None when no face is found in it."""
        if not isinstance(reference, Reference):
            reference = self.reference(reference)
        image = load_image(generated)
        descriptor = _generated_descriptor(image)
        scores = {"face_rec": None if descriptor is None else cosine(reference.descriptor, descriptor)}
        if self.dino_name:
            scores["dino"] = cosine(reference.embeddings["dino"], self._dino_image(image))
        if self.clip_name:
            embedding = self._clip_image(image)
            scores["clip_i"] = cosine(reference.embeddings["clip_i"], embedding)
            scores["clip_t"] = cosine(self._clip_text(prompt.replace(PERSON, "person")), embedding)
        return scores


def _mean_row(name: str, samples: list[dict]) -> dict:
    row = {"name": name, "images": len(samples)}
    for key in COLUMNS:
        values = [s[key] for s in samples if s.get(key) is not None]
        row[key] = float(np.mean(values)) if values else None
    row["face_detected"] = sum(s["face_rec"] is not None for s in samples) / len(samples)
    return row


@dataclass
class EvalResult:
    rows: list[dict]  # one per person, then "all": mean of each metric and the face-detected rate
    samples: list[dict]  # one per generated image: person, prompt, scores
    prompts: list[str]
    images: dict[str, list[Image.Image]]  # person -> one image per prompt
    references: dict[str, Image.Image]  # person -> aligned reference crop
    settings: dict = field(default_factory=dict)

    def table_markdown(self) -> str:
        lines = ["| Person | " + " | ".join(COLUMNS.values()) + " | Face detected |", "|---" * (len(COLUMNS) + 2) + "|"]
        for row in self.rows:
            cells = ["-" if row[key] is None else f"{row[key]:.3f}" for key in COLUMNS]
            found = round(row["face_detected"] * row["images"])
            lines.append(
                f"| {row['name']} | " + " | ".join(cells) + f" | {row['face_detected']:.0%} ({found}/{row['images']}) |"
            )
        return "\n".join(lines)

    def grid(self) -> Image.Image:
        """People x (reference + prompts); the reference crop is resized to the generated images' size."""
        from diffusers.utils import make_image_grid

        size = next(iter(self.images.values()))[0].size
        tiles = [
            tile
            for name, images in self.images.items()
            for tile in [self.references[name].resize(size, Image.LANCZOS), *images]
        ]
        return make_image_grid(tiles, rows=len(self.images), cols=len(self.prompts) + 1)

    def to_json(self) -> str:
        return json.dumps(
            {"rows": self.rows, "samples": self.samples, "prompts": self.prompts, "settings": self.settings}, indent=1
        )

    def save(self, out_dir: str | Path) -> list[Path]:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "table.md").write_text(self.table_markdown() + "\n")
        (out / "results.json").write_text(self.to_json())
        self.grid().save(out / "grid.jpg", quality=92)
        return [out / "table.md", out / "results.json", out / "grid.jpg"]


def evaluate(
    personal: PersonalPipeline,
    people: dict[str, tuple[ImageSource, str | Path | PersonalWeights]],
    prompts: list[str],
    evaluator: Evaluator,
    seed: int = 0,
    steps: int | None = None,
    style: str = "None",
    guidance: float | None = None,
    on_sample: Callable[[dict], None] | None = None,
) -> EvalResult:
    """Generate one image per person x prompt (same seed for all), score each, and average per person and overall.

    Each person is loaded into `personal` in turn; afterwards it holds the last one.
    """
    if not people or not prompts:
        raise HdbError("Evaluation needs at least one person and one prompt")
    # Check every file and photo before the slow part: a bad one fails in seconds, not after the images.
    weights = {name: w if isinstance(w, PersonalWeights) else load_personal(w) for name, (_, w) in people.items()}
    references = {name: evaluator.reference(photo) for name, (photo, _) in people.items()}
    samples, images = [], {}
    # recorded below as drawn
    steps, guidance = resolved_steps(personal.pipe, steps), resolved_guidance(personal.pipe, guidance)
    for name, person in weights.items():
        personal.use(person)
        images[name] = []
        for prompt in prompts:
            image = personal.generate(prompt, style, steps=steps, guidance=guidance, seed=seed)[0]
            text = expand_prompt(prompt, "person", style).replace(
                person.instance_token, "person"
            )  # the prompt without the identifier
            sample = {"person": name, "prompt": prompt, **evaluator.score(references[name], image, text)}
            samples.append(sample)
            images[name].append(image)
            if on_sample:
                on_sample(sample)
    rows = [_mean_row(name, [s for s in samples if s["person"] == name]) for name in weights] + [
        _mean_row("all", samples)
    ]
    settings = {
        "seed": seed,
        "steps": steps,
        "style": style,
        "guidance": guidance,
        "clip": evaluator.clip_name,
        "dino": evaluator.dino_name,
    }
    return EvalResult(rows, samples, list(prompts), images, {n: r.face.image for n, r in references.items()}, settings)


def find_people(directory: str | Path) -> dict[str, tuple[Path, Path]]:
    """Pair NAME.safetensors with NAME.jpg/.png/... in `directory`: name -> (photo, personal file)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise HdbError(f"People directory not found: {directory}")
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise HdbError(f"No personal files (NAME.safetensors) in {directory}")
    people = {}
    for file in files:
        photos = [file.with_suffix(s) for s in PHOTO_SUFFIXES + tuple(s.upper() for s in PHOTO_SUFFIXES)]
        photo = next((p for p in photos if p.is_file()), None)
        if photo is None:
            raise HdbError(
                f"{file.name} has no reference photo beside it; add {file.stem}.jpg or {file.stem}.png to {directory}"
            )
        people[file.stem] = (photo, file)
    return people


def find_photos(directory: str | Path) -> dict[str, Path]:
    """One photo per person in `directory` (NAME.jpg, .png, ...): name -> photo, for the paper's protocol."""
    directory = Path(directory)
    if not directory.is_dir():
        raise HdbError(f"Photos directory not found: {directory}")
    photos = {p.stem: p for p in sorted(directory.iterdir()) if p.suffix.lower() in PHOTO_SUFFIXES}
    if not photos:
        raise HdbError(f"No photos ({', '.join(PHOTO_SUFFIXES)}) in {directory}: one per person, named after them")
    return photos


def read_prompts(path: str | Path) -> list[str]:
    """One prompt per line ([V] for the person); blank lines and # comments are skipped."""
    path = Path(path)
    if not path.is_file():
        raise HdbError(f"Prompts file not found: {path}")
    prompts = [
        line.strip() for line in path.read_text().splitlines() if line.strip() and not line.lstrip().startswith("#")
    ]
    if not prompts:
        raise HdbError(f"{path} holds no prompts (one per line, [V] for the person)")
    return prompts


# ----------------------------------------------------------------------------- the paper's protocol


@dataclass(frozen=True)
class Method:
    """One row of the paper's Tables 1 and 3: how each person is personalised from their photo."""

    label: str
    start: str  # "zero", "hypernet" or "hypernet_k1" (a hypernetwork trained with one refinement iteration)
    steps: int  # fast-finetune steps after the start
    lr: float = PersonalizeConfig.learning_rate


def protocol_methods(with_k1: bool, dreambooth_steps: int = DREAMBOOTH_LORA_STEPS) -> dict[str, Method]:
    """The rows `paper_protocol` fills: No Hyper, Only Hyper, k=1 (when given its hypernetwork), the full method,
    and DreamBooth-LoRA (a rank-4 LoRA from zero at its usual steps; the paper's DreamBooth trains the whole UNet,
    which a personal file cannot hold). `dreambooth_steps=0` leaves it out."""
    steps = STEPS_WITH_HYPERNET  # the paper's fast finetune
    methods = {
        "no_hyper": Method(f"No Hyper (fast finetune from zero, {steps} steps)", "zero", steps),
        "only_hyper": Method("Only Hyper (the prediction alone)", "hypernet", 0),
        "k1": Method(f"k=1 (hypernetwork trained with s=1 + {steps} steps)", "hypernet_k1", steps),
        "full": Method(f"HyperDreamBooth (prediction + {steps} steps)", "hypernet", steps),
        "dreambooth": Method(
            f"DreamBooth-LoRA (rank 4 from zero, {dreambooth_steps} steps)",
            "zero",
            dreambooth_steps,
            DREAMBOOTH_LORA_LR,
        ),
    }
    return {k: m for k, m in methods.items() if (k != "k1" or with_k1) and (k != "dreambooth" or dreambooth_steps)}


def paper_protocol(
    personal: PersonalPipeline,
    photos: dict[str, ImageSource],
    prompts: list[str],
    evaluator: Evaluator,
    hypernet_k1: HyperNetwork | None = None,
    config: PersonalizeConfig | None = None,
    dreambooth_steps: int = DREAMBOOTH_LORA_STEPS,
    seed: int = 0,
    steps: int | None = None,
    on_sample: Callable[[dict], None] | None = None,
) -> dict[str, EvalResult]:
    """The paper's evaluation: each person personalised from their one photo by each method of
    `protocol_methods`, then one image per person x prompt, scored (`evaluate`). `personal` must hold the trained
    hypernetwork; `config` the finetune's other settings (relaxation, seed...). Returns each method's label ->
    its result."""
    if personal.hypernet is None:
        raise HdbError(
            "The paper's protocol compares a trained hypernetwork with its ablations: give `personal` one "
            "(`PersonalPipeline.load(base, hypernet)`)"
        )
    if hypernet_k1 is not None:
        hypernet_k1.check_compatible(personal.lidb)
    config = config or PersonalizeConfig(progress=False)
    faces = {name: personal.faces(photo)[0] for name, photo in photos.items()}  # a photo without a face fails here
    results = {}
    for method in protocol_methods(hypernet_k1 is not None, dreambooth_steps).values():
        people = {}
        for name, face in faces.items():
            if method.start == "zero":
                start = personal.lidb.own.initial_weights()
            elif method.start == "hypernet_k1":
                start = hypernet_k1.predict(face.image)
            else:
                start = None  # personalize's own: the hypernetwork's prediction
            run = replace(config, steps=method.steps, learning_rate=method.lr)
            people[name] = (face.image, personal.personalize(face, run, start=start).weights)
        results[method.label] = evaluate(personal, people, prompts, evaluator, seed, steps, on_sample=on_sample)
    return results


def protocol_table(results: dict[str, EvalResult]) -> str:
    """The paper's Table 1/3 layout: one row per method (label -> result), each metric's mean over every person x
    prompt."""
    lines = ["| Method | " + " | ".join(COLUMNS.values()) + " | Face detected |", "|---" * (len(COLUMNS) + 2) + "|"]
    for label, result in results.items():
        row = result.rows[-1]  # "all"
        cells = ["-" if row[k] is None else f"{row[k]:.3f}" for k in COLUMNS]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {row['face_detected']:.0%} |")
    return "\n".join(lines)

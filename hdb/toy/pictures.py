"""The toy's pictures judged as the paper's Table 3 judges them: identity by a face recogniser, prompt fidelity by
a context detector, diversity by how far a model's pictures of one prompt lie apart.

The recogniser is a small CNN trained on the crowd's renders (colour and black and white) to read the world's
identity traits (`identity_traits`: skin, hair, eyes, proportions, glasses, beard). It is a recogniser of the
world's traits rather than light-normalised pixels against the person's renders: pixels would reward a picture that
copies the photo's pose and framing, while the paper's face recogniser asks who is in the picture, whatever its
light and pose. Like the paper's, it never saw the held-out people. A picture's identity distance to a person is the
distance between the traits read from it and those read from the person's own renders (their mean), in the
picture's context: the paper compares generated faces with the person's reference photos the same way.

The context detector is colourfulness (`colourfulness`): a picture asked for "in black and white" should be grey,
one asked for as a photo should have colour. Pictures whose colourfulness is under GREY_BELOW count as black and
white: the world's grey renders have 0, and fewer than 1% of its colour renders (the darkest) fall under it
(tests/test_toy_pictures.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from hdb.diffusion import sample_seed, to_pixels
from hdb.seeding import initialised_from
from hdb.toy.drawing import colourfulness
from hdb.toy.scores import identified
from hdb.toy.world import Person, identity_traits, in_black_and_white
from hdb.training import TrainConfig, train

PICTURES = 4  # per model and context: the same 4 seeds for every model (paired)
GREY_BELOW = 0.02  # colourfulness under which a picture is black and white
RECOGNISER_BATCH = 32
RECOGNISER_LR = 1e-3


class Recogniser(nn.Sequential):
    """64 px pictures ([B, 3, 64, 64] in [-1, 1]) -> the traits of the face in them ([B, traits])."""

    def __init__(self, traits: int) -> None:
        layers: list[nn.Module] = []
        for channels_in, channels_out in ((3, 16), (16, 32), (32, 64), (64, 64)):  # 64 -> 4 px
            layers += [nn.Conv2d(channels_in, channels_out, 3, stride=2, padding=1), nn.SiLU()]
        super().__init__(*layers, nn.Flatten(), nn.Linear(64 * 4 * 4, traits))

    @torch.no_grad()
    def read(self, pictures: list[Image.Image] | torch.Tensor) -> np.ndarray:
        """The traits of each picture (PIL images, or pixels in [-1, 1])."""
        pixels = to_pixels(pictures) if isinstance(pictures, list) else pictures
        return self(pixels.float()).numpy()


def train_recogniser(
    people: list[Person], steps: int, seed: int, progress: bool = True
) -> tuple[Recogniser, list[float]]:
    """A Recogniser fitted (squared error) to the traits of `people`'s photos, every other one in black and white as
    the base learns them: the recogniser, in eval mode and frozen, and its losses."""
    photos = [(photo, person.identity) for person in people for photo in person.photos]
    pixels = to_pixels([in_black_and_white(p) if i % 2 else p for i, (p, _) in enumerate(photos)])
    targets = torch.from_numpy(np.stack([identity_traits(identity) for _, identity in photos]))
    with initialised_from(seed):
        recogniser = Recogniser(targets.shape[1])

    def loss_fn(step: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(sample_seed(seed, "recogniser batch", step))
        picked = torch.randint(0, len(pixels), (RECOGNISER_BATCH,), generator=generator)
        return (recogniser(pixels[picked]) - targets[picked]).square().mean()

    config = TrainConfig(steps=steps, learning_rate=RECOGNISER_LR, lr_schedule="cosine", progress=progress,
                         description="training the face recogniser")  # fmt: skip
    losses = train(list(recogniser.parameters()), loss_fn, config).losses
    return recogniser.eval().requires_grad_(False), losses


def galleries(recogniser: Recogniser, people: list[Person]) -> np.ndarray:
    """[context, person, traits]: the mean traits read from each person's eval renders, as they are (context 0) and in
    black and white (context 1): what a picture of them in that context is compared with."""
    return np.stack(
        [
            np.stack([recogniser.read([look(r) for r in p.eval_renders]).mean(axis=0) for p in people])
            for look in (lambda r: r, in_black_and_white)
        ]
    )


@dataclass
class PictureScores:
    """One model's pictures of one person, per context (0: the instance prompt, 1: in black and white)."""

    distances: list[list[float]]  # [context][j]: mean distance of the pictures' traits to person j's gallery
    colourfulness: list[float]  # [context]: the pictures' mean
    grey: list[float]  # [context]: the share of pictures under GREY_BELOW
    diversity: list[float]  # [context]: mean distance between two of the pictures (pixels in [-1, 1], mean |a - b|)


def score_pictures(recogniser: Recogniser, gallery: np.ndarray, pictures: list[list[Image.Image]]) -> PictureScores:
    """Score `pictures[context]` (one model's, of one person) against `gallery` (`galleries`)."""
    scores = PictureScores([], [], [], [])
    for context, drawn in enumerate(pictures):
        pixels = to_pixels(drawn)
        traits = recogniser.read(pixels)
        distances = np.linalg.norm(traits[:, None, :] - gallery[context][None, :, :], axis=2).mean(axis=0)
        colour = colourfulness(pixels)
        pairs = [(a, b) for a in range(len(drawn)) for b in range(a + 1, len(drawn))]
        scores.distances.append(distances.tolist())
        scores.colourfulness.append(float(colour.mean()))
        scores.grey.append(float((colour < GREY_BELOW).float().mean()))
        scores.diversity.append(float(np.mean([(pixels[a] - pixels[b]).abs().mean() for a, b in pairs])))
    return scores


CONTEXTS = ("photo", "black_and_white")  # the pictures' two contexts, as the results name them


def picture_summary(label: str, per_person: list[PictureScores], identify: bool = True) -> dict:
    """One method's pictures over every held-out person (per_person[k]: person k's model's): in each context
    (CONTEXTS), identification (`identified`, of the [k, j] distances of model k's pictures to person j); the share of
    pictures in the context asked (colour for the photo prompt, grey for black and white: prompt fidelity), per
    person and in all; colourfulness; diversity. `identify`: False for one model shared by everyone (the base)."""
    in_context = np.array([[1 - p.grey[0], p.grey[1]] for p in per_person])  # [k, context]
    summary = {
        "in_context": in_context.mean(axis=0).tolist(),
        "in_context_per_person": in_context.tolist(),
        "colourfulness": np.mean([p.colourfulness for p in per_person], axis=0).tolist(),
        "diversity": np.mean([p.diversity for p in per_person], axis=0).tolist(),
        "diversity_per_person": [p.diversity for p in per_person],
    }
    if identify:
        for context, name in enumerate(CONTEXTS):
            summary[name] = identified(label, np.array([p.distances[context] for p in per_person]))
    return summary


PHOTO_COPY = "the photo itself as every picture (copying it: no diversity, never black and white)"


def photo_copy_row(recogniser: Recogniser, people: list[Person]) -> dict[str, dict]:
    """The pictures' memorising baseline, as a row of the results: a 'model' that draws each person's photo, unchanged,
    for every prompt. The recogniser's reading of the photo: what the best copy of it would score."""
    gallery = galleries(recogniser, people)
    copies = [score_pictures(recogniser, gallery, [[p.photos[0]] * PICTURES] * len(CONTEXTS)) for p in people]
    return {"photo_copy": {"label": PHOTO_COPY, "pictures": picture_summary(PHOTO_COPY, copies)}}


def save_recogniser(trained: tuple[Recogniser, list[float]], folder: Path) -> None:
    """A trained recogniser and its losses (`train_recogniser`'s), for `load_recogniser`."""
    recogniser, losses = trained
    save_file(recogniser.state_dict(), folder / "recogniser.safetensors")
    (folder / "losses.json").write_text(json.dumps(losses))


def load_recogniser(folder: Path) -> tuple[Recogniser, list[float]]:
    weights = load_file(folder / "recogniser.safetensors")
    recogniser = Recogniser(len(weights[next(reversed(weights))]))  # the last layer's bias: one per trait
    recogniser.load_state_dict(weights)
    return recogniser.eval().requires_grad_(False), json.loads((folder / "losses.json").read_text())

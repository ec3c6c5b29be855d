"""A synthetic world of faces: the paper's Table 3 in miniature, run on a CPU in minutes.

    random identities (colours, proportions, hair, glasses, beard), jittered renders at 64 px
    -> pre-train the tiny base UNet on renders of many people ("a photo of a person")
    -> stage 1: pre-optimise a LiDB per training identity        (hdb.preoptimize)
    -> stage 2: train the hypernetwork on the training identities (hdb.train_hypernet)
    -> held-out identities, personalised from ONE render each    (hdb.personalize)
    -> diffusion loss on OTHER renders of the same person, fixed noise and timesteps for every method

Every training stage goes through `hdb.training.train`, the same loop the real model uses. The
numbers are small-scale evidence that the pipeline learns, not a claim about SD1.5.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageEnhance

SIZE = 64  # the tiny pipeline's native resolution (8x8 latents)
DRAW_SCALE = 2  # draw at 2x and downsample: anti-aliased edges
HAIR_STYLES = ("bald", "short", "long", "bun")
GENERIC_PROMPT = "a photo of a person"


# ----------------------------------------------------------------------------- the synthetic world


@dataclass
class ToyIdentity:
    """What makes a person in this world; renders vary everything else."""

    name: str
    skin: tuple[int, int, int]
    hair: tuple[int, int, int]
    eyes: tuple[int, int, int]
    face_width: float  # fractions of the image side
    face_height: float
    eye_spacing: float  # distance between eye centres, fraction of the face width
    mouth_width: float  # fraction of the face width
    hair_style: str
    glasses: bool
    beard: bool


def _colour(rng: np.random.Generator, low: float, high: float) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.uniform(low, high, 3))


def random_identity(rng: np.random.Generator, name: str) -> ToyIdentity:
    # skin: a tone from dark to light, warm-tinted, so skins differ mainly in brightness
    tone = rng.uniform(0.25, 1.0)
    skin = (int(90 + 160 * tone), int(55 + 150 * tone), int(35 + 140 * tone))
    return ToyIdentity(
        name=name, skin=skin, hair=_colour(rng, 10, 230), eyes=_colour(rng, 20, 200),
        face_width=rng.uniform(0.36, 0.50), face_height=rng.uniform(0.48, 0.62),
        eye_spacing=rng.uniform(0.34, 0.52), mouth_width=rng.uniform(0.25, 0.55),
        hair_style=HAIR_STYLES[rng.integers(len(HAIR_STYLES))], glasses=bool(rng.random() < 0.35), beard=bool(rng.random() < 0.3),
    )


def render(identity: ToyIdentity, rng: np.random.Generator) -> Image.Image:
    """One 64x64 RGB photo of `identity`: jittered pose, scale, lighting and background."""
    side = SIZE * DRAW_SCALE
    scale = rng.uniform(0.9, 1.1)
    angle = rng.uniform(-10, 10)
    shift = rng.uniform(-0.06, 0.06, 2) * side
    face = Image.new("RGBA", (side, side), (0, 0, 0, 0))
    draw = ImageDraw.Draw(face)
    cx, cy = side / 2, side * 0.52
    w, h = identity.face_width * side * scale / 2, identity.face_height * side * scale / 2  # half axes

    def box(x: float, y: float, rx: float, ry: float) -> list[float]:
        return [x - rx, y - ry, x + rx, y + ry]

    hair = (*identity.hair, 255)
    draw.rectangle([cx - 0.35 * w, cy + 0.8 * h, cx + 0.35 * w, side], fill=(*identity.skin, 255))  # neck
    if identity.hair_style == "long":  # behind the face, down to the shoulders
        draw.rounded_rectangle([cx - 1.25 * w, cy - 1.2 * h, cx + 1.25 * w, cy + 1.1 * h], radius=w, fill=hair)
    if identity.hair_style == "bun":
        draw.ellipse(box(cx, cy - 1.15 * h, 0.45 * w, 0.3 * h), fill=hair)
    draw.ellipse(box(cx, cy, w, h), fill=(*identity.skin, 255))
    if identity.hair_style in ("short", "long", "bun"):  # a cap of hair over the top of the head
        draw.chord(box(cx, cy - 0.15 * h, 1.04 * w, 0.95 * h), 180, 360, fill=hair)
    if identity.beard:
        draw.chord(box(cx, cy + 0.2 * h, 0.98 * w, 0.8 * h), 20, 160, fill=hair)
    eye_y, eye_dx = cy - 0.12 * h, identity.eye_spacing * w
    eye_r = 0.13 * w
    for x in (cx - eye_dx, cx + eye_dx):
        draw.ellipse(box(x, eye_y, eye_r * 1.4, eye_r), fill=(245, 245, 240, 255))
        draw.ellipse(box(x, eye_y, eye_r * 0.7, eye_r * 0.7), fill=(*identity.eyes, 255))
        draw.line([x - eye_r * 1.4, eye_y - 1.8 * eye_r, x + eye_r * 1.4, eye_y - 2.0 * eye_r], fill=hair, width=max(2, int(eye_r / 2)))
        if identity.glasses:
            draw.ellipse(box(x, eye_y, eye_r * 2.1, eye_r * 1.8), outline=(20, 20, 20, 255), width=max(2, int(eye_r / 2.5)))
    if identity.glasses:
        draw.line([cx - eye_dx + eye_r * 2.1, eye_y, cx + eye_dx - eye_r * 2.1, eye_y], fill=(20, 20, 20, 255), width=2)
    nose = tuple(int(c * 0.8) for c in identity.skin)
    draw.polygon([(cx, eye_y + 0.1 * h), (cx - 0.1 * w, cy + 0.25 * h), (cx + 0.1 * w, cy + 0.25 * h)], fill=(*nose, 255))
    mouth_w = identity.mouth_width * w
    draw.chord(box(cx, cy + 0.45 * h, mouth_w, 0.12 * h), 0, 180, fill=(170, 40, 50, 255))

    face = face.rotate(angle, resample=Image.BICUBIC, center=(cx, cy), translate=tuple(shift))
    background = Image.new("RGBA", (side, side), (*_colour(rng, 30, 240), 255))
    photo = Image.alpha_composite(background, face).convert("RGB").resize((SIZE, SIZE), Image.LANCZOS)
    photo = ImageEnhance.Brightness(photo).enhance(rng.uniform(0.8, 1.2))
    return ImageEnhance.Contrast(photo).enhance(rng.uniform(0.8, 1.2))


def renders_grid(rows: list[list[Image.Image]], gap: int = 2) -> Image.Image:
    """Rows of equally sized images on one white sheet."""
    w, h = rows[0][0].size
    columns = max(len(row) for row in rows)
    sheet = Image.new("RGB", (columns * (w + gap) + gap, len(rows) * (h + gap) + gap), (255, 255, 255))
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            sheet.paste(image, (gap + c * (w + gap), gap + r * (h + gap)))
    return sheet

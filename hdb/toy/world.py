"""The toy's synthetic world: procedural people and jittered 64 px renders of them.

An identity is what stays fixed (skin, hair colour and style, eye colour, proportions, glasses,
beard); each render jitters pose, scale, light and background. Person i of a role depends on
(seed, role, i) only, so populations are reproducible whatever their size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter

SIZE = 64  # the tiny pipeline's native resolution (8x8 latents)
DRAW_SCALE = 2  # draw at 2x and downsample: anti-aliased edges
HAIR_STYLES = ("bald", "short", "long", "bun")
# How much renders of one person differ: scale, rotation (degrees), shift (fraction of the side), brightness and
# contrast, the light's colour (a gain per channel), background, blur, and shading (light from one side: a gain
# ramping across the picture, 1 in the middle, up to 1 +- shading at the edges, clipped: a shadow). Light varies
# most: matching the photo's pixels must identify few people (the memorising rows of the table), while a LiDB
# trained on 8 renders still identifies more. Brightness, contrast and colour are a per-channel affine change, which
# standardising each image undoes; the shading is not. Pose varies little: a few pixels of shift hid identity even
# from that LiDB (calibration probes, docs/TOY.md).
JITTER = {
    "scale": 0.03,
    "rotation": 3.0,
    "shift": 0.02,
    "light": 0.7,
    "colour": 0.4,
    "background": 20.0,
    "blur": 1.0,
    "shading": 1.5,
}


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


# Hair and eye colours come from palettes: a world a few dozen training people can cover.
HAIR_COLOURS = (
    (25, 20, 20),
    (90, 55, 30),
    (170, 120, 60),
    (225, 200, 120),
    (150, 40, 30),
    (200, 200, 205),
    (40, 90, 190),
    (60, 160, 80),
)
EYE_COLOURS = ((60, 40, 25), (50, 110, 170), (60, 140, 80), (110, 110, 120))


# The proportions' ranges, fractions of the image side (face) or of the face width (eyes, mouth)
PROPORTIONS = {
    "face_width": (0.44, 0.58),
    "face_height": (0.56, 0.70),
    "eye_spacing": (0.34, 0.52),
    "mouth_width": (0.25, 0.55),
}


def random_identity(rng: np.random.Generator, name: str) -> ToyIdentity:
    tone = rng.uniform(0.25, 1.0)  # skin from dark to light, warm-tinted
    skin = (int(90 + 160 * tone), int(55 + 150 * tone), int(35 + 140 * tone))
    hair, eyes = HAIR_COLOURS[rng.integers(len(HAIR_COLOURS))], EYE_COLOURS[rng.integers(len(EYE_COLOURS))]
    proportions = {trait: rng.uniform(low, high) for trait, (low, high) in PROPORTIONS.items()}
    return ToyIdentity(
        name=name,
        skin=skin,
        hair=hair,
        eyes=eyes,
        **proportions,
        hair_style=HAIR_STYLES[rng.integers(len(HAIR_STYLES))],
        glasses=bool(rng.random() < 0.35),
        beard=bool(rng.random() < 0.3),
    )


def identity_traits(identity: ToyIdentity) -> np.ndarray:
    """What the toy's face recogniser learns to read, each trait in [0, 1]: skin brightness, hair colour, eye colour
    and hair style (one-hot), the proportions (0 and 1 the ends of their ranges), glasses and beard."""
    one_hot = [
        np.eye(len(choices))[choices.index(value)]
        for value, choices in ((identity.hair, HAIR_COLOURS), (identity.eyes, EYE_COLOURS),
                               (identity.hair_style, HAIR_STYLES))
    ]  # fmt: skip
    proportions = [(getattr(identity, name) - low) / (high - low) for name, (low, high) in PROPORTIONS.items()]
    return np.concatenate(
        [[np.mean(identity.skin) / 255], *one_hot, proportions, [identity.glasses, identity.beard]]
    ).astype(np.float32)


def render(identity: ToyIdentity, rng: np.random.Generator) -> Image.Image:
    """One 64x64 RGB photo of `identity`: jittered pose, scale, lighting and background."""
    side = SIZE * DRAW_SCALE
    scale = rng.uniform(1 - JITTER["scale"], 1 + JITTER["scale"])
    angle = rng.uniform(-JITTER["rotation"], JITTER["rotation"])
    shift = rng.uniform(-JITTER["shift"], JITTER["shift"], 2) * side
    face = Image.new("RGBA", (side, side), (0, 0, 0, 0))
    draw = ImageDraw.Draw(face)
    cx, cy = side / 2, side * 0.52
    w, h = identity.face_width * side * scale / 2, identity.face_height * side * scale / 2  # half axes

    def box(x: float, y: float, rx: float, ry: float) -> list[float]:
        return [x - rx, y - ry, x + rx, y + ry]

    hair = (*identity.hair, 255)
    draw.rectangle([cx - 0.35 * w, cy + 0.8 * h, cx + 0.35 * w, cy + 1.5 * h], fill=(*identity.skin, 255))  # neck
    if identity.hair_style == "long":  # behind the face, down to the shoulders
        draw.rounded_rectangle([cx - 1.25 * w, cy - 1.2 * h, cx + 1.25 * w, cy + 1.1 * h], radius=w, fill=hair)
    if identity.hair_style == "bun":
        draw.ellipse(box(cx, cy - 1.15 * h, 0.45 * w, 0.3 * h), fill=hair)
    draw.ellipse(box(cx, cy, w, h), fill=(*identity.skin, 255))
    if identity.hair_style in ("short", "long", "bun"):  # a cap of hair over the top of the head
        draw.chord(box(cx, cy - 0.15 * h, 1.04 * w, 0.95 * h), 180, 360, fill=hair)
    if identity.beard:
        draw.chord(box(cx, cy + 0.3 * h, 0.9 * w, 0.68 * h), 15, 165, fill=hair)
    eye_y, eye_dx = cy - 0.12 * h, identity.eye_spacing * w
    eye_r = 0.13 * w
    for x in (cx - eye_dx, cx + eye_dx):
        draw.ellipse(box(x, eye_y, eye_r * 1.4, eye_r), fill=(245, 245, 240, 255))
        draw.ellipse(box(x, eye_y, eye_r * 0.7, eye_r * 0.7), fill=(*identity.eyes, 255))
        draw.line(
            [x - eye_r * 1.4, eye_y - 1.8 * eye_r, x + eye_r * 1.4, eye_y - 2.0 * eye_r],
            fill=hair,
            width=max(2, int(eye_r / 2)),
        )
        if identity.glasses:
            draw.ellipse(
                box(x, eye_y, eye_r * 2.1, eye_r * 1.8), outline=(20, 20, 20, 255), width=max(2, int(eye_r / 2.5))
            )
    if identity.glasses:
        draw.line([cx - eye_dx + eye_r * 2.1, eye_y, cx + eye_dx - eye_r * 2.1, eye_y], fill=(20, 20, 20, 255), width=2)
    nose = tuple(int(c * 0.8) for c in identity.skin)
    draw.polygon(
        [(cx, eye_y + 0.1 * h), (cx - 0.1 * w, cy + 0.25 * h), (cx + 0.1 * w, cy + 0.25 * h)], fill=(*nose, 255)
    )
    mouth_w = identity.mouth_width * w
    draw.chord(box(cx, cy + 0.45 * h, mouth_w, 0.12 * h), 0, 180, fill=(170, 40, 50, 255))

    face = face.rotate(angle, resample=Image.BICUBIC, center=(cx, cy), translate=tuple(shift))
    grey, tint = (
        135 + rng.uniform(-2, 2) * JITTER["background"],
        rng.uniform(-1, 1, 3) * JITTER["background"],
    )  # a muted colour
    background = Image.new("RGBA", (side, side), (*(int(grey + t) for t in tint), 255))
    photo = Image.alpha_composite(background, face).convert("RGB").resize((SIZE, SIZE), Image.LANCZOS)
    photo = ImageEnhance.Brightness(photo).enhance(rng.uniform(1 - JITTER["light"], 1 + JITTER["light"]))
    photo = ImageEnhance.Contrast(photo).enhance(rng.uniform(1 - JITTER["light"], 1 + JITTER["light"]))
    gains = rng.uniform(1 - JITTER["colour"], 1 + JITTER["colour"], 3)  # the light's colour
    tinted = np.clip(np.asarray(photo, dtype=np.float32) * gains * _shading(rng)[..., None], 0, 255).astype(np.uint8)
    return Image.fromarray(tinted).filter(ImageFilter.GaussianBlur(JITTER["blur"]))  # camera softness


def _shading(rng: np.random.Generator) -> np.ndarray:
    """Light from one side: a gain ramping across the picture in a random direction, 1 in the middle and up to
    1 +- JITTER["shading"] at the edges (clipped: a shadow where it falls below 0). It varies across the face, so
    standardising each channel, which undoes the light's brightness, contrast and colour, does not undo it."""
    angle, strength = rng.uniform(0, 2 * np.pi), rng.uniform(0, JITTER["shading"])
    across = (np.arange(SIZE) - (SIZE - 1) / 2) / (SIZE / 2)  # -1 .. 1 over the side
    return 1 + strength * (np.cos(angle) * across[None, :] + np.sin(angle) * across[:, None])


def in_black_and_white(photo: Image.Image) -> Image.Image:
    """The toy's second context: the same picture in shades of grey (RGB, as every render)."""
    return photo.convert("L").convert("RGB")


def central_pixels(photo: Image.Image, standardised: bool = False) -> np.ndarray:
    """The central half of a render, flattened: what the pixel nearest-neighbour baselines compare. `standardised`:
    each channel to mean 0 and standard deviation 1 first, which undoes any per-channel affine change of light."""
    quarter = SIZE // 4
    pixels = np.asarray(photo, dtype=np.float32)[quarter:-quarter, quarter:-quarter]
    if standardised:
        pixels = (pixels - pixels.mean(axis=(0, 1))) / (pixels.std(axis=(0, 1)) + 1e-6)
    return pixels.ravel()


@dataclass
class Person:
    """An identity with its renders: `photos` are what training (or personalisation) sees, `eval_renders` score it."""

    identity: ToyIdentity
    photos: list[Image.Image]
    eval_renders: list[Image.Image]
    extra_renders: list[Image.Image]  # held-out people only: what the upper bound trains on


def sample_people(
    seed: int, role: int, count: int, photos: int, eval_renders: int, prefix: str, extra_renders: int = 0
) -> list[Person]:
    """`count` people of one role (0 pre-training, 1 training, 2 test, 3 other); person i depends on (seed, role, i)."""
    people = []
    for index in range(count):
        rng = np.random.default_rng([seed, role, index])
        identity = random_identity(rng, f"{prefix}{index:03d}")
        shots = [render(identity, rng) for _ in range(photos)]
        evals = [render(identity, rng) for _ in range(eval_renders)]
        people.append(Person(identity, shots, evals, [render(identity, rng) for _ in range(extra_renders)]))
    return people

"""Generate pictures of a personalised person: prompts with [V], style presets, identity strength."""

from __future__ import annotations

import torch
from diffusers import DPMSolverMultistepScheduler
from PIL import Image

from hdb.errors import HdbError
from hdb.lidb import LiDB

PERSON = "[V]"  # how prompts name the person; replaced by the file's instance token
# One place for styles: the CLI, the app and the notebooks all read this table.
STYLE_PRESETS: dict[str, str] = {
    "None": "{prompt}",
    "Portrait photo": "{prompt}, professional portrait photo, 85mm, soft studio lighting, sharp focus",
    "Oil painting": "{prompt}, oil painting on canvas, visible brush strokes, by a classical master",
    "Watercolor": "{prompt}, delicate watercolor painting, soft pastel washes",
    "Pencil sketch": "{prompt}, detailed graphite pencil sketch, cross-hatching, on paper",
    "Pixar 3D": "{prompt}, as a 3D animated character, Pixar style, expressive, cinematic lighting",
    "Pop art": "{prompt}, pop art, bold colours, halftone dots, Andy Warhol style",
    "Cyberpunk": "{prompt}, cyberpunk, neon lights, rainy night city, highly detailed",
}
DEFAULT_NEGATIVE = "blurry, lowres, deformed, disfigured, extra limbs, bad anatomy, watermark, text"
EXAMPLE_PROMPTS = [
    f"a portrait of {PERSON}",
    f"{PERSON} as an astronaut on the moon",
    f"{PERSON} wearing a wizard hat, fantasy illustration",
    f"a close-up photo of {PERSON} smiling in a sunny park",
]


def expand_prompt(prompt: str, instance_token: str, style: str = "None") -> str:
    """Put the person and the style into the prompt: "[V] as a chef" -> "sks person as a chef, <style>"."""
    if style not in STYLE_PRESETS:
        raise HdbError(f"Unknown style {style!r}; choose one of: {', '.join(STYLE_PRESETS)}")
    if not prompt.strip():
        raise HdbError(f"The prompt is empty; describe a scene with {PERSON} for the person, e.g. '{EXAMPLE_PROMPTS[1]}'")
    return STYLE_PRESETS[style].format(prompt=prompt.replace(PERSON, instance_token).strip())


def mentions_person(prompt: str, instance_token: str) -> bool:
    return PERSON in prompt or instance_token in prompt


def generate(
    pipe,
    lidb: LiDB | None,
    prompt: str,
    negative_prompt: str = DEFAULT_NEGATIVE,
    steps: int = 25,
    guidance: float = 7.5,
    seed: int = 0,
    num_images: int = 1,
    identity_strength: float = 1.0,
    height: int | None = None,
    width: int | None = None,
) -> list[Image.Image]:
    """Sample `num_images` images of the already-expanded `prompt` with the person at `identity_strength`."""
    if steps < 1 or num_images < 1:
        raise HdbError("steps and the number of images must be at least 1")
    if lidb is not None:
        lidb.use_shared()
        lidb.set_scale(identity_strength)
    if not isinstance(pipe.scheduler, DPMSolverMultistepScheduler):  # good pictures in ~25 steps
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    generator = torch.Generator("cpu").manual_seed(seed)  # CPU generator: same seed, same picture on any device
    with torch.inference_mode():
        return pipe(
            prompt, negative_prompt=negative_prompt or None, num_inference_steps=steps, guidance_scale=guidance,
            num_images_per_prompt=num_images, generator=generator, height=height, width=width,
        ).images

"""Prompts: how they name the person ([V]) and the style presets the CLI, the app and the notebooks share."""

from __future__ import annotations

from hdb.errors import HdbError

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
        raise HdbError(
            f"The prompt is empty; describe a scene with {PERSON} for the person, e.g. '{EXAMPLE_PROMPTS[1]}'"
        )
    return STYLE_PRESETS[style].format(prompt=prompt.replace(PERSON, instance_token).strip())


def mentions_person(prompt: str, instance_token: str) -> bool:
    return PERSON in prompt or instance_token in prompt

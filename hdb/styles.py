"""Prompts and pictures: how prompts name the person ([V]), style presets with their negative prompts, and
picture sizes that suit the base model. The CLI, the app and the notebooks share them."""

from __future__ import annotations

from hdb.errors import HdbError, check_choice

PERSON = "[V]"  # how prompts name the person; replaced by the file's instance token
MAX_PROMPT_CHARS = 1000  # CLIP reads 77 tokens (a few hundred characters); a longer prompt only costs time
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
# What each style should steer away from, on top of DEFAULT_NEGATIVE (a painting is not a photo, ...).
STYLE_NEGATIVES: dict[str, str] = {
    "Portrait photo": "painting, drawing, illustration, cartoon, 3d render",
    "Oil painting": "photo, photograph, 3d render, cartoon",
    "Watercolor": "photo, photograph, 3d render, harsh lines",
    "Pencil sketch": "photo, colour, color, painting",
    "Pixar 3D": "photo, photograph, painting, sketch",
    "Pop art": "photo, photograph, dull colours",
    "Cyberpunk": "daylight, pastoral, washed out",
}
# Picture sizes the base models were trained to draw, by native resolution: SD1.x at 512, SDXL at 1024.
SIZE_PRESETS: dict[int, dict[str, tuple[int, int]]] = {
    512: {"Square": (512, 512), "Portrait": (512, 768), "Landscape": (768, 512)},
    1024: {"Square": (1024, 1024), "Portrait": (832, 1216), "Landscape": (1216, 832)},
}
# In the paper's wording: "[V]" is the person with the class noun ("sks face"), so "a [V] as ..." reads as
# the paper's "a [V] face as ...".
EXAMPLE_PROMPTS = [
    f"a portrait of a {PERSON}",
    f"a {PERSON} as an astronaut on the moon",
    f"a {PERSON} wearing a wizard hat, fantasy illustration",
    f"a close-up photo of a {PERSON} smiling in a sunny park",
]


def check_prompt(prompt: object, what: str = "prompt") -> str:
    """A prompt is Unicode text of at most MAX_PROMPT_CHARS characters (the text encoder reads 77 tokens of it
    anyway). A refusal does not echo the prompt."""
    if not isinstance(prompt, str):
        raise HdbError(f"The {what} must be text, not {type(prompt).__name__}")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise HdbError(f"The {what} is {len(prompt):,} characters long; at most {MAX_PROMPT_CHARS:,} are read")
    try:  # a lone surrogate (from a client's JSON, or a command line in another encoding) fails later otherwise
        prompt.encode("utf-8")
    except UnicodeEncodeError:
        raise HdbError(f"The {what} contains characters that are not valid Unicode text") from None
    return prompt


def expand_prompt(prompt: str, instance_token: str, style: str = "None") -> str:
    """Put the person and the style into the prompt: "a [V] as a chef" -> "a sks face as a chef, <style>"."""
    check_choice("style", style, STYLE_PRESETS)
    check_prompt(prompt)
    if not prompt.strip():
        raise HdbError(
            f"The prompt is empty; describe a scene with {PERSON} for the person, e.g. '{EXAMPLE_PROMPTS[1]}'"
        )
    with_person = prompt.replace(PERSON, instance_token).strip()
    if len(with_person) > MAX_PROMPT_CHARS:  # each [V] grows by the token's length
        raise HdbError(
            f"The prompt with the person's token in place of {PERSON} is {len(with_person):,} characters long; "
            f"at most {MAX_PROMPT_CHARS:,} are read"
        )
    return STYLE_PRESETS[style].format(prompt=with_person)


def mentions_person(prompt: str, instance_token: str) -> bool:
    return PERSON in prompt or instance_token in prompt


def negative_for(style: str) -> str:
    """The negative prompt that suits `style`."""
    extra = STYLE_NEGATIVES.get(style)
    return f"{DEFAULT_NEGATIVE}, {extra}" if extra else DEFAULT_NEGATIVE


def picture_size(preset: str, native: int) -> tuple[int, int]:
    """(width, height) of a size preset for a base model of `native` resolution (others scale SD1.x's)."""
    table = SIZE_PRESETS.get(native) or SIZE_PRESETS[512]
    check_choice("size", preset, table)
    width, height = table[preset]
    scale = 1 if native in SIZE_PRESETS else native / 512
    return round(width * scale / 8) * 8, round(height * scale / 8) * 8

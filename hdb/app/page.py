"""The page: what a visitor sees, and which handler each control calls (`hdb.app.handlers`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import gradio as gr

from hdb.app.engine import MAX_GUIDANCE, MAX_IMAGES, MAX_STRENGTH, Engine
from hdb.app.handlers import DIFFUSERS_FILE, KOHYA_FILE, PERSON_FILE, Handlers, visitor_error
from hdb.app.visitors import EXAMPLE_NAMES, VisitorFiles
from hdb.config import DEFAULT_INSTANCE_TOKEN, MAX_PHOTOS
from hdb.errors import HdbError
from hdb.example_photos import ASSETS
from hdb.faces import load_image
from hdb.styles import EXAMPLE_PROMPTS, SIZE_PRESETS, STYLE_PRESETS, negative_for

if TYPE_CHECKING:
    from gradio.data_classes import ImageData

EXAMPLE_PHOTOS = [str(ASSETS / name) for name in EXAMPLE_NAMES]
QUEUE_SIZE = 32  # requests waiting in the line every visitor shares (one per visitor: MAX_JOBS_PER_VISITOR)
NOTICE = (
    "**Responsible use.** Only personalise photos of yourself or of people who agreed to it. Do not make "
    "images that deceive, harass or sexualise anyone. Everything you send or make here (photos, face crops, "
    "personal weights, LoRA files, pictures) stays in your session and is deleted when you leave, or after "
    "an hour without a visit; everything when the app stops. "
    f"Up to {QUEUE_SIZE} requests wait in line, one per visitor at a time."
)


class PhotoInput(gr.Image):
    """gr.Image (as a file path) that hands over the upload itself, checked by hdb: a bad upload (not an image,
    damaged, too large) ends in a clear message, and no re-encoded copy is left in Gradio's cache, where the
    visitor's files would not know of it (gr.Image saves one), so that the upload goes when the visitor leaves."""

    is_template = True  # the page renders it as a plain gr.Image

    def preprocess(self, payload: ImageData | None) -> str | None:
        if payload is None:
            return None
        try:
            load_image(payload.path)  # decodes it, within hdb's size limits
        except HdbError as error:
            raise visitor_error(error) from None
        return payload.path


TIPS = """\
- **The photo**: one face, looking at the camera, evenly lit, not too small in the frame; no sunglasses,
  hats or hands over the face. Several faces in one photo: crop to the one you mean.
- **Identity strength** scales the personal weights: 1 is the person as trained, lower drifts towards
  the base model (more freedom for the style), a little above 1 insists on the likeness.
- **Without a hypernetwork** (none has been published yet) personalisation starts from zero and takes
  200 finetune steps instead of 40: slower, and the likeness from one photo is weaker than the paper's.
"""
DOWNLOADS_HELP = f"""\
**{PERSON_FILE}**: hdb's ~100 KB personal file, for `python -m hdb generate --person` or upload
above. **{KOHYA_FILE}**: a LoRA for AUTOMATIC1111 and ComfyUI (their `Lora` folder).
**{DIFFUSERS_FILE}**: a LoRA for diffusers:

```python
pipe.load_lora_weights(".", weight_name="{DIFFUSERS_FILE}")
image = pipe("a {DEFAULT_INSTANCE_TOKEN} as an astronaut").images[0]
```
Both LoRAs are exact; prompts name the person with the file's token (`{DEFAULT_INSTANCE_TOKEN}`).
"""


def identity_legend() -> str:
    """What identity scores mean, measured now on the shipped photos: one person's three, and other people."""
    from hdb.evaluate import identity_matrix

    photos = {name: ASSETS / name for name in ("obama.jpg", "obama2.jpg", "obama3.jpg", "biden.jpg", *EXAMPLE_NAMES)}
    scores = identity_matrix(photos)
    same = [v for (a, b), v in scores.items() if a.startswith("obama") and b.startswith("obama")]
    other = [v for (a, b), v in scores.items() if a.startswith("obama") != b.startswith("obama")]
    return (
        f"**Identity** in each caption: how close the face in the picture is to your photo's (dlib face "
        f"descriptors, cosine). On the shipped photos: the same person {min(same):.2f}-{max(same):.2f}, "
        f"different people {min(other):.2f}-{max(other):.2f}."
    )


def build_demo(engine: Engine, files: VisitorFiles) -> gr.Blocks:
    """The page. Gradio's cache goes wherever GRADIO_TEMP_DIR says when this runs (`main` points it at files)."""
    handlers = Handlers(engine, files)
    sizes = SIZE_PRESETS.get(engine.personal.resolution) or SIZE_PRESETS[512]
    with gr.Blocks(title="hdb: HyperDreamBooth", delete_cache=(600, 3600)) as demo:
        gr.Markdown(
            "# hdb: HyperDreamBooth\nOne photo of a face in; that person in any scene or style out. "
            "A ~100 KB personal file, made in seconds on a GPU."
        )
        if engine.tiny:
            gr.Markdown(
                "⚠️ **Tiny demo mode:** a tiny pipeline with random, untrained weights. The whole flow works, "
                "but the pictures are noise. Start without `--tiny` for Stable Diffusion.",
                elem_id="tiny-notice",
            )
        if engine.hypernet is None:
            gr.Markdown("No hypernetwork loaded: personalisation finetunes from zero (more steps, slower).")
        if engine.pipe.unet.device.type == "cpu":
            gr.Markdown(
                f"Running on a CPU: personalising takes {engine.estimate(engine.default_steps)}.",
                elem_id="cpu-estimate",
            )
        if engine.warm_up is not None:  # a function: read again at each page load, empty once compiled
            gr.Markdown(lambda: engine.warm_up_note, elem_id="warm-up")
        # a visitor's files go when they leave (unload), or when an idle session expires (a closed tab's
        # state is otherwise kept for an hour, in case the visitor comes back)
        session = gr.State(None, delete_callback=lambda s: s is not None and files.forget(s.key), time_to_live=3600)
        demo.unload(handlers.leave)
        with gr.Row():
            with gr.Column():
                photo = PhotoInput(label="Face photo", type="filepath", sources=["upload", "webcam"], elem_id="photo")
                gr.Examples(EXAMPLE_PHOTOS, inputs=photo)
                more_photos = gr.File(
                    label=f"More photos of the same person (optional, up to {MAX_PHOTOS - 1})",
                    file_count="multiple",
                    file_types=["image"],
                    elem_id="more-photos",
                )
                gr.Markdown(NOTICE)
                with gr.Accordion("Tips", open=False):
                    gr.Markdown(TIPS, elem_id="tips")
                consent = gr.Checkbox(label="I have the right to use this photo", elem_id="consent")
                with gr.Accordion("Personalisation options", open=False):
                    steps = gr.Slider(
                        0,
                        engine.max_finetune_steps,
                        value=0,
                        step=1,
                        label="Finetune steps (0: 40 with a hypernetwork, 200 without)",
                    )
                personalize_button = gr.Button("Personalise", variant="primary", elem_id="personalize")
                saved = gr.File(
                    label="Or upload a saved personal file", file_types=[".safetensors"], elem_id="upload-person"
                )
            with gr.Column():
                crop = gr.Image(label="Aligned face", interactive=False, elem_id="crop")
                status = gr.Markdown(elem_id="status")
                downloads = gr.File(
                    label="Your personal file and LoRA exports (kohya, diffusers)",
                    file_count="multiple",
                    interactive=False,
                )
                gr.Markdown(DOWNLOADS_HELP, elem_id="downloads-help")
        with gr.Row():
            with gr.Column():
                prompt = gr.Textbox(label="Prompt ([V] is the person)", value=EXAMPLE_PROMPTS[1], elem_id="prompt")
                prompt_examples = gr.Examples(EXAMPLE_PROMPTS, inputs=prompt)
                style = gr.Dropdown(list(STYLE_PRESETS), value="None", label="Style")
                with gr.Accordion("Generation options", open=False):
                    negative = gr.Textbox(label="Negative prompt (follows the style)", value=negative_for("None"))
                    size = gr.Radio(list(sizes), value=next(iter(sizes)), label="Size", elem_id="size")
                    strength = gr.Slider(0, MAX_STRENGTH, value=1.0, step=0.05, label="Identity strength")
                    gen_steps = gr.Slider(1, engine.max_sampling_steps, value=25, step=1, label="Sampling steps")
                    guidance = gr.Slider(1, MAX_GUIDANCE, value=7.5, step=0.5, label="Guidance")
                    with gr.Row():
                        seed = gr.Number(value=0, precision=0, label="Seed (the last one used)", elem_id="seed")
                        randomize = gr.Checkbox(value=True, label="Random seed", elem_id="randomize")
                    count = gr.Slider(1, MAX_IMAGES, value=2, step=1, label="Images")
                generate_button = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column():
                gallery = gr.Gallery(label="Gallery", columns=2, elem_id="gallery")
                gr.Markdown(identity_legend(), elem_id="identity-legend")

        # Every event that uses the pipeline shares one concurrency group: one job at a time, the rest wait in
        # line (engine.lock holds the same line should the queue settings change).
        pipeline = dict(concurrency_id="pipeline", concurrency_limit=1)
        photo.change(handlers.show_crop, [photo, session], [crop, status, session], api_name="align")
        more_photos.upload(handlers.note_uploads, [more_photos, session], session, api_name=False)
        pictures = [session, prompt, style, negative, strength, gen_steps, guidance, seed, randomize, size, count]
        personalize_button.click(
            handlers.personalize,
            [photo, consent, steps, session, more_photos],
            [crop, status, session, downloads],
            api_name="personalize",
            validator=handlers.may_personalize,
            **pipeline,
        ).success(handlers.generate, pictures, [gallery, seed], api_name=False, **pipeline)  # one click to pictures
        style.change(negative_for, style, negative, api_name=False)
        saved.upload(
            handlers.upload_person,
            [saved, session],
            [session, status, downloads],
            api_name="upload_person",
            validator=handlers.may_upload_person,
            **pipeline,
        )
        generate_button.click(
            handlers.generate,
            pictures,
            [gallery, seed],
            api_name="generate",
            validator=handlers.may_generate,
            **pipeline,
        )
        # a prompt example draws at once once there is a person; a photo example only shows its aligned crop:
        # personalising still waits for the visitor's consent and click
        prompt_examples.load_input_event.then(
            handlers.draw_example, pictures, [gallery, seed], api_name=False, **pipeline
        )
    demo.queue(max_size=QUEUE_SIZE)
    handlers.blocks = demo
    return demo

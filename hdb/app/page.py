"""The page: what a visitor sees, and which handler each control calls (`hdb.app.handlers`)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import TYPE_CHECKING

import gradio as gr
from gradio.data_classes import ListFiles
from gradio_client.utils import is_valid_file

from hdb.app.engine import FIRST_PICTURES, MAX_GUIDANCE, MAX_IMAGES, MAX_STRENGTH, QUOTA_MINUTES, ZERO_GPU_CARD, Engine
from hdb.app.handlers import DIFFUSERS_FILE, KOHYA_FILE, PERSON_FILE, Handlers
from hdb.app.line import LINE_SIZE, MAX_JOBS_PER_VISITOR, MAX_UPLOAD, Door
from hdb.app.visitors import EXAMPLE_NAMES, VisitorFiles
from hdb.config import DEFAULT_INSTANCE_TOKEN, MAX_PHOTOS, GenerateOptions
from hdb.example_photos import ASSETS
from hdb.families import denoiser, family_of
from hdb.styles import EXAMPLE_PROMPTS, SIZE_PRESETS, STYLE_PRESETS, negative_for

if TYPE_CHECKING:
    from gradio.data_classes import FileData, ImageData

EXAMPLE_PHOTOS = [str(ASSETS / name) for name in EXAMPLE_NAMES]
NOTICE = (
    "**Responsible use.** Only personalise photos of yourself or of people who agreed to it. Do not make "
    "images that deceive, harass or sexualise anyone. Everything you send or make here (photos, face crops, "
    "personal weights, LoRA files, pictures) stays in your session and is deleted when you leave, or after "
    "an hour without a visit; everything when the app stops. "
    f"Up to {LINE_SIZE} requests wait in line, {MAX_JOBS_PER_VISITOR} per visitor at a time."
)


class PhotoInput(gr.Image):
    """gr.Image that hands over the uploaded file itself (gr.Image would decode it and save a re-encoded copy in
    Gradio's cache, which the visitor's files would not know of: it would outlive the visitor). The handlers read
    it with hdb's own checks (`hdb.faces.load_image`: not an image, damaged, too large), each a clear message."""

    is_template = True  # the page renders it as a plain gr.Image

    def preprocess(self, payload: ImageData | None) -> str | None:
        return None if payload is None else payload.path


class SentFiles(gr.File):
    """gr.File that hands over the uploaded files' paths (gr.File's own preprocess also leaves an empty temporary
    file in Gradio's cache for every file of every call, kept until the app stops). File types are checked as
    gr.File checks them."""

    is_template = True  # the page renders it as a plain gr.File

    def preprocess(self, payload: ListFiles | FileData | None) -> str | list[str] | None:
        if payload is None:
            return None
        paths = [file.path for file in (payload if isinstance(payload, ListFiles) else [payload])]
        allowed = self.file_types or []
        if allowed and not all(is_valid_file(path, allowed) for path in paths):
            raise gr.Error(f"Invalid file type. Please upload a file that is one of these formats: {allowed}")
        return paths[0] if self.file_count == "single" else paths


TIPS = """\
- **The photo**: one face, looking at the camera, evenly lit, not too small in the frame; no sunglasses,
  hats or hands over the face. Several faces in one photo: crop to the one you mean.
- **Identity strength** scales the personal weights: 1 is the person as trained, lower drifts towards
  the base model (more freedom for the style), a little above 1 insists on the likeness.
- **Without a hypernetwork** (none has been published yet) personalisation starts from zero and takes
  200 finetune steps instead of 40: slower, and the likeness from one photo is weaker than the paper's.
"""
PERSON_HELP = f"""\
**{PERSON_FILE}**: hdb's personal file (a few MB: the prediction and the LoRA its finetune trained),
for `python -m hdb generate --person` or upload above."""
KOHYA_HELP = f"**{KOHYA_FILE}**: a LoRA for AUTOMATIC1111 and ComfyUI (their `Lora` folder)."
DIFFUSERS_HELP = f"""\
**{DIFFUSERS_FILE}**: a LoRA for diffusers (ComfyUI reads it too where the base has no kohya file):

```python
pipe.load_lora_weights(".", weight_name="{DIFFUSERS_FILE}")
image = pipe("a {DEFAULT_INSTANCE_TOKEN} as an astronaut").images[0]
```
The LoRAs are exact; prompts name the person with the file's token (`{DEFAULT_INSTANCE_TOKEN}`).
"""


def downloads_help(lora_formats: tuple[str, ...]) -> str:
    """What each download is, for the LoRA formats the base's family exports (`Family.lora_formats`)."""
    kohya = f" {KOHYA_HELP}" if "kohya" in lora_formats else ""
    return f"{PERSON_HELP}{kohya}\n{DIFFUSERS_HELP}"


LINKS = (
    "· [paper](https://arxiv.org/abs/2307.06949) · [code](https://github.com/hdb-project/hdb) · "
    "[how to cite](#citation)"
)
CITATION = """<a id="citation"></a>Ruiz et al., *HyperDreamBooth: HyperNetworks for Fast Personalization of
Text-to-Image Models*, CVPR 2024 ([arXiv 2307.06949](https://arxiv.org/abs/2307.06949)). This demo: hdb, Apache-2.0."""


def page_notes(engine: Engine) -> list[tuple[str, str]]:
    """One line each on what this server is: tiny, without a hypernetwork, on a CPU, on ZeroGPU."""
    notes = []
    if engine.tiny:
        notes.append((
            "⚠️ **Tiny demo mode:** a tiny pipeline with random, untrained weights. The whole flow works, "
            "but the pictures are noise. Start without `--tiny` for Stable Diffusion.",
            "tiny-notice",
        ))  # fmt: skip
    if engine.hypernet is None:
        notes.append(("No hypernetwork loaded: personalisation finetunes from zero (more steps, slower).", "no-hyper"))
    if denoiser(engine.pipe).device.type == "cpu":
        notes.append(
            (f"Running on a CPU: personalising takes {engine.estimate(engine.default_steps)}.", "cpu-estimate")
        )
    if engine.zero_gpu:
        notes.append((
            f"On ZeroGPU ({ZERO_GPU_CARD}), time on the GPU comes from your daily quota: {engine.default_steps} "
            "finetune steps by default, so that a first personalisation and its pictures fit the quota of a visitor "
            f"who is not signed in ({QUOTA_MINUTES['anonymous']} minutes a day). Signed in on huggingface.co, you "
            f"spend your own account's quota: {QUOTA_MINUTES['free account']} minutes a day, {QUOTA_MINUTES['PRO']} "
            "with PRO.",
            "zero-gpu",
        ))  # fmt: skip
    return notes


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
    with gr.Blocks(title="hdb: HyperDreamBooth", delete_cache=(600, 3600)) as demo:
        # One short header line: on a laptop screen (1280x800) the photo, the button and the pictures all fit
        # without scrolling; everything else (options, downloads, tips) waits below, in accordions.
        gr.Markdown(f"## hdb: HyperDreamBooth · one face photo in, that person in any scene or style out {LINKS}")
        for note, elem_id in page_notes(engine):
            gr.Markdown(note, elem_id=elem_id)
        if engine.warm_up is not None:  # a function: read again at each page load, empty once compiled
            gr.Markdown(lambda: engine.warm_up_note, elem_id="warm-up")
        # a visitor's files go when they leave (unload), or when an idle session expires (a closed tab's
        # state is otherwise kept for an hour, in case the visitor comes back)
        session = gr.State(None, delete_callback=lambda s: s is not None and files.forget(s.key), time_to_live=3600)
        demo.unload(handlers.leave)
        page = SimpleNamespace(session=session, **vars(_photo_and_pictures()), **vars(_options(engine)))
        with gr.Row():
            gr.DuplicateButton("Duplicate this Space for your own GPU", size="sm")
            gr.Markdown(CITATION)
        _connect(handlers, page)
    demo.queue(max_size=LINE_SIZE)  # Gradio's own limit; hdb.app.line's door keeps it (and more) under a crowd
    handlers.blocks = demo
    return demo


def _photo_and_pictures() -> SimpleNamespace:
    """The first row: the photo and the Personalise button; the pictures, the prompt and the Generate button."""
    with gr.Row(equal_height=False):
        with gr.Column(scale=2, min_width=320):
            photo = PhotoInput(
                label="Face photo", type="filepath", sources=["upload", "webcam"], height=260, elem_id="photo"
            )
            gr.Examples(EXAMPLE_PHOTOS, inputs=photo, examples_per_page=len(EXAMPLE_PHOTOS))
            consent = gr.Checkbox(label="I have the right to use this photo", elem_id="consent")
            personalize_button = gr.Button("Personalise", variant="primary", elem_id="personalize")
            status = gr.Markdown(elem_id="status")
        with gr.Column(scale=3, min_width=400):
            gallery = gr.Gallery(label="Pictures", columns=2, height=380, elem_id="gallery")
            with gr.Row():
                prompt = gr.Textbox(
                    label="Prompt ([V] is the person)", value=EXAMPLE_PROMPTS[1], scale=4, elem_id="prompt"
                )
                style = gr.Dropdown(list(STYLE_PRESETS), value=GenerateOptions.style, label="Style", scale=2)
            generate_button = gr.Button("Generate", variant="primary", elem_id="generate")
            prompt_examples = gr.Examples(EXAMPLE_PROMPTS, inputs=prompt)
    return SimpleNamespace(
        photo=photo, consent=consent, personalize_button=personalize_button, status=status, gallery=gallery,
        prompt=prompt, style=style, generate_button=generate_button, prompt_examples=prompt_examples,
    )  # fmt: skip


def _options(engine: Engine) -> SimpleNamespace:
    """The second row, folded away: the aligned face and the downloads, the personalisation and generation options,
    the tips."""
    sizes = SIZE_PRESETS.get(engine.personal.resolution) or SIZE_PRESETS[512]
    with gr.Row(equal_height=False):
        with gr.Column():
            with gr.Accordion("Your aligned face, personal file and LoRA exports", open=False):
                crop = gr.Image(label="Aligned face", interactive=False, height=256, elem_id="crop")
                downloads = gr.File(
                    label="Your personal file and LoRA exports",
                    file_count="multiple",
                    interactive=False,
                )
                gr.Markdown(downloads_help(family_of(engine.pipe).lora_formats), elem_id="downloads-help")
            with gr.Accordion("Personalisation options", open=False):
                more_photos = SentFiles(
                    label=f"More photos of the same person (optional, up to {MAX_PHOTOS - 1})",
                    file_count="multiple",
                    file_types=["image"],
                    elem_id="more-photos",
                )
                steps = gr.Slider(
                    0,
                    engine.max_finetune_steps,
                    value=0,
                    step=1,
                    label=f"Finetune steps (0: {engine.default_steps}, the default here)",
                )
                saved = SentFiles(
                    label="Or upload a saved personal file", file_types=[".safetensors"], elem_id="upload-person"
                )
        with gr.Column():
            with gr.Accordion("Generation options", open=False):
                negative = gr.Textbox(
                    label="Negative prompt (follows the style)", value=negative_for(GenerateOptions.style)
                )
                size = gr.Radio(list(sizes), value=next(iter(sizes)), label="Size", elem_id="size")
                strength = gr.Slider(
                    0, MAX_STRENGTH, value=GenerateOptions.strength, step=0.05, label="Identity strength"
                )
                most, start = engine.max_sampling_steps, engine.default_sampling_steps
                gen_steps = gr.Slider(1, most, value=start, step=1, label="Sampling steps")
                guidance = gr.Slider(1, MAX_GUIDANCE, value=engine.default_guidance, step=0.5, label="Guidance")
                with gr.Row():
                    seed = gr.Number(
                        value=GenerateOptions.seed, precision=0, label="Seed (the last one used)", elem_id="seed"
                    )
                    randomize = gr.Checkbox(value=True, label="Random seed", elem_id="randomize")
                count = gr.Slider(1, MAX_IMAGES, value=FIRST_PICTURES, step=1, label="Images")
            with gr.Accordion("Tips, identity scores, responsible use", open=False):
                gr.Markdown(TIPS, elem_id="tips")
                gr.Markdown(identity_legend(), elem_id="identity-legend")
                gr.Markdown(NOTICE)
    return SimpleNamespace(
        crop=crop, downloads=downloads, more_photos=more_photos, steps=steps, saved=saved, negative=negative,
        size=size, strength=strength, gen_steps=gen_steps, guidance=guidance, seed=seed, randomize=randomize,
        count=count,
    )  # fmt: skip


def _connect(handlers: Handlers, page: SimpleNamespace) -> None:
    """The page's events. Every event that uses the pipeline shares one concurrency group: one job at a time, the
    rest wait in line (engine.lock holds the same line should the queue settings change)."""
    pipeline = dict(concurrency_id="pipeline", concurrency_limit=1)
    session = page.session
    align = dict(api_name="align", validator=handlers.may_align)
    page.photo.change(handlers.show_crop, [page.photo, session], [page.crop, page.status, session], **align)
    page.more_photos.upload(handlers.note_uploads, [page.more_photos, session], session, api_name=False)
    pictures = [
        session, page.prompt, page.style, page.negative, page.strength, page.gen_steps, page.guidance, page.seed,
        page.randomize, page.size, page.count,
    ]  # fmt: skip
    drawn = [page.gallery, page.seed]
    page.personalize_button.click(
        handlers.personalize,
        [page.photo, page.consent, page.steps, session, page.more_photos],
        [page.crop, page.status, session, page.downloads],
        api_name="personalize",
        validator=handlers.may_personalize,
        **pipeline,
    ).success(handlers.generate, pictures, drawn, api_name=False, **pipeline)  # one click to pictures
    page.style.change(negative_for, page.style, page.negative, api_name=False)
    page.saved.upload(
        handlers.upload_person,
        [page.saved, session],
        [session, page.status, page.downloads],
        api_name="upload_person",
        validator=handlers.may_upload_person,
        **pipeline,
    )
    page.generate_button.click(handlers.generate, pictures, drawn, api_name="generate", **pipeline)
    # a prompt example draws at once once there is a person; a photo example only shows its aligned crop:
    # personalising still waits for the visitor's consent and click
    page.prompt_examples.load_input_event.then(handlers.draw_example, pictures, drawn, api_name=False, **pipeline)


def serve(
    demo: gr.Blocks,
    files: VisitorFiles,
    host: str,
    port: int,
    share: bool = False,
    behind_spaces_proxy: bool = False,
    **launch: object,
) -> tuple:
    """Serve the page with hdb's door in front of Gradio's line (`hdb.app.line.Door`); returns what `launch` does.

    `behind_spaces_proxy`: visitors' addresses are read from Hugging Face's proxy. `launch`: more of Gradio's
    launch options (a test passes prevent_thread_lock and quiet)."""
    from starlette.middleware import Middleware

    door = Middleware(Door, blocks=demo, files=files, behind_spaces_proxy=behind_spaces_proxy)
    return demo.launch(
        server_name=host, server_port=port, share=share, max_file_size=MAX_UPLOAD, app_kwargs={"middleware": [door]},
        **launch,
    )  # fmt: skip

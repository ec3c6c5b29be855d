"""hdb demo: one photo of a face in, that person in any scene or style out (Gradio, Spaces ready).

    python app.py                       # SD1.5 from the hub (or HDB_BASE), GPU if there is one
    python app.py --tiny                # tiny random pipeline: the whole flow offline, in seconds, on a CPU

    python app.py --compile             # a dedicated GPU: compile the model in the background at start

Every option is also an environment variable (HDB_BASE, HDB_HYPERNET, HDB_DEVICE, HDB_DTYPE,
HDB_OPTIMIZER, HDB_TINY, HDB_COMPILE), which is how a Hugging Face Space sets them.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import logging
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import gradio as gr

from hdb import DEFAULT_BASE, HdbError
from hdb.config import APP_COMPILE_MODE, DEFAULT_INSTANCE_TOKEN, DTYPE_CHOICES, MAX_PHOTOS, OPTIMIZERS
from hdb.styles import EXAMPLE_PROMPTS, SIZE_PRESETS, STYLE_PRESETS, expand_prompt, negative_for, picture_size

if TYPE_CHECKING:
    import numpy as np
    from gradio.data_classes import ImageData
    from PIL import Image

    from hdb.faces import AlignedFace

# ZeroGPU lends a GPU only inside functions marked with spaces.GPU, charges a visitor's daily quota by the
# duration a call *asks* for, and stops a call that runs past it. So each GPU function asks for what its
# work needs: seconds per unit of work at 512 px, estimated from hdb's H200 measurements (docs/BENCHMARKS.md:
# 0.24 s an eager fp16 finetune step, 1.13 s a 25-step image) with a margin for a shared GPU slice.
GPU_SECONDS = {"setup": 10.0, "finetune_step": 0.35, "image_step": 0.08}
MAX_GPU_SECONDS = 180  # what one call may ask for at most; the sliders' limits are set so their work fits
MAX_FINETUNE_STEPS, MAX_SAMPLING_STEPS, MAX_IMAGES = 400, 100, 4
# the largest size preset's pixels over the native square's (SD1.x's portrait: 1.5)
MAX_AREA = max(w * h / native**2 for native, sizes in SIZE_PRESETS.items() for w, h in sizes.values())


log = logging.getLogger("hdb.app")


def on_spaces() -> bool:
    """Whether `spaces` is installed, as on Hugging Face Spaces (where the GPU may be ZeroGPU's)."""
    try:
        import spaces  # noqa: F401
    except ImportError:
        return False
    return True


def compile_refusal(device_type: str, zero_gpu: bool) -> str | None:
    """Why `--compile` does not apply here, or None where it does: a dedicated GPU."""
    if zero_gpu:
        return "--compile is ignored on Spaces: ZeroGPU runs each call in a fresh worker, which would compile again"
    if device_type != "cuda":
        return f"--compile is ignored on {device_type}: compiling pays off on a dedicated GPU only"
    return None


def gpu_task(duration: Callable[[dict], float]) -> Callable[[Callable], Callable]:
    """spaces.GPU asking for `duration(the call's inputs by name)` seconds on ZeroGPU; elsewhere a no-op."""
    try:
        import spaces  # on Spaces only; effect-free outside ZeroGPU
    except ImportError:
        return lambda fn: fn

    def decorate(fn: Callable) -> Callable:
        signature = inspect.signature(fn)

        def seconds(*args: object, **kwargs: object) -> float:  # ZeroGPU calls it with the function's inputs
            return duration(signature.bind_partial(*args, **kwargs).arguments)

        return spaces.GPU(duration=seconds)(fn)

    return decorate


ASSETS = Path(__file__).parent / "assets"
EXAMPLE_NAMES = ("obama.jpg", "grace_hopper.jpg", "astronaut.png")
UPLOADS_FILE = "uploads.txt"  # in a visitor's folder: the photos they uploaded, deleted with it
EXAMPLE_PHOTOS = [str(ASSETS / name) for name in EXAMPLE_NAMES]
NOTICE = (
    "**Responsible use.** Only personalise photos of yourself or of people who agreed to it. Do not make "
    "images that deceive, harass or sexualise anyone. Your photos and personal weights stay in your "
    "session and are deleted when you leave; the server's cached copies of uploads and pictures within "
    "an hour, and everything when the app stops."
)


class PhotoInput(gr.Image):
    """gr.Image whose bad uploads (not an image, damaged, too large) end in a clear message, not a stack trace."""

    is_template = True  # the page renders it as a plain gr.Image

    def preprocess(self, payload: ImageData | None) -> np.ndarray | Image.Image | str | None:
        try:
            return super().preprocess(payload)
        except Exception as error:  # Pillow's many error types: unidentified, truncated, decompression bomb
            raise gr.Error(f"The uploaded file is not an image Pillow can read ({type(error).__name__}).") from None


TIPS = """\
- **The photo**: one face, looking at the camera, evenly lit, not too small in the frame; no sunglasses,
  hats or hands over the face. Several faces in one photo: crop to the one you mean.
- **Identity strength** scales the personal weights: 1 is the person as trained, lower drifts towards
  the base model (more freedom for the style), a little above 1 insists on the likeness.
- **Without a hypernetwork** (none has been published yet) personalisation starts from zero and takes
  200 finetune steps instead of 40: slower, and the likeness from one photo is weaker than the paper's.
"""
PERSON_FILE, KOHYA_FILE, DIFFUSERS_FILE = (
    "person.safetensors",
    "person_lora_kohya.safetensors",
    "person_lora_diffusers.safetensors",
)
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


# ----------------------------------------------------------------------------- the shared models


class Engine:
    """The pipeline and hypernetwork, loaded once and shared by every visitor.

    The pipeline holds one LiDB, so it holds one person at a time: every use of it (personalise, load a
    person and generate, check an upload) runs under `lock`, and loads the visitor's own person inside
    it, whatever Gradio's queue settings are.
    """

    def __init__(self, options: argparse.Namespace) -> None:
        from hdb.config import LiDBConfig
        from hdb.devices import resolve_device, resolve_dtype
        from hdb.lidb import LiDB
        from hdb.models import build_tiny_pipeline, load_pipeline

        self.options = options
        self.tiny = options.tiny
        self.lock = threading.Lock()
        if self.tiny:
            device = resolve_device(options.device)
            self.pipe = build_tiny_pipeline("sd15").to(device, resolve_dtype(options.dtype, device))
            self.pipe.set_progress_bar_config(disable=True)
        else:
            self.pipe = load_pipeline(options.base, options.dtype, options.device)
        self.hypernet = None
        if options.hypernet:
            from hdb.hypernet import HyperNetwork

            self.hypernet = HyperNetwork.from_pretrained(options.hypernet, device=self.pipe.unet.device)
        self.lidb = LiDB(self.pipe, self.hypernet.lidb_config if self.hypernet else LiDBConfig())
        self.seconds_per_step: float | None = None  # measured: at start on a CPU, else on the first personalisation
        if self.pipe.unet.device.type == "cpu":
            self.seconds_per_step = self._time_two_steps()
        self.warm_up: threading.Thread | None = None  # compiling in the background (--compile on a dedicated GPU)
        self.warm_up_note = ""  # what the page says about it while it runs, or if it failed
        if options.compile:
            self._start_compiling()

    def _gray_face(self) -> AlignedFace:
        """A plain gray aligned crop: for timing and warming up, where no visitor's face is needed."""
        from PIL import Image

        from hdb.faces import AlignedFace
        from hdb.models import native_resolution

        size = native_resolution(self.pipe)
        return AlignedFace.from_crop(Image.new("RGB", (size, size), (128, 128, 128)))

    def _time_two_steps(self) -> float:
        """On a CPU, users deserve an honest estimate before they wait: time two real steps once at start."""
        from hdb.config import PersonalizeConfig
        from hdb.personalize import personalize

        started = time.perf_counter()
        with self.lock:
            personalize(self.pipe, self._gray_face(), None, PersonalizeConfig(steps=2, progress=False), lidb=self.lidb)
        return (time.perf_counter() - started) / 2

    def _start_compiling(self) -> None:
        """Compile on a dedicated GPU, warming up in a background thread so the page is served at once."""
        from hdb.models import compile_pipeline

        refusal = compile_refusal(self.pipe.unet.device.type, zero_gpu=on_spaces())
        if refusal:
            log.warning(refusal)
            return
        compile_pipeline(self.pipe, APP_COMPILE_MODE)  # only marks the models: compiling happens as they run
        self.warm_up_note = "⏳ Warming up: the model is being compiled, so the first run may be slower."
        self.warm_up = threading.Thread(target=self._compile_by_running, name="hdb-compile", daemon=True)
        self.warm_up.start()

    def _compile_by_running(self) -> None:
        """A short personalisation and a short generation: the training and the sampling graphs get compiled."""
        from hdb.config import PersonalizeConfig
        from hdb.generate import generate
        from hdb.personalize import personalize

        started = time.perf_counter()
        try:
            config = PersonalizeConfig(steps=2, progress=False)
            with self.lock:  # visitors who come meanwhile wait for it (their run would compile anyway)
                personalize(self.pipe, self._gray_face(), self.hypernet, config, lidb=self.lidb)
                generate(self.pipe, self.lidb, "a photo", steps=2)
        except Exception as error:  # the page keeps serving: say what happened instead of dying in a thread
            log.exception("compiling the model failed")
            self.warm_up_note = f"⚠️ Compiling the model failed ({error}). Restart the app without --compile."
            return
        log.info("compiled the model in %.0f s", time.perf_counter() - started)
        self.warm_up_note = ""

    @property
    def default_steps(self) -> int:
        from hdb.config import STEPS_FROM_ZERO, STEPS_WITH_HYPERNET

        return STEPS_WITH_HYPERNET if self.hypernet else STEPS_FROM_ZERO

    @property
    def device_name(self) -> str:
        return str(self.pipe.unet.device)

    @property
    def pixel_scale(self) -> float:
        """Work per step relative to 512 px (SDXL's 1024 px: 4x)."""
        from hdb.models import native_resolution

        return (native_resolution(self.pipe) / 512) ** 2

    def personalize_seconds(self, steps: int) -> float:
        """GPU seconds to ask for: measured speed on a dedicated GPU, the estimate elsewhere (ZeroGPU forks)."""
        per_step = self.seconds_per_step or GPU_SECONDS["finetune_step"] * self.pixel_scale
        return min(GPU_SECONDS["setup"] + steps * per_step, MAX_GPU_SECONDS)

    def generate_seconds(self, steps: int, images: int, area: float = 1.0) -> float:
        """`area`: the picture's pixels over the native square's (a portrait: 1.5)."""
        per_step = GPU_SECONDS["image_step"] * self.pixel_scale * area
        return min(GPU_SECONDS["setup"] / 2 + images * steps * per_step, MAX_GPU_SECONDS)

    @property
    def max_sampling_steps(self) -> int:
        """The slider's limit: the most steps whose largest request (4 portraits) fits in one call."""
        per_step = GPU_SECONDS["image_step"] * self.pixel_scale * MAX_AREA * MAX_IMAGES
        return min(MAX_SAMPLING_STEPS, int((MAX_GPU_SECONDS - GPU_SECONDS["setup"] / 2) / per_step))

    @property
    def max_finetune_steps(self) -> int:
        """The slider's limit: as many steps as fit in one call's GPU time (400 at 512 px)."""
        per_step = GPU_SECONDS["finetune_step"] * self.pixel_scale
        return min(MAX_FINETUNE_STEPS, int((MAX_GPU_SECONDS - GPU_SECONDS["setup"]) / per_step))

    def estimate(self, steps: int) -> str:
        if self.seconds_per_step is None:
            return f"{steps} finetune steps on {self.device_name}"
        return f"{steps} finetune steps on {self.device_name}: about {steps * self.seconds_per_step:.0f} s"


class VisitorFiles:
    """Every file the app keeps for visitors, under one folder the app owns: <temp>/hdb_app/<process id>/.

    sessions/<hash of the session>/ holds a visitor's personal file, LoRA exports and the list of photos they
    uploaded; all of it goes when the visitor leaves (the page's unload) or their session expires.
    gradio/ is Gradio's cache (uploads, served pictures), which Gradio empties of files older than an
    hour. The whole folder goes when the app stops, and at start the folders of app processes that no
    longer run (killed, crashed) are swept. Everything lives on disk, so a forked ZeroGPU worker's
    writes are seen by the main process that cleans up.
    """

    def __init__(self, parent: Path | None = None) -> None:
        self.parent = parent or Path(tempfile.gettempdir()) / "hdb_app"
        self.swept = self.sweep()
        self.root = self.parent / str(os.getpid())
        (self.root / "sessions").mkdir(parents=True, exist_ok=True)

    @property
    def gradio_cache(self) -> Path:
        return self.root / "gradio"

    def sweep(self) -> list[Path]:
        """Remove what app processes that have stopped left behind; returns what was removed."""
        # our own process id's folder too: we have not made it yet, so an earlier process (same id) left it
        stale = [
            folder
            for folder in self.parent.glob("*")
            if folder.name.isdigit() and (int(folder.name) == os.getpid() or not _process_runs(int(folder.name)))
        ]
        for folder in stale:
            shutil.rmtree(folder, ignore_errors=True)
        return stale

    def folder(self, session_hash: str) -> Path:
        folder = self._session_folder(session_hash)
        folder.mkdir(exist_ok=True)
        return folder

    def _session_folder(self, session_hash: str) -> Path:
        # the browser chooses the session hash: hashed again, it can only ever name a folder in sessions/
        return self.root / "sessions" / hashlib.sha256(session_hash.encode()).hexdigest()[:32]

    def note_upload(self, session_hash: str, photo: str) -> None:
        with (self.folder(session_hash) / UPLOADS_FILE).open("a") as uploads:
            uploads.write(photo + "\n")

    def forget(self, session_hash: str) -> None:
        """Delete a visitor's files and the photos they uploaded (the shared example photos stay)."""
        folder = self._session_folder(session_hash)
        uploads = folder / UPLOADS_FILE
        for line in uploads.read_text().splitlines() if uploads.is_file() else []:
            path = Path(line)
            if path.is_relative_to(self.root) and path.name not in EXAMPLE_NAMES:
                path.unlink(missing_ok=True)
        shutil.rmtree(folder, ignore_errors=True)

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def _process_runs(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


@dataclass
class Session:
    """One visitor's person: nothing here is visible to another session."""

    key: str  # Gradio's session hash: names the visitor's folder (VisitorFiles.folder)
    folder: Path
    weights: object | None = None  # PersonalWeights
    references: list | None = None  # face descriptors of the visitor's photos, for the identity scores


# ----------------------------------------------------------------------------- event handlers


def make_handlers(engine: Engine, files: VisitorFiles) -> tuple[Callable, ...]:
    from hdb.config import PersonalizeConfig
    from hdb.evaluate import identity_score
    from hdb.export import export_lora
    from hdb.faces import align_face, crop_size, face_embedding
    from hdb.generate import generate
    from hdb.models import native_resolution
    from hdb.personal_file import apply_personal, check_compatible, load_personal, save_personal
    from hdb.personalize import personalize

    def show_crop(photo: str | None) -> tuple:
        if not photo:
            return None, ""
        try:
            face = align_face(photo, size=crop_size(native_resolution(engine.pipe)))
        except HdbError as error:
            raise gr.Error(str(error)) from None
        return face.image, face.note or "Face found and aligned."

    def visitor(session: Session | None, request: gr.Request) -> Session:
        """The visitor's Session, made on their first event, with their own folder."""
        if session is None:
            session = Session(request.session_hash, files.folder(request.session_hash))
        return session

    @gpu_task(lambda inputs: engine.personalize_seconds(int(inputs["steps"]) or engine.default_steps))
    def run_personalize(
        photo: str | None,
        consent: bool,
        steps: float,
        session: Session | None,
        more_photos: list[str] | None,
        request: gr.Request,
        progress: gr.Progress = gr.Progress(),
    ) -> Iterator[tuple]:
        session = visitor(session, request)
        if not photo:
            raise gr.Error("Upload a photo of a face first (or pick an example).")
        photos = [photo, *(more_photos or [])]
        for upload in photos:
            files.note_upload(session.key, upload)
        if len(photos) > MAX_PHOTOS:
            raise gr.Error(f"Up to {MAX_PHOTOS} photos of one person, please ({len(photos)} given).")
        if not consent:
            raise gr.Error("Please confirm that you have the right to use this photo.")
        steps = int(steps) or engine.default_steps
        yield None, f"Preparing the face... ({engine.estimate(steps)})", session, None
        try:
            progress(0, desc="Finding and aligning the face" + ("s" if len(photos) > 1 else ""))
            faces = [align_face(upload, size=crop_size(native_resolution(engine.pipe))) for upload in photos]
            progress(0.05, desc="Predicting weights" if engine.hypernet else "Starting from zero (no hypernetwork)")
            started = time.perf_counter()

            def on_step(step: int, loss: float) -> None:
                progress((step + 1) / steps, desc=f"Finetuning step {step + 1}/{steps} (loss {loss:.3f})")

            config = PersonalizeConfig(steps=steps, optimizer=engine.options.optimizer, progress=False)
            with engine.lock:
                result = personalize(engine.pipe, faces, engine.hypernet, config, lidb=engine.lidb, on_step=on_step)
        except HdbError as error:
            raise gr.Error(str(error)) from None
        engine.seconds_per_step = (time.perf_counter() - started) / steps
        session.weights, session.references = result.weights, [face_embedding(face) for face in faces]
        downloads = save_files(session)
        how = "from the hypernetwork's prediction" if result.used_hypernet else "from zero (no hypernetwork loaded)"
        notes = " ".join([face.note for face in faces if face.note] + result.notes)
        photos_used = f" from {len(faces)} photos" if len(faces) > 1 else ""
        message = f"Personalised{photos_used} in {time.perf_counter() - started:.1f} s: {steps} steps {how}. {notes}"
        yield faces[0].image, message, session, downloads

    def save_files(session: Session) -> list[str]:
        person = save_personal(session.weights, session.folder / PERSON_FILE)
        kohya = export_lora(session.weights, session.folder / KOHYA_FILE, "kohya")
        diffusers = export_lora(session.weights, session.folder / DIFFUSERS_FILE, "diffusers")
        return [str(person), str(kohya), str(diffusers)]

    def upload_person(file: str | None, session: Session | None, request: gr.Request) -> tuple:
        session = visitor(session, request)
        if not file:
            return session, "", None
        try:
            weights = load_personal(file)
            with engine.lock:
                check_compatible(weights, engine.lidb)
        except HdbError as error:
            raise gr.Error(str(error)) from None
        session.weights, session.references = weights, []
        return (
            session,
            f"Loaded a saved person ({weights.num_numbers:,} numbers: LiDB rank {weights.config.rank}"
            f"{f', plain LoRA rank {weights.lora_rank}' if weights.lora_rank else ''}).",
            save_files(session),
        )

    @gpu_task(lambda inputs: engine.generate_seconds(int(inputs["steps"]), int(inputs["count"]), area(inputs["size"])))
    def run_generate(
        session: Session | None,
        prompt: str,
        style: str,
        negative: str,
        strength: float,
        steps: float,
        guidance: float,
        seed: float,
        randomize: bool,
        size: str,
        count: float,
        progress: gr.Progress = gr.Progress(),
    ) -> tuple[list[tuple], int]:
        if session is None or session.weights is None:
            raise gr.Error("Personalise a photo first (or upload a saved personal file).")
        seed = random.randrange(2**31) if randomize else int(seed)
        steps, count = int(steps), int(count)
        try:
            full_prompt = expand_prompt(prompt, session.weights.instance_token, style)
            width, height = picture_size(size, native_resolution(engine.pipe))

            def on_step(step: int) -> None:
                progress((step + 1) / steps, desc=f"Sampling step {step + 1}/{steps}")

            progress(0, desc=f"Generating {count} image(s)")
            with engine.lock:  # this session's person, loaded and used with nobody else's in between
                apply_personal(engine.pipe, session.weights, engine.lidb)
                images = generate(
                    engine.pipe,
                    engine.lidb,
                    full_prompt,
                    negative,
                    steps=steps,
                    guidance=guidance,
                    seed=seed,
                    num_images=count,
                    identity_strength=strength,
                    height=height,
                    width=width,
                    on_step=on_step,
                )
        except HdbError as error:
            raise gr.Error(str(error)) from None
        return [(image, caption(session, image, seed, k)) for k, image in enumerate(images)], seed

    def area(size: str) -> float:
        native = native_resolution(engine.pipe)
        width, height = picture_size(size, native)
        return width * height / native**2

    def caption(session: Session, image: Image.Image, seed: int, index: int) -> str:
        """Seed and identity score: how close the face in the picture is to the uploaded faces (the mean)."""
        where = f"seed {seed}" + (f" #{index + 1}" if index else "")
        if not session.references:  # a person loaded from a file: no photo to compare with
            return where
        score = identity_score(session.references, image)
        return f"{where} · {'no face found' if score is None else f'identity {score:.2f}'}"

    def leave(request: gr.Request) -> None:
        files.forget(request.session_hash)

    def draw_example(session: Session | None, *inputs: object) -> tuple:
        if session is None or session.weights is None:
            return gr.skip(), gr.skip()  # nobody personalised yet: the example only fills the prompt
        return run_generate(session, *inputs)

    return show_crop, run_personalize, upload_person, run_generate, draw_example, leave


# ----------------------------------------------------------------------------- the page


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
    from hdb.models import native_resolution
    from hdb.styles import SIZE_PRESETS

    show_crop, run_personalize, upload_person, run_generate, draw_example, leave = make_handlers(engine, files)
    sizes = SIZE_PRESETS.get(native_resolution(engine.pipe)) or SIZE_PRESETS[512]
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
        demo.unload(leave)
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
                    strength = gr.Slider(0, 1.5, value=1.0, step=0.05, label="Identity strength")
                    gen_steps = gr.Slider(1, engine.max_sampling_steps, value=25, step=1, label="Sampling steps")
                    guidance = gr.Slider(1, 15, value=7.5, step=0.5, label="Guidance")
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
        photo.change(show_crop, photo, [crop, status], api_name="align")
        pictures = [session, prompt, style, negative, strength, gen_steps, guidance, seed, randomize, size, count]
        personalize_button.click(
            run_personalize,
            [photo, consent, steps, session, more_photos],
            [crop, status, session, downloads],
            api_name="personalize",
            **pipeline,
        ).success(run_generate, pictures, [gallery, seed], api_name=False, **pipeline)  # one click to pictures
        style.change(negative_for, style, negative, api_name=False)
        saved.upload(
            upload_person, [saved, session], [session, status, downloads], api_name="upload_person", **pipeline
        )
        generate_button.click(run_generate, pictures, [gallery, seed], api_name="generate", **pipeline)
        # a prompt example draws at once once there is a person; a photo example only shows its aligned crop:
        # personalising still waits for the visitor's consent and click
        prompt_examples.load_input_event.then(draw_example, pictures, [gallery, seed], api_name=False, **pipeline)
    demo.queue(max_size=32)
    return demo


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    env = os.environ.get

    def env_flag(name: str) -> bool:  # a switch set by an environment variable: anything but "", "0", "false"
        return env(name, "") not in ("", "0", "false")

    parser = argparse.ArgumentParser(description="hdb demo (Gradio)")
    parser.add_argument("--base", default=env("HDB_BASE", DEFAULT_BASE), help="base model: hub id or local directory")
    parser.add_argument("--hypernet", default=env("HDB_HYPERNET"), help="trained hypernetwork: hub id or directory")
    parser.add_argument("--device", default=env("HDB_DEVICE", "auto"))
    parser.add_argument("--dtype", default=env("HDB_DTYPE", "auto"), choices=DTYPE_CHOICES)
    parser.add_argument("--optimizer", default=env("HDB_OPTIMIZER", OPTIMIZERS[0]), choices=OPTIMIZERS)
    parser.add_argument("--tiny", action="store_true", default=env_flag("HDB_TINY"))
    parser.add_argument(
        "--compile",
        action="store_true",
        default=env_flag("HDB_COMPILE"),
        help=f"dedicated GPU: torch.compile ({APP_COMPILE_MODE}) while the page is already served; not on ZeroGPU",
    )
    parser.add_argument(
        "--host", default=env("GRADIO_SERVER_NAME", "127.0.0.1"), help="0.0.0.0 to serve the network (Spaces set it)"
    )
    parser.add_argument("--port", type=int, default=int(env("HDB_PORT", env("GRADIO_SERVER_PORT", "7860"))))
    parser.add_argument("--share", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    options = parse_args(argv)
    try:
        engine = Engine(options)
    except HdbError as error:
        raise SystemExit(f"error: {error}") from None
    files = VisitorFiles()
    os.environ["GRADIO_TEMP_DIR"] = str(files.gradio_cache)  # this process is the app's: its cache goes with it
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # a stopped container or Space: clean up as on Ctrl-C
    try:
        build_demo(engine, files).launch(server_name=options.host, server_port=options.port, share=options.share)
    finally:
        files.remove()


if __name__ == "__main__":
    main()

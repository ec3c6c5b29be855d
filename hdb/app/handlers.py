"""What the page's events do: each handler a method that a test can call directly, without a server.

Every handler turns an HdbError into a `gr.Error` with the same message in the visitor's terms
(`hdb.terms.for_visitors`), and keeps each visitor's person in their own `Session`.
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import gradio as gr

from hdb.app.engine import MAX_GUIDANCE, MAX_IMAGES, MAX_STRENGTH, Engine
from hdb.app.visitors import Session, VisitorFiles
from hdb.config import MAX_SEED, PersonalizeConfig, value_problem
from hdb.errors import HdbError
from hdb.evaluate import identity_score
from hdb.export import export_lora
from hdb.faces import face_embedding
from hdb.families import family_of
from hdb.personal_file import PersonalWeights, load_personal, save_personal
from hdb.personalize import same_person_notes
from hdb.pipeline import check_photo_count
from hdb.styles import picture_size
from hdb.terms import for_visitors

if TYPE_CHECKING:
    from PIL import Image

    from hdb.faces import AlignedFace
    from hdb.personalize import Personalization

# in a message: a path that starts a word ("/tmp/x", '/home/y'), not a slash between values ("(1, 2)/(3, 4)")
ABSOLUTE_PATH = re.compile(r"(?:^|(?<=[\s'\"(=:]))/[\w.~-][^\s'\"]*")
PERSON_FILE, KOHYA_FILE, DIFFUSERS_FILE = (
    "person.safetensors",
    "person_lora_kohya.safetensors",
    "person_lora_diffusers.safetensors",
)


def whole_number(value: object, what: str, low: int, high: int) -> int:
    """`value` from the page or the API as a whole number in low..high, or a clear error (NaN, 2**64, "x")."""
    problem = value_problem(value, (low, high), whole=True)  # the configs' own rule
    if problem:
        raise gr.Error(f"{what} {problem}")
    return int(value)


def number(value: object, what: str, low: float, high: float) -> float:
    """`value` as a finite number in low..high, or a clear error (NaN passes every slider limit)."""
    problem = value_problem(value, (low, high), whole=False)
    if problem:
        raise gr.Error(f"{what} {problem}")
    return float(value)


def visitor_error(error: HdbError) -> gr.Error:
    """The message a visitor sees for a library error: no advice about settings they cannot change, no server
    path (a file is named by its own name: the folders say where the server keeps things, and its PID), and only
    text that can be sent (a lone surrogate would turn the whole message into `null`)."""
    message = ABSOLUTE_PATH.sub(lambda match: Path(match.group()).name, for_visitors(str(error)))
    return gr.Error(message.encode("utf-8", "replace").decode("utf-8"))


class Handlers:
    """The page's event handlers, over the shared engine and the visitors' files."""

    def __init__(self, engine: Engine, files: VisitorFiles) -> None:
        self.engine, self.files = engine, files
        self.blocks: gr.Blocks | None = None  # the page, once built: its queue says who is waiting
        # ZeroGPU: only the GPU work runs in a GPU function (the time asked for is the visitor's quota); each asks
        # for what its inputs need. Decorated here, once, before launch.
        self.finetune = engine.gpu_task(lambda inputs: engine.personalize_seconds(inputs["steps"]))(self.finetune)
        self.sample = engine.gpu_task(
            lambda inputs: engine.generate_seconds(inputs["steps"], inputs["count"], self.area(inputs["size"]))
        )(self.sample)

    def session(self, session: Session | None, request: gr.Request) -> Session:
        """The visitor's Session, made on their first event, with their own folder."""
        return session if session is not None else Session(request.session_hash)

    # -- as a job joins the line (`validator=`: after hdb.app.line's door, before the job waits in line)

    def note_sent(self, request: gr.Request, inputs: list) -> list:
        """Count the files a job will read as this visitor's from the moment it joins: a visitor who sent the same
        photo and leaves while this job waits keeps it for this one. A file made for another visitor is refused."""
        answers = []
        for value in inputs:
            problem = ""
            for path in value if isinstance(value, list) else [value] if isinstance(value, str) else []:
                try:
                    self.files.note_upload(request.session_hash, path)
                except HdbError as error:
                    problem = str(visitor_error(error))
            answers.append(gr.validate(not problem, problem))
        return answers

    def may_align(self, photo: object, session: object, request: gr.Request) -> list:
        return self.note_sent(request, [photo, session])

    def may_personalize(
        self, photo: object, consent: object, steps: object, session: object, more: object, request: gr.Request
    ) -> list:
        return self.note_sent(request, [photo, consent, steps, session, more])

    def may_upload_person(self, file: object, session: object, request: gr.Request) -> list:
        return self.note_sent(request, [file, session])

    # -- the events

    def show_crop(self, photo: str | None, session: Session | None, request: gr.Request) -> tuple:
        if not photo:
            return None, "", session
        session = self.session(session, request)
        try:
            self.files.note_upload(session.key, photo)  # a photo only looked at goes when the visitor leaves too
            face = self.engine.personal.faces(photo)[0]
            crop = self.keep(session, face.image)
        except HdbError as error:
            raise visitor_error(error) from None
        return crop, face.note or "Face found and aligned.", session

    def note_uploads(self, uploads: list[str] | None, session: Session | None, request: gr.Request) -> Session:
        """Remember files the visitor sent (more photos), so that they go when the visitor leaves."""
        session = self.session(session, request)
        try:
            for upload in uploads or []:
                self.files.note_upload(session.key, upload)
        except HdbError as error:
            raise visitor_error(error) from None
        return session

    def personalize(
        self,
        photo: str | None,
        consent: bool,
        steps: float,
        session: Session | None,
        more_photos: list[str] | None,
        request: gr.Request,
        progress: gr.Progress = gr.Progress(),
    ) -> Iterator[tuple]:
        engine = self.engine
        session = self.session(session, request)
        if not photo:
            raise gr.Error("Upload a photo of a face first (or pick an example).")
        photos = [photo, *(more_photos or [])]
        try:
            for upload in photos:
                self.files.note_upload(session.key, upload)
            check_photo_count(len(photos))
        except HdbError as error:
            raise visitor_error(error) from None
        if consent is not True:  # the API takes any value: "no" is not consent
            raise gr.Error("Please confirm that you have the right to use this photo.")
        steps = whole_number(steps, "Finetune steps", 0, engine.max_finetune_steps) or engine.default_steps
        yield None, f"Preparing the face... ({engine.estimate(steps)})", session, None
        try:
            progress(0, desc="Finding and aligning the face" + ("s" if len(photos) > 1 else ""))
            faces = engine.personal.faces(photos)  # CPU work, before the GPU is asked for
            started = time.perf_counter()
            result = self.finetune(faces, steps, progress)
        except HdbError as error:
            raise visitor_error(error) from None
        if not engine.zero_gpu:  # a forked ZeroGPU worker's speed says nothing of the next one's
            engine.seconds_per_step = (time.perf_counter() - started) / steps
        try:
            downloads = self.save_files(session, result.weights)
            crop = self.keep(session, faces[0].image)
        except HdbError as error:  # the visitor left meanwhile: nothing is written for them
            raise visitor_error(error) from None
        references = [face_embedding(face) for face in faces]  # each photo's descriptor once: scores and notes
        session.weights, session.references = result.weights, references
        how = "from the hypernetwork's prediction" if result.used_hypernet else "from zero (no hypernetwork loaded)"
        notes = " ".join([face.note for face in faces if face.note] + same_person_notes(faces, references))
        photos_used = f" from {len(faces)} photos" if len(faces) > 1 else ""
        message = f"Personalised{photos_used} in {time.perf_counter() - started:.1f} s: {steps} steps {how}. {notes}"
        yield crop, message, session, downloads

    def finetune(self, faces: list[AlignedFace], steps: int, progress: gr.Progress) -> Personalization:
        """The GPU part of personalising (a GPU function on ZeroGPU): prediction, relaxation, fast finetune."""
        engine = self.engine
        progress(0.05, desc="Predicting weights" if engine.hypernet else "Starting from zero (no hypernetwork)")

        def on_step(step: int, loss: float) -> None:
            progress((step + 1) / steps, desc=f"Finetuning step {step + 1}/{steps} (loss {loss:.3f})")

        config = PersonalizeConfig(steps=steps, optimizer=engine.options.optimizer, progress=False)
        with engine.lock:
            return engine.personal.personalize(faces, config, on_step)

    def keep(self, session: Session, face: Image.Image) -> str:
        """The visitor's aligned face, saved among their files, which Gradio serves in place: it goes when they
        leave, or when they align another (a picture returned as an image would be copied into Gradio's cache)."""
        (path,) = self.files.write(session.key, "face", {"face.png": face.save})
        return str(path)

    def save_files(self, session: Session, weights: PersonalWeights) -> list[str]:
        """The visitor's personal file and the LoRA exports its base family offers, among their files."""
        offered = family_of(self.engine.pipe).lora_formats
        writers = {PERSON_FILE: lambda path: save_personal(weights, path)}
        for name, format in ((KOHYA_FILE, "kohya"), (DIFFUSERS_FILE, "diffusers")):
            if format in offered:
                writers[name] = lambda path, format=format: export_lora(weights, path, format)
        return [str(path) for path in self.files.write(session.key, "downloads", writers)]

    def upload_person(self, file: str | None, session: Session | None, request: gr.Request) -> tuple:
        session = self.session(session, request)
        if not file:
            return session, "", None
        try:
            self.files.note_upload(session.key, file)
            weights = load_personal(file)
            self.engine.personal.check(weights)
            downloads = self.save_files(session, weights)
        except HdbError as error:
            raise visitor_error(error) from None
        session.weights, session.references = weights, []  # only once everything about it worked
        return (
            session,
            f"Loaded a saved person ({weights.num_numbers:,} numbers: LiDB rank {weights.config.rank}"
            f"{f', plain LoRA rank {weights.lora_rank}' if weights.lora_rank else ''}).",
            downloads,
        )

    def generate(
        self,
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
        engine = self.engine
        if session is None or session.weights is None:
            raise gr.Error("Personalise a photo first (or upload a saved personal file).")
        seed = random.randrange(2**31) if randomize is True else whole_number(seed, "The seed", 0, MAX_SEED)
        steps = whole_number(steps, "Sampling steps", 1, engine.max_sampling_steps)
        count = whole_number(count, "The number of images", 1, MAX_IMAGES)
        strength = number(strength, "Identity strength", 0.0, MAX_STRENGTH)
        guidance = number(guidance, "Guidance", 1.0, MAX_GUIDANCE)
        try:
            progress(0, desc=f"Generating {count} image(s)")
            images = self.sample(session.weights, prompt, style, negative, strength, steps, guidance, seed, count, size,
                                 progress)  # fmt: skip
        except HdbError as error:
            raise visitor_error(error) from None
        captions = [self.caption(session, image, seed, k) for k, image in enumerate(images)]  # CPU: after the GPU
        names = {f"seed{seed}-{k + 1}.png": image.save for k, image in enumerate(images)}
        try:
            pictures = self.files.write(session.key, "pictures", names)  # the gallery shows the latest batch only
        except HdbError as error:
            raise visitor_error(error) from None
        return [(str(path), caption) for path, caption in zip(pictures, captions, strict=True)], seed

    def sample(
        self,
        weights: PersonalWeights,
        prompt: str,
        style: str,
        negative: str,
        strength: float,
        steps: int,
        guidance: float,
        seed: int,
        count: int,
        size: str,
        progress: gr.Progress,
    ) -> list[Image.Image]:
        """The GPU part of generating (a GPU function on ZeroGPU): this visitor's person, loaded and sampled with
        nobody else's in between."""
        engine = self.engine
        width, height = picture_size(size, engine.personal.resolution)

        def on_step(step: int) -> None:
            progress((step + 1) / steps, desc=f"Sampling step {step + 1}/{steps}")

        with engine.lock:
            engine.personal.use(weights)
            return engine.personal.generate(
                prompt, style, strength, negative, steps=steps, guidance=guidance, seed=seed, num_images=count,
                height=height, width=width, on_step=on_step,
            )  # fmt: skip

    def area(self, size: str) -> float:
        native = self.engine.personal.resolution
        width, height = picture_size(size, native)
        return width * height / native**2

    def caption(self, session: Session, image: Image.Image, seed: int, index: int) -> str:
        """Seed and identity score: how close the face in the picture is to the uploaded faces (the mean)."""
        where = f"seed {seed}" + (f" #{index + 1}" if index else "")
        if not session.references:  # a person loaded from a file: no photo to compare with
            return where
        score = identity_score(session.references, image)
        return f"{where} · {'no face found' if score is None else f'identity {score:.2f}'}"

    def leave(self, request: gr.Request) -> None:
        self.files.forget(request.session_hash)

    def draw_example(self, session: Session | None, *inputs: object) -> tuple:
        if session is None or session.weights is None:
            return gr.skip(), gr.skip()  # nobody personalised yet: the example only fills the prompt
        return self.generate(session, *inputs)

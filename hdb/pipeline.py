"""`PersonalPipeline`: one diffusers pipeline, one LiDB, one person. The front door of hdb.

    personal = PersonalPipeline.load("stable-diffusion-v1-5/stable-diffusion-v1-5")
    personal.personalize("me.jpg")                           # or personal.use("me.safetensors")
    images = personal.generate("a [V] as a knight", style="Oil painting", num_images=4)
    personal.save("me.safetensors"); personal.export("me_lora.safetensors", "kohya")

It is the one owner of the pipeline's LiDB, as peft's `PeftModel` owns its adapters: it attaches it,
loads a person into it, relaxes it for the finetune and takes it off again (`unload`). Nothing else
changes the LiDB for good; generation and training change it only within scopes that put it back
(`LiDB.scaled`, `LiDB.merged_into_weights`, ...). A server shares one PersonalPipeline between its
visitors and loads each visitor's person (`use`) before their pictures.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from PIL import Image

from hdb.config import (
    DEFAULT_BASE,
    MAX_PHOTOS,
    STEPS_FROM_ZERO,
    STEPS_WITH_HYPERNET,
    GenerateOptions,
    LiDBConfig,
    PersonalizeConfig,
    instance_prompt_for,
)
from hdb.errors import HdbError
from hdb.export import export_lora
from hdb.faces import AlignedFace, ImageSource, align_face, crop_size
from hdb.families import FAMILIES, denoiser, family_of
from hdb.generate import generate
from hdb.lidb import LiDB, check_signature
from hdb.models import Pipeline, load_pipeline, native_resolution
from hdb.personal_file import PersonalWeights, load_personal, save_personal
from hdb.personalize import Personalization, finetune
from hdb.relaxations import relax
from hdb.styles import check_prompt, expand_prompt, negative_for
from hdb.training import TrainingDiverged

if TYPE_CHECKING:
    from hdb.hypernet import HyperNetwork

Photos = ImageSource | AlignedFace | list[ImageSource | AlignedFace]


def check_photo_count(count: int) -> None:
    """The one rule for how many photos one personalisation takes (callers check early, before slow work)."""
    if not 1 <= count <= MAX_PHOTOS:
        raise HdbError(f"Personalise from 1 to {MAX_PHOTOS} photos of one person, not {count}")


def check_steps(steps: int | None, has_start: bool) -> None:
    """The one rule for 0 finetune steps (callers check early): they keep the start, a hypernetwork's prediction or
    a start given, and are refused without one, where the start is the base model itself."""
    if steps == 0 and not has_start:
        raise HdbError(
            "`steps=0` keeps the start, which without a hypernetwork is the base model; "
            "give 1 or more `steps`, or a hypernetwork (`hypernet`)"
        )


class PersonalPipeline:
    """A diffusers Stable Diffusion pipeline that holds one person at a time, in a LiDB it owns.

    `person` is the person it holds (None: the base model). `hypernet`, when given, predicts where each
    personalisation starts; its LiDB shape (layers, aux bases) is the one attached here, else `lidb_config`'s.
    """

    def __init__(
        self, pipe: Pipeline, hypernet: HyperNetwork | None = None, lidb_config: LiDBConfig | None = None
    ) -> None:
        self.pipe, self.hypernet = pipe, hypernet
        self.lidb = LiDB(pipe, lidb_config or (hypernet.lidb_config if hypernet is not None else LiDBConfig()))
        if hypernet is not None:
            try:
                check_signature(hypernet.signature(), self.lidb.signature(), "This hypernetwork")
            except HdbError:
                self.lidb.unload()  # the pipeline as it was found
                raise
        self.person: PersonalWeights | None = None

    @classmethod
    def load(
        cls,
        base: str = DEFAULT_BASE,
        hypernet: str | Path | HyperNetwork | None = None,
        device: str = "auto",
        dtype: str | torch.dtype = "auto",
        lidb_config: LiDBConfig | None = None,
        quantize: str = "none",
    ) -> PersonalPipeline:
        """The base model (hub id or folder) and, optionally, a trained hypernetwork (hub id or folder); people are
        made in `lidb_config`'s shape (default: the hypernetwork's, which another would not fit, else LiDBConfig()).
        A personal file is drawn by a pipeline of its own shape: `lidb_config=load_personal(path).config`.
        `quantize`: the frozen base in 4 or 8 bits (`hdb.models.load_pipeline`; a CUDA GPU)."""
        pipe = load_pipeline(base, dtype, device, quantize)
        if isinstance(hypernet, (str, Path)):
            from hdb.hypernet import HyperNetwork

            hypernet = HyperNetwork.from_pretrained(hypernet, device=denoiser(pipe).device)
        return cls(pipe, hypernet, lidb_config)

    # -- the person

    @property
    def resolution(self) -> int:
        """The base model's native picture size (512 for SD1.5, 1024 for SDXL): what it trains and draws at."""
        return native_resolution(self.pipe)

    @property
    def default_steps(self) -> int:
        """Finetune steps when a config says None: the paper's 40 from a prediction, more from zero."""
        return STEPS_WITH_HYPERNET if self.hypernet is not None else STEPS_FROM_ZERO

    def faces(self, photos: Photos, resolution: int | None = None) -> list[AlignedFace]:
        """Each photo's face, aligned and cropped for this base model: the one crop-size and photo-count rule.

        `resolution`: what the finetune trains at (None: the native size); aligned faces pass through as they are.
        """
        photos = photos if isinstance(photos, list) else [photos]
        check_photo_count(len(photos))
        size = crop_size(resolution or self.resolution)
        return [photo if isinstance(photo, AlignedFace) else align_face(photo, size=size) for photo in photos]

    def personalize(
        self,
        photos: Photos,
        config: PersonalizeConfig | None = None,
        on_step: Callable[[int, float], None] | None = None,
        start: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> Personalization:
        """Personalise to the face in `photos` (up to MAX_PHOTOS of one person): the prediction (or zero), the
        rank relaxation, the fast finetune. Afterwards this pipeline holds the person; if anything fails, it
        holds nobody (the base model), never a half-trained person.

        `start`: LiDB weights (A, B) to start from instead of the hypernetwork's prediction (or zero).
        `config.steps=0` keeps the start as it is (no relaxation, no finetune): refused when it would be zero.
        """
        config = config or PersonalizeConfig()
        if config.lidb is not None:  # a LiDB shape asked for must be this pipeline's (the rank may differ)
            ours, wanted = self.lidb.signature(), config.lidb
            asked = replace(ours, a=wanted.a, b=wanted.b, seed=wanted.seed, layers=wanted.layers)
            check_signature(asked, ours, "PersonalizeConfig.lidb")
        faces = self.faces(photos, config.resolution)
        steps = config.steps if config.steps is not None else self.default_steps
        check_steps(steps, has_start=start is not None or self.hypernet is not None)
        prompt = instance_prompt_for(config.instance_token)
        try:
            A, B = start if start is not None else self._start(faces)
            if steps == 0:  # the start alone
                self.lidb.start_from(A, B)
                losses = []
            else:
                relaxed_rows = torch.Generator().manual_seed(config.seed)  # the same person from the same seed
                relax(self.lidb, config.relax, A, B, config.relaxed_rank, relaxed_rows, config.train_prediction)
                losses = finetune(self.pipe, self.lidb, faces, config, steps, on_step)
        except BaseException as error:
            if isinstance(error, TrainingDiverged):  # the guard's restored weights, for callers that score them
                error.last_good = PersonalWeights.from_lidb(self.lidb, prompt, config.instance_token)
            self.forget()
            raise
        self.person = PersonalWeights.from_lidb(self.lidb, prompt, config.instance_token)
        return Personalization(self.person, faces, losses, steps, self.hypernet is not None)

    @torch.no_grad()
    def _start(self, faces: list[AlignedFace]) -> tuple[torch.Tensor, torch.Tensor]:
        """Where the finetune starts: the hypernetwork's prediction, else zero. Several photos' predictions are
        averaged as updates, exactly: the mean of k rank-r updates B_i A_i is the rank-kr update [B_1 .. B_k] / k
        times [A_1; ..; A_k]. (Averaging A and B apart would depend on each prediction's gauge: A -> -A, B -> -B
        is the same update, yet averages to zero with its copy.)"""
        if self.hypernet is None:
            return self.lidb.own.initial_weights()
        predictions = [self.hypernet.predict(face.image) for face in faces]
        A = torch.cat([A for A, _ in predictions], dim=1)  # [L, k r, a]
        B = torch.cat([B for _, B in predictions], dim=2) / len(predictions)  # [L, b, k r]
        return A, B

    def use(self, person: PersonalWeights | str | Path) -> PersonalWeights:
        """Hold `person` (a personal file or its weights) from now on, after checking it fits this base."""
        weights = person if isinstance(person, PersonalWeights) else load_personal(person)
        self.check(weights)
        try:
            self.lidb.start_from(weights.A, weights.B, weights.config.rank)  # any rank; no plain LoRA
            if weights.lora_down is not None:
                self.lidb.load_lora(weights.lora_down, weights.lora_up)
        except BaseException:
            self.forget()
            raise
        self.person = weights
        return weights

    def check(self, person: PersonalWeights) -> None:
        """Refuse a person made for another base family or architecture, LiDB layers or aux bases, naming what
        differs."""
        family = family_of(self.pipe)
        if person.base_family and person.base_family != family.name:
            made_on = FAMILIES[person.base_family].title
            raise HdbError(
                f"This personal file does not fit this model: it was made for another base model architecture, "
                f"a {made_on} base; this base is {family.title}"
            )
        check_signature(person.signature(), self.lidb.signature(), "This personal file")

    def use_weights(self, A: torch.Tensor, B: torch.Tensor) -> None:
        """Hold raw LiDB weights (A: [L, r, a], B: [L, b, r]), e.g. a prediction to score; `person` is then None."""
        self.lidb.start_from(A, B)
        self.person = None

    def forget(self) -> None:
        """Hold nobody: the LiDB back to its start (B = 0), so the pipeline draws what the base model draws."""
        self.lidb.unmerge()
        self.lidb.start_from(*self.lidb.own.initial_weights())
        self.person = None

    def unload(self) -> None:
        """Take the LiDB off: the diffusers pipeline is exactly as it was before this object was made."""
        self.lidb.unmerge()
        self.lidb.unload()
        self.person = None

    # -- pictures and files

    def generate(
        self,
        prompt: str,
        style: str = GenerateOptions.style,
        strength: float = GenerateOptions.strength,
        negative_prompt: str | None = GenerateOptions.negative_prompt,
        steps: int | None = GenerateOptions.steps,
        guidance: float | None = GenerateOptions.guidance,
        seed: int = GenerateOptions.seed,
        num_images: int = GenerateOptions.num_images,
        height: int | None = GenerateOptions.height,
        width: int | None = GenerateOptions.width,
        on_step: Callable[[int], None] | None = None,
    ) -> list[Image.Image]:
        """Pictures of the person held, `prompt` naming them with [V], in `style`, at identity `strength`.

        The options are `GenerateOptions`' (their defaults and ranges written there): `negative_prompt` None follows
        the style; `steps`, `guidance` None, the base's own. Identity strength, merged weights and scheduler are as
        before afterwards, also when sampling fails.
        """
        full_prompt = expand_prompt(prompt, self._held().instance_token, style)
        negative = negative_for(style) if negative_prompt is None else check_prompt(negative_prompt, "negative prompt")
        return generate(
            self.pipe, self.lidb, full_prompt, negative, steps=steps, guidance=guidance, seed=seed,
            num_images=num_images, identity_strength=strength, height=height, width=width, on_step=on_step,
        )  # fmt: skip

    def save(self, path: str | Path, dtype: torch.dtype = torch.float32) -> Path:
        """The person held, as a personal file (~100 KB at the paper's rank 1)."""
        return save_personal(self._held(), path, dtype)

    def export(self, path: str | Path, format: str = "diffusers", dtype: torch.dtype = torch.float32) -> Path:
        """The person held, as an ordinary LoRA file for diffusers or kohya tools (A1111, ComfyUI)."""
        return export_lora(self._held(), path, format, dtype)

    def _held(self) -> PersonalWeights:
        if self.person is None:
            raise HdbError("No person is loaded: personalise a photo or load a personal file first")
        return self.person

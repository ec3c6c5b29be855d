"""What a base-model family is to hdb: the few things that differ between diffusers bases, asked through one class.

A family names its denoiser and text encoders (the pipeline components LiDB attaches to) and the projections it
targets in each; encodes prompts and calls its denoiser; says its training objective, its native size, how it
samples, what LoRA files call its layers (and which of them kohya's files fuse into one); and builds a tiny random
pipeline of itself for tests. Everything else in hdb is written once and asks the family (`hdb.families.family_of`).
Subclasses override what differs.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch
from diffusers import AutoencoderTiny, DiffusionPipeline
from torch import nn

from hdb.errors import HdbError

# A LoRA per layer: name -> (down [R, in], up [out, R]), its delta up @ down
LayerFactors = dict[str, tuple[torch.Tensor, torch.Tensor]]


def lora_module_path(name: str) -> tuple[str, str]:
    """ "text_encoder.encoder.layers.0..." -> ("text_encoder", "text_model.encoder.layers.0...").

    transformers 5 dropped the `text_model` level from CLIPTextModel; LoRA files everywhere (A1111,
    ComfyUI, kohya's sd-scripts, older diffusers) name it, and diffusers accepts either, so files use the classic path.
    """
    component, path = name.split(".", 1)
    if component.startswith("text_encoder") and not path.startswith("text_model."):
        path = f"text_model.{path}"
    return component, path


def vae_latents(vae: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """Pixels in [-1, 1] -> the VAE's latents before scaling: its posterior's mean (AutoencoderKL: one photo, no
    sampling noise), or its one encoding (AutoencoderTiny, TAESD's shape, which has no posterior)."""
    encoded = vae.encode(pixels.to(vae.device, vae.dtype))
    return encoded.latents if isinstance(vae, AutoencoderTiny) else encoded.latent_dist.mean


@dataclass
class Conditioning:
    """What the denoiser is conditioned on: token embeddings, plus a pooled text embedding where the family has one."""

    embeds: torch.Tensor  # [B, T, D]
    pooled: torch.Tensor | None = None  # [B, D2]

    def expand(self, batch: int) -> Conditioning:
        """The same conditioning for every sample of a batch (from a batch of one)."""
        if self.embeds.shape[0] == batch:
            return self
        pooled = None if self.pooled is None else self.pooled.expand(batch, -1)
        return Conditioning(self.embeds.expand(batch, -1, -1), pooled)


@dataclass(frozen=True)
class Variant:
    """One published kind of base in a family, as LoRA files and model cards name it."""

    title: str  # "Stable Diffusion 2.1 (768 px, v-prediction)"
    reference: str  # its reference model on the Hub: what a card loads when the person was made on a local folder
    kohya_version: str  # kohya's `ss_base_model_version` (sd-scripts' library/model_util.py, sdxl_model_util.py)
    # Stability AI's ModelSpec as kohya's sd-scripts fill it for a LoRA (library/sai_model_spec.py): the
    # architecture (without "/lora"), the resolution, the implementation
    modelspec: tuple[str, str, str]
    # its licence, which weights made from it inherit: a hub licence id, and for "other" the licence's name and link
    license: str
    license_name: str = ""
    license_link: str = ""
    sampling_steps: int = 25  # what pictures are drawn in unless asked (hdb's DPM-Solver draws SD well in ~25)
    guidance: float | None = None  # the guidance they are drawn at unless asked; None: the family's default


class Family(ABC):
    """One family of diffusers pipelines. Class attributes say what it is; methods do what differs."""

    name: ClassVar[str]  # what personal files record ("sd1"); one of hdb.families.BASE_FAMILIES
    title: ClassVar[str]  # how people call it ("Stable Diffusion 1.x")
    tiny_arch: ClassVar[str]  # its tiny random pipeline's name (`hdb tiny-model --arch`)
    pipeline_class: ClassVar[type[DiffusionPipeline]]
    denoiser_name: ClassVar[str]  # the pipeline component that denoises
    text_encoder_names: ClassVar[tuple[str, ...]]  # its text encoders, in the pipeline's order
    lidb_text_encoder_names: ClassVar[tuple[str, ...] | None] = None  # those LiDB targets; None: all of them
    max_prompt_tokens: ClassVar[int | None] = None  # a cap below a tokenizer's own length, where the family has one
    # The projections LiDB targets, as sets: in every module owning all of a set, each of its projections (once)
    denoiser_projections: ClassVar[tuple[tuple[str, ...], ...]]
    text_projections: ClassVar[tuple[tuple[str, ...], ...]]
    layer_choices: ClassVar[tuple[str, ...]] = ("all", "denoiser")  # the hdb.config.LIDB_LAYERS it offers
    kohya_prefixes: ClassVar[dict[str, str]]  # component -> the prefix of its layers' keys in kohya's LoRA files
    kohya_v2: ClassVar[bool] = False  # kohya's `ss_v2`, by which AUTOMATIC1111 tells SD2.x LoRAs apart
    kohya_network_module: ClassVar[str] = "networks.lora"  # the sd-scripts network its kohya LoRAs are trained with
    variants: ClassVar[dict[str, Variant]]  # `variant_name` -> the published base
    card_tags: ClassVar[tuple[str, ...]]  # the tags diffusers' own LoRA training scripts give its LoRAs
    default_guidance: ClassVar[float] = 7.5  # the guidance scale pictures are drawn with unless asked otherwise
    lora_formats: ClassVar[tuple[str, ...]] = ("diffusers", "kohya")  # the hdb.config.LORA_FORMATS it exports

    # -- what a pipeline is

    def matches(self, pipe: DiffusionPipeline) -> bool:
        """Whether `pipe` is of this family (the registry asks each family in turn)."""
        return isinstance(pipe, self.pipeline_class)

    def variant_name(self, pipe: DiffusionPipeline) -> str:
        """Which of `variants` `pipe` is, as personal files and hypernetworks record it: by default what it predicts
        (SD2.x's 512 px base predicts the noise, its 768 px model the velocity)."""
        return self.prediction_type(pipe)

    def variant(self, name: str, base_model: str = "") -> Variant:
        """The published base a person recorded as variant `name` (`variant_name`) and `base_model` (a hub id or a
        folder's name) was made on; the family's first when unknown."""
        return self.variants.get(name) or next(iter(self.variants.values()))

    def sampling_steps(self, pipe: DiffusionPipeline) -> int:
        """The sampling steps pictures are drawn in unless asked: the variant's (FLUX.1 [schnell] is distilled to 4)."""
        return self.variant(self.variant_name(pipe)).sampling_steps

    def sampling_guidance(self, pipe: DiffusionPipeline) -> float:
        """The guidance pictures are drawn at unless asked: the variant's, else the family's."""
        guidance = self.variant(self.variant_name(pipe)).guidance
        return self.default_guidance if guidance is None else guidance

    def denoiser(self, pipe: DiffusionPipeline) -> nn.Module:
        return getattr(pipe, self.denoiser_name)

    def text_encoders(self, pipe: DiffusionPipeline) -> dict[str, nn.Module]:
        """The text encoders by component name."""
        return {name: getattr(pipe, name) for name in self.text_encoder_names if getattr(pipe, name, None) is not None}

    def quantised_components(self) -> tuple[str, ...]:
        """What a quantised base (`hdb.models.load_pipeline(quantize=...)`) holds in 4 or 8 bits: the denoiser and
        the text encoders LiDB does not target (a quantised weight takes no merge)."""
        targeted = self.lidb_text_encoder_names or self.text_encoder_names
        return (self.denoiser_name, *(name for name in self.text_encoder_names if name not in targeted))

    def lidb_components(
        self, pipe: DiffusionPipeline, layers: str = "all"
    ) -> dict[str, tuple[nn.Module, tuple[tuple[str, ...], ...]]]:
        """Component name -> (model, the sets of projections LiDB targets in it), for the `layers` chosen
        (hdb.config.LIDB_LAYERS; an HdbError naming the family's own choices for one it does not offer)."""
        if layers not in self.layer_choices:
            raise HdbError(f"{self.title} bases offer the LiDB layers {', '.join(self.layer_choices)}, not {layers!r}")
        denoiser = {self.denoiser_name: (self.denoiser(pipe), self.denoiser_projections_of(layers))}
        if layers == "denoiser":
            return denoiser
        targeted = self.lidb_text_encoder_names or self.text_encoder_names
        text = {
            name: (model, self.text_projections) for name, model in self.text_encoders(pipe).items() if name in targeted
        }
        return {**denoiser, **text}

    def denoiser_projections_of(self, layers: str) -> tuple[tuple[str, ...], ...]:
        """The sets of the denoiser's projections the `layers` choice targets: by default all of them."""
        return self.denoiser_projections

    def recognises(self, layer_shapes: dict[str, tuple[int, int]]) -> bool:
        """Whether layers saved in a file (name -> (in, out) width) can only be this family's. By default: they name
        only its components, its denoiser among them; a family refines it by what tells it from the others."""
        components = {name.split(".", 1)[0] for name in layer_shapes}
        return self.denoiser_name in components and components <= {self.denoiser_name, *self.text_encoder_names}

    # -- what LoRA files say

    def kohya_name(self, layer: str) -> str:
        """The module kohya's files call a layer: its component's prefix, then its path with "_" for "."."""
        component, path = lora_module_path(layer)
        return f"{self.kohya_prefixes[component]}_{path.replace('.', '_')}"

    def kohya_modules(self, factors: LayerFactors) -> LayerFactors:
        """hdb's layers' LoRAs as the modules kohya's files hold: kohya name -> (down, up). By default one module
        per layer (`kohya_name`); a family whose kohya files fuse layers into one linear fuses their LoRAs too."""
        return {self.kohya_name(layer): pair for layer, pair in factors.items()}

    def modelspec_prediction_type(self, prediction_type: str) -> str | None:
        """ModelSpec's `prediction_type` as kohya's sd-scripts write it (library/sai_model_spec.py); None: none."""
        return "v" if prediction_type == "v_prediction" else "epsilon"

    @abstractmethod
    def native_resolution(self, pipe: DiffusionPipeline) -> int:
        """The image size the base model was trained at."""

    @abstractmethod
    def prediction_type(self, pipe: DiffusionPipeline) -> str:
        """What the denoiser predicts (hdb.personal_file.PREDICTION_TYPES)."""

    # -- prompts and the denoiser

    def tokenize(self, pipe: DiffusionPipeline, prompts: list[str]) -> list[torch.Tensor]:
        """Token ids of `prompts` for each text encoder ([B, length] each, padded to its tokenizer's length), on the
        encoder's device. A training loop tokenises its prompt once and encodes it every step: `pipe.encode_prompt`
        tokenises and copies the ids to the GPU on every call, and a blocking copy to the GPU waits for all the
        work queued there, which would stall every step."""
        token_ids = []
        for name, encoder in self.text_encoders(pipe).items():
            tokenizer = getattr(pipe, name.replace("text_encoder", "tokenizer"))  # diffusers pairs them by name
            length = min(tokenizer.model_max_length, self.max_prompt_tokens or tokenizer.model_max_length)
            ids = tokenizer(prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
            token_ids.append(ids.input_ids.to(encoder.device))
        return token_ids

    @abstractmethod
    def encode_tokens(self, pipe: DiffusionPipeline, token_ids: list[torch.Tensor]) -> Conditioning:
        """Text embeddings with gradients (the text encoders carry LiDB layers too)."""

    @abstractmethod
    def predict(
        self, pipe: DiffusionPipeline, latents: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning
    ) -> torch.Tensor:
        """The denoiser's prediction for a batch of noisy latents."""

    # -- training and sampling

    @abstractmethod
    def training_scheduler(self, pipe: DiffusionPipeline) -> object:
        """The noise schedule the base was trained with, for the diffusion loss."""

    @abstractmethod
    def diffusion_loss(
        self,
        pipe: DiffusionPipeline,
        scheduler: object,
        latents: torch.Tensor,
        cond: Conditioning,
        noise: torch.Tensor,
        timesteps: torch.Tensor,
    ) -> torch.Tensor:
        """Per-sample loss of the denoiser's prediction at the given noise and timesteps: [B]."""

    @abstractmethod
    def encode_images(self, pipe: DiffusionPipeline, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1], [B, 3, H, W] -> the latents the denoiser works on (the posterior mean)."""

    def sampling_arguments(self, negative_prompt: str, guidance: float) -> dict:
        """What the pipeline's call takes for a negative prompt and the guidance scale."""
        return {"negative_prompt": negative_prompt or None, "guidance_scale": guidance}

    @abstractmethod
    def sampling_scheduler(self, pipe: DiffusionPipeline) -> object:
        """The scheduler generation samples with."""

    # -- tiny pipelines

    @abstractmethod
    def build_tiny(self, seed: int) -> DiffusionPipeline:
        """A randomly initialised pipeline of this family, built offline in under a second."""

    def build_full_size(self) -> DiffusionPipeline:
        """The family's reference model's shapes on the meta device (no weights, no memory), for counting a step's
        operations, FLOPs and parameters; an HdbError for a family that has none here."""
        raise HdbError(f"hdb has no full-size shapes of {self.title} to count")

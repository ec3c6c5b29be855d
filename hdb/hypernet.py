"""The HyperDreamBooth hypernetwork: one face photo -> a person's LiDB weights in one forward pass.

    image --ViT--> image tokens ---------------------------+ (cross-attention)
    weights (start at 0) -> one token per LiDB layer -> transformer decoder -> per-layer heads -> delta
    weights += delta, repeated `iterations` times with the same decoder (the paper's iterative refinement)

Each LiDB layer i is one token: its current weights [A_i.flatten(), B_i.flatten()] ((a+b)*r numbers)
projected to `width`, plus a learned position embedding saying which layer it is. Self-attention lets
layers agree with each other; cross-attention reads the face. The heads start near zero (the authors'
advice) so an untrained hypernetwork predicts "no change" (each number ~1e-3) rather than noise.

The output, A [B, L, r, a] and B [B, L, b, r], is exactly what `LiDBTerm.use_per_sample` (`lidb.own`) takes, so the
diffusion loss trains the hypernetwork end to end through the LiDB layers.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image, ImageOps
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModel, CLIPVisionConfig, CLIPVisionModel

from hdb.config import DECODER_INPUTS, HYPERNET_STARTS, LIDB_LAYERS, DecoderConfig
from hdb.errors import HdbError, check_choice, from_hub_or_directory
from hdb.lidb import LiDB, LiDBConfig, Signature, arch_fingerprint, check_signature, start_A
from hdb.models import base_family, base_variant, prediction_type
from hdb.personal_file import public_name
from hdb.seeding import initialised_from

CLIP_MEAN = (0.4815, 0.4578, 0.4082)
CLIP_STD = (0.2686, 0.2613, 0.2758)
NO_GRADIENT = ("k_proj.bias", "attention.key.bias", "mask_token")  # CLIP/SigLIP, ViT/DINOv2 names
DECODER_FIELDS = tuple(item.name for item in fields(DecoderConfig))
CONFIG_FILE, WEIGHTS_FILE, ENCODER_DIR = "config.json", "hypernet.safetensors", "image_encoder"
TRAINING_FILE = "training.json"  # how it was trained, written by stage 2 (read by the model card)


@dataclass
class HyperNetworkConfig:
    image_encoder: str  # hub id, or the name of the folder, the encoder was loaded from (informational)
    num_layers: int  # L, LiDB layers of the base
    rank: int
    a: int
    b: int
    decoder: DecoderConfig = DecoderConfig()
    image_size: int = 224
    image_mean: tuple[float, ...] = CLIP_MEAN
    image_std: tuple[float, ...] = CLIP_STD
    # The LiDB this hypernetwork predicts for: its weights mean nothing with other aux bases or layers.
    lidb_seed: int = 0
    lidb_layers: str = LIDB_LAYERS[0]  # hdb.config.LIDB_LAYERS; configs from before the choice had every layer
    arch_fingerprint: str = ""
    aux_fingerprint: str = ""
    layer_names: list[str] = field(default_factory=list)
    base_model: str = ""  # hub id, or folder name, of the base it was trained with (informational: fingerprints decide)
    base_family: str = ""  # ... its family and what it predicts (hdb.models; "" in configs from before they were kept)
    prediction_type: str = ""
    base_variant: str = ""  # which published base of the family (`Family.variants`); "" in older configs


def load_image_encoder(name_or_path: str) -> nn.Module:
    """A transformers vision model whose output has `last_hidden_state` [B, T, D] (CLIP/SigLIP: the vision tower)."""
    model = from_hub_or_directory("image encoder", name_or_path, AutoModel.from_pretrained)
    return getattr(model, "vision_model", model)  # full CLIP/SigLIP: keep only the image tower


def build_tiny_image_encoder(seed: int = 0) -> CLIPVisionModel:
    """A randomly initialised miniature CLIP vision tower (64 px, 16 px patches) for tests and demos."""
    config = CLIPVisionConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, image_size=64, patch_size=16
    )
    with initialised_from(seed):
        return CLIPVisionModel(config)


def _encoder_setting(encoder: nn.Module, key: str) -> int | None:
    config = getattr(encoder, "config", None)
    value = getattr(config, key, None) or getattr(getattr(config, "vision_config", None), key, None)
    return int(value) if isinstance(value, int) else None


def encoder_crops(images: list[Image.Image], size: int) -> torch.Tensor:
    """The image encoder's view of each image, uint8 [B, 3, size, size]: centre square crop, bicubic resize (CLIP's
    recipe). What the training cache stores; `HyperNetwork.normalise` makes it the encoder's input."""
    squares = [ImageOps.fit(image.convert("RGB"), (size, size), Image.BICUBIC) for image in images]  # no squashing
    pixels = torch.from_numpy(np.stack([np.asarray(square, dtype=np.uint8) for square in squares]))
    return pixels.permute(0, 3, 1, 2).contiguous()


def encoder_image_size(name_or_path: str) -> int:
    """The input side of image encoder `name_or_path` (hub id, directory or "tiny"), from its config alone."""
    if name_or_path == "tiny":
        return build_tiny_image_encoder().config.image_size
    from transformers import AutoConfig

    config = from_hub_or_directory("image encoder", name_or_path, AutoConfig.from_pretrained)
    size = _encoder_setting(SimpleNamespace(config=config), "image_size")
    return size if size is not None else HyperNetworkConfig.image_size


def config_values(recorded: dict) -> dict:
    """A saved config.json's values as HyperNetworkConfig takes them: tuples where JSON has lists, and the decoder's
    settings in `decoder` (configs of hdb 0.x kept them at the top level)."""
    values = {key: value for key, value in recorded.items() if key not in DECODER_FIELDS}
    values.update({key: tuple(values[key]) for key in ("image_mean", "image_std") if key in values})
    values["decoder"] = recorded.get("decoder") or {key: recorded[key] for key in DECODER_FIELDS if key in recorded}
    return values


class HyperNetwork(nn.Module):
    def __init__(self, config: HyperNetworkConfig, image_encoder: nn.Module, seed: int = 0) -> None:
        """`seed` draws the initial weights of the layers around `image_encoder` (loaded weights replace them)."""
        super().__init__()
        self.config = config
        hidden = _encoder_setting(image_encoder, "hidden_size")
        if hidden is None:
            raise HdbError(
                f"Cannot tell the hidden size of image encoder {type(image_encoder).__name__} (no config.hidden_size)"
            )
        decoder = config.decoder
        L, width, size = config.num_layers, decoder.width, (config.a + config.b) * config.rank
        self.image_encoder = image_encoder
        # Freeze what can never learn: attention key biases (softmax ignores a shift shared by all keys, so
        # their gradient is zero up to rounding) and ViT/DINOv2 mask tokens (masked-image-modelling only).
        for name, parameter in image_encoder.named_parameters():
            if name.endswith(NO_GRADIENT):
                parameter.requires_grad_(False)
        with initialised_from(seed):
            self.image_proj = nn.Linear(hidden, width)
            self.image_norm = nn.LayerNorm(width)  # the pre-norm decoder layers do not normalise the memory
            # One projection per LiDB layer (layers differ in meaning), batched into one tensor.
            self.weight_in = nn.Parameter(torch.randn(L, size, width) / size**0.5)
            self.position = nn.Parameter(torch.randn(L, width) * 0.02)
            check_choice("decoder_input", decoder.decoder_input, DECODER_INPUTS)
            if decoder.decoder_input == "cross":  # weight tokens self-attend, then cross-attend to the face
                layer = nn.TransformerDecoderLayer(
                    width, decoder.heads, 4 * width, dropout=0.0, batch_first=True, norm_first=True
                )
                self.decoder = nn.TransformerDecoder(layer, decoder.depth, norm=nn.LayerNorm(width))
            else:  # the paper's: image and weight tokens one sequence, self-attention only
                layer = nn.TransformerEncoderLayer(
                    width, decoder.heads, 4 * width, dropout=0.0, batch_first=True, norm_first=True
                )
                self.decoder = nn.TransformerEncoder(
                    layer, decoder.depth, norm=nn.LayerNorm(width), enable_nested_tensor=False
                )
            # Near zero, so the first prediction is ~ "no change" (the authors' N(0, 1e-3)). The decoder's output
            # is layer-normed (entries ~1), so the weights are scaled by 1/sqrt(width) to make each predicted
            # number ~1e-3 whatever the width; plain N(0, 1e-3) would give ~0.1 at width 512 after 4 iterations.
            self.head = nn.Parameter(torch.randn(L, width, size) * 1e-3 / width**0.5)
            self.head_bias = nn.Parameter(torch.randn(L, size) * 1e-3)
        # The iterations start where LiDB training from zero starts (A random, B zero, as LoRA): the model
        # is unchanged, yet the diffusion loss has a gradient at once (at A = B = 0 it has none). Or at zero,
        # the paper's start. Saved with the weights, so a checkpoint predicts the same everywhere.
        check_choice("refine_from", decoder.refine_from, HYPERNET_STARTS)
        A = start_A(L, self.lidb_config).flatten(1) * (decoder.refine_from == "lora")
        self.register_buffer("start", torch.cat([A, torch.zeros(L, config.b * config.rank)], dim=1))

    @property
    def device(self) -> torch.device:
        return self.head.device

    @property
    def lidb_config(self) -> LiDBConfig:
        """The LiDB shape and seed to attach to a base so that this hypernetwork's predictions fit it."""
        c = self.config
        return LiDBConfig(rank=c.rank, a=c.a, b=c.b, seed=c.lidb_seed, layers=c.lidb_layers)

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Pixels [B, 3, S, S] -> image tokens [B, T, width]."""
        dtype = next(self.image_encoder.parameters()).dtype
        out = self.image_encoder(pixel_values=pixel_values.to(self.device, dtype))
        tokens = out.last_hidden_state
        pooled = getattr(out, "pooler_output", None)
        # The pooled summary joins the tokens: a useful global token, and without it the encoder's
        # pooling layers (CLIP's post_layernorm, SigLIP's head) would be parameters that never learn.
        if pooled is not None and pooled.shape[-1] == tokens.shape[-1]:
            tokens = torch.cat([pooled[:, None], tokens], dim=1)
        return self.image_norm(self.image_proj(tokens.to(self.image_proj.weight.dtype)))

    def forward(self, pixel_values: torch.Tensor, iterations: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Pixels [B, 3, S, S] -> LiDB weights A [B, L, r, a], B [B, L, b, r]."""
        c = self.config
        image_tokens = self.encode_image(pixel_values)
        weights = self.start.to(image_tokens.dtype).expand(image_tokens.shape[0], -1, -1)
        for _ in range(c.decoder.iterations if iterations is None else iterations):
            weights = self.refine(weights, image_tokens)
        split = c.rank * c.a  # A's numbers first, then B's, as the tokens were built
        A = weights[..., :split].unflatten(-1, (c.rank, c.a))
        B = weights[..., split:].unflatten(-1, (c.b, c.rank))
        return A, B

    def refine(self, weights: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
        """One refinement iteration: the flat weights [B, L, (a+b)r] plus the decoder's correction, given the face."""
        tokens = torch.einsum("bli,liw->blw", weights, self.weight_in) + self.position
        if self.config.decoder.decoder_input == "cross":
            tokens = self.decoder(tokens, image_tokens)
        else:  # one sequence, the weight tokens last; only their outputs are read
            tokens = self.decoder(torch.cat([image_tokens, tokens], dim=1))[:, image_tokens.shape[1] :]
        return weights + torch.einsum("blw,lwo->blo", tokens, self.head) + self.head_bias

    def preprocess(self, images: list[Image.Image]) -> torch.Tensor:
        """PIL images -> normalised pixels [B, 3, S, S] (`encoder_crops`, then `normalise`)."""
        return self.normalise(encoder_crops(images, self.config.image_size))

    def normalise(self, crops: torch.Tensor) -> torch.Tensor:
        """`encoder_crops`' uint8 crops [B, 3, S, S] -> the encoder's input: scaled to [0, 1], less the mean, over
        the std; on the hypernetwork's device."""
        mean, std = torch.tensor(self.config.image_mean), torch.tensor(self.config.image_std)
        pixels = crops.to(torch.float32) / 255.0
        return ((pixels - mean[:, None, None]) / std[:, None, None]).to(self.device)

    @torch.no_grad()
    def predict(self, image: Image.Image, iterations: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One person's weights, A [L, r, a], B [L, b, r] in fp32, ready for `LiDBTerm.load_weights`; after
        `iterations` refinements (None: the s it was trained with)."""
        was_training = self.training
        self.eval()
        try:
            A, B = self(self.preprocess([image]), iterations)
        finally:
            self.train(was_training)
        return A[0].float(), B[0].float()

    # -- the LiDB it belongs to

    @classmethod
    def for_lidb(
        cls,
        lidb: LiDB,
        image_encoder: nn.Module,
        image_encoder_name: str,
        seed: int = 0,
        decoder: DecoderConfig = DecoderConfig(),
    ) -> HyperNetwork:
        """A fresh hypernetwork predicting weights for `lidb` (its layers, shapes and aux bases) with this `decoder`,
        drawn from `seed`."""
        values = dict(
            image_encoder=public_name(image_encoder_name),  # informational, and the file may be shared: no path
            num_layers=len(lidb.layer_names),
            rank=lidb.config.rank,
            a=lidb.config.a,
            b=lidb.config.b,
            lidb_seed=lidb.config.seed,
            lidb_layers=lidb.config.layers,
            arch_fingerprint=arch_fingerprint(lidb.layer_shapes),
            aux_fingerprint=lidb.aux_fingerprint(),
            layer_names=list(lidb.layer_names),
            base_model=public_name(lidb.base_model),
            base_family=base_family(lidb.pipe),
            prediction_type=prediction_type(lidb.pipe),
            base_variant=base_variant(lidb.pipe),
            decoder=decoder,
        )
        image_size = _encoder_setting(image_encoder, "image_size")
        if image_size is not None:
            values["image_size"] = image_size
        return cls(HyperNetworkConfig(**values), image_encoder, seed)

    def signature(self) -> Signature:
        """The LiDB this hypernetwork predicts for: its weights mean nothing for another."""
        return _signature(self.config)

    def check_compatible(self, lidb: LiDB) -> None:
        """Raise HdbError if this hypernetwork's weights would mean nothing for `lidb`."""
        check_signature(self.signature(), lidb.signature(), "This hypernetwork")

    # -- files

    def save_pretrained(self, directory: str | Path, image_encoder: bool = True) -> None:
        """config.json + hypernet.safetensors (all but the encoder) + image_encoder/ (its own format).

        `image_encoder=False` leaves the encoder out (a training checkpoint of a frozen one: loading it again
        then takes the encoder as an argument, `from_pretrained(image_encoder=...)`)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / CONFIG_FILE).write_text(json.dumps(asdict(self.config), indent=2))
        own = {
            k: v.detach().contiguous().cpu() for k, v in self.state_dict().items() if not k.startswith("image_encoder.")
        }
        save_file(own, str(directory / WEIGHTS_FILE), metadata={"format": "hdb-hypernet"})
        if image_encoder:
            self.image_encoder.save_pretrained(directory / ENCODER_DIR)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path,
        lidb: LiDB | None = None,
        device: str | torch.device | None = None,
        revision: str | None = None,
        token: str | None = None,
        image_encoder: nn.Module | None = None,
    ) -> HyperNetwork:
        """Load what `save_pretrained` wrote, from a directory or a hub id ("owner/name", see `hdb.hub`).

        With `lidb`, first check that the weights are meant for it. For a hub id, `revision` (a branch, tag or
        commit) and `token` (a private repository) go to huggingface_hub's `snapshot_download`. `image_encoder`:
        the encoder to use instead of the saved one (a checkpoint saved without its frozen encoder).
        """
        directory = hypernet_directory(name_or_path, revision, token)
        if not (directory / CONFIG_FILE).is_file():
            raise HdbError(f"{directory} is not a saved hypernetwork (no {CONFIG_FILE})")
        try:
            values = config_values(json.loads((directory / CONFIG_FILE).read_text()))
            config = HyperNetworkConfig(**{**values, "decoder": DecoderConfig(**values["decoder"])})
            check_choice("LiDB layers", config.lidb_layers, LIDB_LAYERS)
        except (ValueError, TypeError, HdbError) as error:
            raise HdbError(f"{directory / CONFIG_FILE} is not a valid hypernetwork config: {error}") from None
        if lidb is not None:  # before loading a possibly large image encoder
            check_signature(_signature(config), lidb.signature(), "This hypernetwork")
        if image_encoder is None:
            if not (directory / ENCODER_DIR / "config.json").is_file():
                raise HdbError(f"{directory} has no saved image encoder ({ENCODER_DIR}/config.json is missing)")
            image_encoder = load_image_encoder(str(directory / ENCODER_DIR))
        model = cls(config, image_encoder)
        try:
            state = load_file(str(directory / WEIGHTS_FILE))
        except Exception as error:  # missing, truncated or not safetensors at all
            raise HdbError(f"Could not read hypernetwork weights {directory / WEIGHTS_FILE}: {error}") from None
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.startswith("image_encoder.")}
        found = {k: tuple(v.shape) for k, v in state.items()}
        if found != expected:
            wrong = sorted(set(found.items()) ^ set(expected.items()))[:3]
            raise HdbError(f"{directory / WEIGHTS_FILE} does not match its config (first differences: {wrong})")
        model.load_state_dict(state, strict=False)  # strict on our part (checked above); the encoder is loaded
        return model.to(device).eval() if device is not None else model.eval()


def hypernet_directory(name_or_path: str | Path, revision: str | None = None, token: str | None = None) -> Path:
    """A local directory as it is; a hub id downloaded at `revision` (or found in the hub cache), with one clear
    error offline."""
    local = Path(name_or_path).expanduser()
    if local.is_dir():
        return local
    from huggingface_hub import snapshot_download

    def download(repo_id: str) -> str:
        return snapshot_download(repo_id, revision=revision, token=token)

    return Path(from_hub_or_directory("hypernetwork", str(name_or_path), download, argument="hypernet"))


def _signature(c: HyperNetworkConfig) -> Signature:
    return Signature(c.arch_fingerprint, c.num_layers, c.a, c.b, c.lidb_seed, c.aux_fingerprint, c.rank, c.lidb_layers)

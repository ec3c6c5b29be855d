"""LiDB, Lightweight DreamBooth: a rank-r LoRA factored through frozen random orthonormal bases.

For every attention projection W (out x in) of the denoiser (a UNet, a DiT) and the text encoder(s) that the base's
family names (`hdb.families`):

    dW = B_aux @ B_train @ A_train @ A_aux
         (out x b)(b x r) (r x a) (a x in)

A_aux and B_aux are random semi-orthogonal matrices regenerated from (seed, layer name, shape), never
stored. Only A_train and B_train are personal: r*(a+b) numbers a layer, 26,400 for SD1.5 at the
paper's r=1, a=100, b=50. Since `lora_A = A_train @ A_aux` and `lora_B = B_aux @ B_train`, LiDB is
an exact rank-r LoRA, which is how the forward pass computes it (cheaper than four matmuls) and how
`hdb.export` writes it. The factors of all layers of a component (denoiser, text encoder) are built together
at the start of its forward pass, a few batched matmuls for layers of the same shape, rather than a
handful of small kernels in each of the 176 layers: an eager step, text encoder included, then
dispatches as many operations as a plain LoRA step on the UNet alone (see `LiDBTerm.build`).

One primitive serves every stage. All layers of a pipeline read their weights from one packed pair
of tensors held by `LiDB`:
  * shared weights `A: [L, r, a]`, `B: [L, b, r]`: one person (inference, personal files, finetuning);
  * per-sample weights `A: [S, L, r, a]`, `B: [S, L, b, r]`: a different person per batch element
    (pre-optimising many identities at once, training the hypernetwork), applied with batched matmuls.

A layer adds a list of low-rank terms (`LowRankTerm`), the LiDB weights first (`LiDBTerm`); a relaxation may put
more on top: the paper's keeps the predicted rank-1 LiDB and finetunes a plain rank-r LoRA beside it (`LoRATerm`,
`LiDB.add_lora`), free of the aux bases. Forward, merging and training sum or move whatever terms there are. The
ways of relaxing are strategies over LiDB's primitives (hdb/relaxations.py): adding one is a class and a registry
line there, and a term here if it needs state of its own.
"""

from __future__ import annotations

import hashlib
import math
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from hdb.config import LIDB_LAYERS, LiDBConfig
from hdb.errors import HdbError
from hdb.families import family_of

if TYPE_CHECKING:
    from hdb.models import Pipeline


# ----------------------------------------------------------------------------- frozen aux bases


def _semi_orthogonal(rows: int, cols: int, generator: torch.Generator) -> torch.Tensor:
    """Random matrix with orthonormal rows (rows <= cols) or orthonormal columns (rows > cols)."""
    tall = torch.randn(max(rows, cols), min(rows, cols), generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(tall)
    q = q * torch.sign(torch.diagonal(r))  # fix QR's sign ambiguity so the basis is unique
    return (q if rows > cols else q.T).float().contiguous()


def aux_bases(
    seed: int, name: str, in_features: int, out_features: int, a: int, b: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A_aux [a, in], B_aux [out, b]) for one layer: deterministic on CPU from (seed, name, shape)."""
    key = hashlib.sha256(f"{seed}|{name}|{in_features}x{out_features}|{a}|{b}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(key[:8], "little") >> 1)
    return _semi_orthogonal(a, in_features, generator), _semi_orthogonal(out_features, b, generator)


def lora_factors(
    A: torch.Tensor, B: torch.Tensor, A_aux: torch.Tensor, B_aux: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact LoRA of LiDB weights: lora_A = A_train @ A_aux [.., r, in], lora_B = B_aux @ B_train [.., out, r]."""
    return A.float() @ A_aux, B_aux @ B.float()


def weight_distance(A: torch.Tensor, B: torch.Tensor, target_A: torch.Tensor, target_B: torch.Tensor) -> torch.Tensor:
    """How far LiDB weights are from target weights, per sample: sum_l ||B A - B' A'||^2 / sum_l ||B' A'||^2.

    Compared on each layer's core B @ A (b x a), not on A and B: a product is unchanged by A -> cA,
    B -> B/c (and any r x r mixing), so factors of the same function can differ entry by entry. As the
    aux bases are orthonormal, ||B_aux (core) A_aux|| = ||core|| (when a <= in and b <= out, as in every
    SD layer): this is the distance between the dense dW matrices. Divided by the target's energy, 1 means
    "as far off as predicting zero", whatever the weights' scale.
    Shapes: A [S, L, r, a], B [S, L, b, r]; targets [S, L, r', a], [S, L, b, r'] (r' may differ from r).
    """
    error = (B.float() @ A.float() - target_B.float() @ target_A.float()).square().sum(dim=(1, 2, 3))
    energy = (target_B.float() @ target_A.float()).square().sum(dim=(1, 2, 3))
    return error / energy.clamp_min(1e-12)


def _fingerprint(parts: Iterable[bytes]) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part)
    return digest.hexdigest()[:16]


def arch_fingerprint(layer_shapes: dict[str, tuple[int, int]]) -> str:
    """Identifies a base architecture by its LiDB layer names and shapes."""
    return _fingerprint(f"{name}:{i}x{o};".encode() for name, (i, o) in layer_shapes.items())


def aux_fingerprint(bases: Iterable[torch.Tensor]) -> str:
    """Identifies aux bases. Rounded, so that it is stable across CPUs and BLAS builds, not only runs."""
    return _fingerprint(
        torch.round(basis.detach().cpu().double() * 1e4).to(torch.int32).numpy().tobytes() for basis in bases
    )


@dataclass(frozen=True)
class Signature:
    """What LiDB weights belong to, and mean nothing without: the base's layers and the aux bases.

    Personal files, hypernetworks, stage 1's manifest and an attached LiDB each carry one;
    `check_signature` compares two. The rank is carried too, but only compared where numbers are matched
    one to one (stage 1's weights as stage 2's targets): personalisation relaxes it anyway.
    """

    arch_fingerprint: str  # the base's LiDB layer names and shapes (`arch_fingerprint`)
    num_layers: int
    a: int
    b: int
    seed: int
    aux_fingerprint: str  # the aux bases themselves: same seed, other bases means the recipe changed
    rank: int
    layers: str = LIDB_LAYERS[0]  # which of the base's layers (hdb.config.LIDB_LAYERS)

    @classmethod
    def of(cls, layer_shapes: dict[str, tuple[int, int]], config: LiDBConfig, aux_fingerprint: str) -> Signature:
        """The signature of weights made with `config` for layers of these names and shapes, with these aux bases."""
        return cls(
            arch_fingerprint(layer_shapes), len(layer_shapes), config.a, config.b, config.seed, aux_fingerprint,
            config.rank, config.layers,
        )  # fmt: skip


def check_signature(theirs: Signature, ours: Signature, what: str, same_rank: bool = False) -> None:
    """Refuse `what` (made with `theirs`) for a LiDB with signature `ours`, naming every difference."""
    differences = []
    if theirs.layers != ours.layers:  # other layers: another fingerprint too, which would say less
        differences.append(f"it targets the LiDB layers {theirs.layers!r}; this LiDB targets {ours.layers!r}")
    elif (theirs.arch_fingerprint, theirs.num_layers) != (ours.arch_fingerprint, ours.num_layers):
        differences.append(
            f"it was made for another base model architecture ({theirs.num_layers} LiDB layers, fingerprint "
            f"{theirs.arch_fingerprint}; this base has {ours.num_layers}, fingerprint {ours.arch_fingerprint})"
        )
    if (theirs.a, theirs.b, theirs.seed) != (ours.a, ours.b, ours.seed):
        differences.append(
            f"it uses aux bases a={theirs.a}, b={theirs.b}, aux seed {theirs.seed}; this LiDB uses "
            f"a={ours.a}, b={ours.b}, aux seed {ours.seed} (weights only work with their own aux bases)"
        )
    elif theirs.aux_fingerprint != ours.aux_fingerprint and not differences:  # other layers: other bases anyway
        differences.append(
            f"the aux bases regenerated here (fingerprint {ours.aux_fingerprint}) differ from the ones it was made "
            f"with ({theirs.aux_fingerprint}), although a, b and the seed agree"
        )
    if same_rank and theirs.rank != ours.rank:
        differences.append(f"it has rank {theirs.rank}; rank {ours.rank} is needed here")
    if differences:
        raise HdbError(f"{what} does not fit this model: {'; '.join(differences)}")


def random_A(*shape: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """LoRA's init for the down factor, uniform in +-1/sqrt(a): with B = 0 the model is unchanged, gradients flow."""
    return (torch.rand(*shape, generator=generator) * 2 - 1) / math.sqrt(shape[-1])


def start_A(num_layers: int, config: LiDBConfig) -> torch.Tensor:
    """The A that every person's training starts from, fixed by the LiDB seed: [L, rank, a].

    A rank-1 product is unchanged by A -> cA, B -> B/c, so people trained from different random A's
    end up in different "gauges", and a per-entry loss between their weights (the hypernetwork's
    weight term) would compare unlike with unlike. One shared start keeps them comparable.
    """
    return random_A(num_layers, config.rank, config.a, generator=torch.Generator().manual_seed(config.seed))


# ----------------------------------------------------------------------------- the low-rank terms of a layer


def add_low_rank(y: torch.Tensor, x: torch.Tensor, down: torch.Tensor, up: torch.Tensor, scale: float) -> torch.Tensor:
    """y + scale * (x down^T) up^T, the second product fused with the sum (addmm): two kernels for a low-rank update.

    Shared factors: down [r, in], up [out, r]. Per-sample factors: down [S, r, in], up [S, out, r], and batch
    element s of x uses (down[s], up[s]).
    """
    down, up = down.to(x.dtype), up.to(x.dtype)
    if down.dim() == 2:
        hidden = x.reshape(-1, x.shape[-1]) @ down.T
        return torch.addmm(y.reshape(-1, y.shape[-1]), hidden, up.T, alpha=scale).view(y.shape)
    samples = down.shape[0]
    if x.shape[0] != samples:
        raise HdbError(f"LiDB got per-sample weights for {samples} samples but a batch of {x.shape[0]}")
    hidden = torch.bmm(x.reshape(samples, -1, x.shape[-1]), down.mT)
    return torch.baddbmm(y.reshape(samples, -1, y.shape[-1]), hidden, up.mT, alpha=scale).view(y.shape)


def compute_dtype(linear: nn.Linear) -> torch.dtype:
    """The dtype a linear computes in: its weight's, or for a quantised one (bitsandbytes' 4-bit or 8-bit weights are
    integers) the dtype it dequantises to, else its bias's."""
    if linear.weight.dtype.is_floating_point:
        return linear.weight.dtype
    dtype = getattr(linear, "compute_dtype", None)  # bitsandbytes' Linear4bit
    return dtype or (linear.bias.dtype if linear.bias is not None else torch.float32)


class LowRankTerm(ABC):
    """One low-rank update that every LiDB layer adds to its output, at the identity strength.

    The LiDB weights are the first term (`LiDBTerm`); a relaxation may put more on top (`LoRATerm`, the paper's
    plain LoRA beside the prediction). A layer sums its terms in `forward`, `delta_weight` and `merge`, and training
    moves the terms' parameters that require gradients: a relaxation that needs new state is a new term.
    """

    @abstractmethod
    def factors(self, layer: LiDBLinear) -> tuple[torch.Tensor, torch.Tensor]:
        """`layer`'s (down [.., r, in], up [.., out, r]), shared or per sample."""

    @abstractmethod
    def delta(self, layer: LiDBLinear) -> torch.Tensor:
        """`layer`'s dense update (out x in) in fp32, of shared weights: what merging adds."""

    @abstractmethod
    def parameters(self) -> list[nn.Parameter]:
        """The tensors the term is made of; training moves those that require gradients."""

    def clear(self) -> None:  # noqa: B027 (most terms keep nothing built)
        """Forget whatever was built from the parameters: they changed from outside a training step."""


@dataclass
class LayerGroup:
    """LiDB layers of one component with the same shape and dtype: their factors are built by one bmm each."""

    layers: list[int]  # layer indices
    A_aux: torch.Tensor  # [G, a, in], the only copy: each layer holds a view of its slice
    B_aux: torch.Tensor  # [G, out, b]
    dtype: torch.dtype  # the layers' compute dtype (`compute_dtype`), which the factors are cast to once

    def factors(self, A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """lora_A [.., G, r, in] and lora_B [.., G, out, r] of the group's weights A [.., G, r, a], B [.., G, b, r]."""
        A, B = A.float(), B.float()
        if A.dim() == 3:  # shared weights
            down, up = torch.bmm(A, self.A_aux), torch.bmm(self.B_aux, B)
        else:  # per sample: the samples ride along in the matmul's rows, so the bases are never copied per sample
            samples, size, rank, a = A.shape
            down = torch.bmm(A.transpose(0, 1).reshape(size, samples * rank, a), self.A_aux)
            down = down.view(size, samples, rank, -1).transpose(0, 1)
            up = torch.bmm(self.B_aux, B.permute(1, 2, 0, 3).reshape(size, B.shape[2], samples * rank))
            up = up.view(size, -1, samples, rank).permute(2, 0, 1, 3)
        return down.to(self.dtype), up.to(self.dtype)


@dataclass
class ComponentLayers:
    """The LiDB layers of one pipeline component, grouped by shape."""

    order: torch.Tensor  # the component's layer indices, group after group: one gather puts A and B in this order
    groups: list[LayerGroup]


class LiDBTerm(LowRankTerm):
    """The LiDB weights: `A_train: [L, r, a]`, `B_train: [L, b, r]` the shared (one-person) parameters, and `A`, `B`
    what the layers read, the shared ones or per-sample ones (`use_per_sample`).

    `built[i]`: layer i's (lora_A, lora_B), built for all layers of its component at the start of the component's
    forward pass (`build`, a forward pre-hook) and kept until the next one, so that gradient checkpointing's
    recompute during backward reads the very factors the forward used. Every hdb loop runs a component's backward
    before its next forward; a loop that ran two forwards of a checkpointed component before one backward would set
    `batch_factors = False`. Anything that changes the weights from outside a step (loading, switching, scaling,
    merging) clears them, and a layer without built factors builds its own (a layer called on its own, or while
    compiling).
    """

    def __init__(self, config: LiDBConfig, components: dict[str, ComponentLayers], device: torch.device) -> None:
        self.config, self.components = config, components
        self.num_layers = sum(len(layers.order) for layers in components.values())
        self.A_train = nn.Parameter(start_A(self.num_layers, config).to(device))  # = initial_weights(): B = 0
        self.B_train = nn.Parameter(torch.zeros(self.num_layers, config.b, config.rank, device=device))
        self.A, self.B = self.A_train, self.B_train
        self.built: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * self.num_layers
        self._batch_factors = True  # False: each layer builds its own (the bench counts both ways)
        self._frozen_ranks: list[torch.utils.hooks.RemovableHandle] = []  # see freeze_first_ranks

    # -- the factors the layers read

    def build(self, component: str) -> None:
        """Build the factors of every layer of `component`: two gathers, and two bmm's per group of shapes.
        Skipped while torch.compile traces (the compiler fuses each layer's own small matmuls)."""
        if not self._batch_factors or torch.compiler.is_compiling():
            return
        layers = self.components[component]
        sizes = [len(group.layers) for group in layers.groups]
        A_parts = self.A.index_select(-3, layers.order).split(sizes, dim=-3)
        B_parts = self.B.index_select(-3, layers.order).split(sizes, dim=-3)
        for group, A, B in zip(layers.groups, A_parts, B_parts, strict=True):
            down, up = group.factors(A, B)
            for index, layer_down, layer_up in zip(group.layers, down.unbind(-3), up.unbind(-3), strict=True):
                self.built[index] = (layer_down, layer_up)

    def clear(self) -> None:
        self.built = [None] * self.num_layers

    @property
    def batch_factors(self) -> bool:
        """Whether each component builds its layers' factors at once (True), or each layer its own."""
        return self._batch_factors

    @batch_factors.setter
    def batch_factors(self, value: bool) -> None:
        self._batch_factors = value
        self.clear()

    def factors(self, layer: LiDBLinear) -> tuple[torch.Tensor, torch.Tensor]:
        built = None if torch.compiler.is_compiling() else self.built[layer.index]
        if built is not None:
            return built
        A = self.A.select(-3, layer.index)  # [r, a] shared, or [S, r, a] per sample
        B = self.B.select(-3, layer.index)
        down, up = lora_factors(A, B, layer.A_aux, layer.B_aux)
        dtype = compute_dtype(layer.base)
        return down.to(dtype), up.to(dtype)

    def delta(self, layer: LiDBLinear) -> torch.Tensor:
        down, up = lora_factors(self.A[layer.index], self.B[layer.index], layer.A_aux, layer.B_aux)
        return up @ down

    def parameters(self) -> list[nn.Parameter]:
        return [self.A_train, self.B_train]

    # -- routing: shared or per-sample weights

    @property
    def uses_shared(self) -> bool:
        """Whether the layers read the shared (one-person) weights, not per-sample ones."""
        return self.A is self.A_train

    def use_per_sample(self, A: torch.Tensor, B: torch.Tensor) -> None:
        """Route layers to per-sample weights (A: [S, L, r, a], B: [S, L, b, r]) until `use_shared()`.

        For a training loop whose per-sample weights change every step (the hypernetwork's predictions),
        inside `hdb.stage.training_stage`, which routes back to the shared weights on the way out. A loop
        over fixed per-sample weights uses the `per_sample` scope instead. Not a scope around the loss alone:
        with gradient checkpointing the forward pass is re-run during backward, and must see the same weights.
        """
        if A.dim() != 4 or A.shape[1:] != self.A_train.shape or B.shape[1:] != self.B_train.shape:
            raise HdbError(
                f"per-sample LiDB weights must be [S, {', '.join(map(str, self.A_train.shape))}], got {tuple(A.shape)}"
            )
        self.A, self.B = A, B
        self.clear()

    def use_shared(self) -> None:
        self.A, self.B = self.A_train, self.B_train
        self.clear()

    @contextmanager
    def per_sample(self, A: torch.Tensor, B: torch.Tensor) -> Iterator[None]:
        """Layers read the per-sample weights (A: [S, L, r, a], B: [S, L, b, r]) for the block (forward and
        backward), the shared weights again on the way out."""
        self.use_per_sample(A, B)
        try:
            yield
        finally:
            self.use_shared()

    # -- the shared weights

    @torch.no_grad()
    def load_weights(self, A: torch.Tensor, B: torch.Tensor) -> None:
        """Copy one person's weights (A: [L, r, a], B: [L, b, r]) into the shared weights."""
        expected_A, expected_B = tuple(self.A_train.shape), tuple(self.B_train.shape)
        if tuple(A.shape) != expected_A or tuple(B.shape) != expected_B:
            raise HdbError(
                f"LiDB weights of shape {tuple(A.shape)}/{tuple(B.shape)} do not fit this model "
                f"({expected_A}/{expected_B})"
            )
        self.A_train.copy_(A)
        self.B_train.copy_(B)
        self.clear()

    def initial_weights(self, count: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Where training from zero starts, as in LoRA: A random, B zero (no change, yet gradients flow).

        count=None gives one person ([L, r, a], [L, b, r]); count=N gives N people ([N, L, r, a], ...).
        Everyone starts from the same A, the one the hypernetwork starts from (see `start_A`).
        """
        A = start_A(self.num_layers, self.config)
        B = torch.zeros(self.num_layers, self.config.b, self.config.rank)
        if count is not None:
            A, B = A.expand(count, -1, -1, -1).clone(), B.expand(count, -1, -1, -1).clone()
        return A.to(self.A_train.device), B.to(self.A_train.device)

    @torch.no_grad()
    def start_from(self, A: torch.Tensor, B: torch.Tensor, rank: int, generator: torch.Generator | None) -> None:
        """Rank-k weights (A: [L, k, a], B: [L, b, k]) at `rank` >= k, read by the layers: the extra rows of A
        random, the extra columns of B zero. The parameters are reused when the rank does not change (a server
        personalising one person after another)."""
        if A.shape[1] > rank:
            raise HdbError(f"Cannot relax rank {A.shape[1]} down to {rank}")
        for hook in self._frozen_ranks:  # whatever is loaded now trains whole again
            hook.remove()
        self._frozen_ranks = []
        if rank != self.A_train.shape[1]:
            self.A_train = nn.Parameter(self.A_train.new_empty(self.num_layers, rank, self.config.a))
            self.B_train = nn.Parameter(self.B_train.new_empty(self.num_layers, self.config.b, rank))
        start, device = A.shape[1], self.A_train.device
        self.A_train[:, start:] = random_A(self.num_layers, rank - start, self.config.a, generator=generator).to(device)
        self.A_train[:, :start] = A.to(device)
        self.B_train.zero_()
        self.B_train[:, :, :start] = B.to(device)
        self.use_shared()

    def freeze_first_ranks(self, k: int) -> None:
        """The first `k` ranks of the shared weights (a prediction, relaxed) get no gradient; the rest trains. Until
        the next `start_from`."""
        self._frozen_ranks = [
            self.A_train.register_hook(lambda grad: torch.cat([grad[:, :k] * 0, grad[:, k:]], dim=1)),
            self.B_train.register_hook(lambda grad: torch.cat([grad[..., :k] * 0, grad[..., k:]], dim=-1)),
        ]

    def train(self, on: bool = True) -> None:
        """Whether the shared weights get gradients (under a term on top they stay as they are: no gradient work)."""
        for parameter in self.parameters():
            parameter.requires_grad_(on)
        self.clear()  # factors built with or without gradients for A and B


class LoRATerm(LowRankTerm):
    """A plain LoRA, free of the aux bases: `downs[i]: [r, in]`, `ups[i]: [out, r]` for layer i. The paper's rank
    relaxation trains one on top of the predicted LiDB."""

    def __init__(self, downs: list[torch.Tensor], ups: list[torch.Tensor], device: torch.device | None = None) -> None:
        """A copy of `downs` and `ups` in fp32 on `device`, as parameters."""
        self.downs = [nn.Parameter(down.detach().to(device, torch.float32, copy=True)) for down in downs]
        self.ups = [nn.Parameter(up.detach().to(device, torch.float32, copy=True)) for up in ups]

    @classmethod
    def starting(
        cls, rank: int, layer_shapes: Iterable[tuple[int, int]], device: torch.device, generator: torch.Generator | None
    ) -> LoRATerm:
        """As LoRA starts: down random, up zero, so that it changes nothing yet gets gradients."""
        if rank < 1:
            raise HdbError(f"A plain LoRA needs rank >= 1, not {rank}")
        shapes = list(layer_shapes)
        downs = [random_A(rank, i, generator=generator) for i, _ in shapes]
        return cls(downs, [torch.zeros(o, rank) for _, o in shapes], device)

    @property
    def rank(self) -> int:
        return self.downs[0].shape[0]

    def fits(self, layer_shapes: Iterable[tuple[int, int]]) -> bool:
        """Whether it is a LoRA of layers of these (in, out) shapes, in this order."""
        shapes = [(down.shape, up.shape) for down, up in zip(self.downs, self.ups, strict=False)]
        expected = [((self.rank, i), (o, self.rank)) for i, o in layer_shapes]
        return len(self.downs) == len(self.ups) and shapes == expected

    def factors(self, layer: LiDBLinear) -> tuple[torch.Tensor, torch.Tensor]:
        return self.downs[layer.index], self.ups[layer.index]

    def delta(self, layer: LiDBLinear) -> torch.Tensor:
        return self.ups[layer.index].float() @ self.downs[layer.index].float()

    def parameters(self) -> list[nn.Parameter]:
        return [*self.downs, *self.ups]


@dataclass
class Terms:
    """What every LiDB layer of one pipeline reads at forward time (shared, not a module): its low-rank terms (the
    LiDB's own first), the identity strength, and the terms folded into the base weights (`LiDB.merge`)."""

    terms: list[LowRankTerm]
    scale: float = 1.0
    merged: tuple[LowRankTerm, ...] = ()

    def clear(self) -> None:
        for term in self.terms:
            term.clear()


# ----------------------------------------------------------------------------- the layer


class LiDBLinear(nn.Module):
    """Wraps an nn.Linear: y = W x + scale * sum of its low-rank terms' up (down x) (the LiDB's factors built from
    the aux bases, then any term on top), the terms merged into W left out."""

    def __init__(
        self, base: nn.Linear, name: str, index: int, terms: Terms, A_aux: torch.Tensor, B_aux: torch.Tensor
    ) -> None:
        super().__init__()
        self.base, self.name, self.index, self.terms = base, name, index, terms
        # Views into the layer group's stacked bases (fp32 whatever the base dtype, so exported LoRA factors are
        # exact); plain attributes, not buffers: not in state_dict, and a dtype change of the model leaves them be.
        self.A_aux, self.B_aux = A_aux, B_aux
        self.original: torch.Tensor | None = None  # the base weight while merged (see `merge`)

    @property
    def merged(self) -> bool:
        return self.original is not None

    @property
    def mergeable(self) -> bool:
        """Whether the person can be added into the weight: not into a quantised base's integers."""
        return self.base.weight.dtype.is_floating_point

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        terms = self.terms
        if terms.scale == 0:
            return y
        for term in terms.terms:
            if term not in terms.merged:
                y = add_low_rank(y, x, *term.factors(self), terms.scale)
        return y

    def delta_weight(self, terms: Iterable[LowRankTerm] | None = None) -> torch.Tensor:
        """The dense dW (out x in) of `terms` (all of them by default) of shared weights, for merging."""
        chosen = self.terms.terms if terms is None else terms
        return self.terms.scale * sum(term.delta(self) for term in chosen)

    @torch.no_grad()
    def merge(self, terms: Iterable[LowRankTerm]) -> None:
        """Swap in W + dW of `terms` (added in fp32), keeping the original W aside: unmerging puts it back untouched.

        Subtracting dW again would not be exact in half precision, and drift would build up over the
        thousands of generations a server makes; the kept tensor costs one copy of W while merged.
        """
        if not self.merged:
            weight = self.base.weight
            self.original = weight.data
            weight.data = (weight.data.float() + self.delta_weight(terms)).to(weight.dtype)

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.base.weight.data = self.original
            self.original = None


# ----------------------------------------------------------------------------- all layers of a pipeline


def find_target_linears(components: dict[str, tuple[nn.Module, tuple[tuple[str, ...], ...]]]) -> dict[str, nn.Linear]:
    """Every attention projection LiDB targets in the given components (`Family.lidb_components`).

    Found from module structure (a module owning all the component's projections: to_q/to_k/to_v/to_out in a
    diffusers Attention, q_proj/k_proj/v_proj/out_proj in a CLIP attention), so the bases of a family need no
    tables of layer names. `components` maps pipeline component names to (model, sets of projections: a module
    owning all of a set has them targeted, each once); layer names are "<component>.<module path>".
    """
    targets: dict[str, nn.Linear] = {}

    def owns(module: nn.Module, projection: str) -> bool:  # a projection set to None (SD3's last block) is not there
        return isinstance(getattr(module, projection.split(".")[0], None), nn.Module)

    for component, (model, projection_sets) in components.items():
        for path, module in model.named_modules():
            owned = [
                projection
                for projections in projection_sets
                if all(owns(module, projection) for projection in projections)
                for projection in projections
            ]
            for projection in dict.fromkeys(owned):  # in the sets' order, each once
                linear = module.get_submodule(projection)
                if isinstance(linear, LiDBLinear):
                    raise HdbError(
                        "LiDB is already attached to this pipeline; use that one (its PersonalPipeline) "
                        "or unload it first"
                    )
                targets[f"{component}.{path}.{projection}"] = linear
    return targets


def _put_module(pipe: Pipeline, name: str, module: nn.Module) -> None:
    """Put `module` at `name` ("<component>.<module path>") in the pipeline, in place of what is there."""
    component, path = name.split(".", 1)
    parent_path, _, child = path.rpartition(".")
    root = getattr(pipe, component)
    setattr(root.get_submodule(parent_path) if parent_path else root, child, module)


def _group_layers(
    targets: dict[str, nn.Linear], config: LiDBConfig, device: torch.device
) -> tuple[dict[str, ComponentLayers], list[tuple[torch.Tensor, torch.Tensor]]]:
    """Each component's layers grouped by shape and dtype, with their aux bases stacked per group (one copy,
    on `device`), and each layer's (A_aux, B_aux) as views of its group's stacks, in layer order."""
    by_component: dict[str, dict[tuple, list[int]]] = {}
    for index, (name, linear) in enumerate(targets.items()):
        key = (linear.in_features, linear.out_features, compute_dtype(linear))
        by_component.setdefault(name.split(".", 1)[0], {}).setdefault(key, []).append(index)
    names = list(targets)
    components: dict[str, ComponentLayers] = {}
    bases: list[tuple[torch.Tensor, torch.Tensor]] = [None] * len(names)  # type: ignore[list-item]
    for component, shapes in by_component.items():
        groups = []
        for (in_features, out_features, dtype), layers in shapes.items():
            pairs = [aux_bases(config.seed, names[i], in_features, out_features, config.a, config.b) for i in layers]
            A_aux = torch.stack([A for A, _ in pairs]).to(device)
            B_aux = torch.stack([B for _, B in pairs]).to(device)
            groups.append(LayerGroup(layers, A_aux, B_aux, dtype))
            for position, index in enumerate(layers):
                bases[index] = (A_aux[position], B_aux[position])
        order = torch.tensor([index for group in groups for index in group.layers], device=device)
        components[component] = ComponentLayers(order, groups)
    return components, bases


class LiDB:
    """All LiDB layers of one pipeline: the LiDB weights (`own`, the first of the layers' `terms`: B zero, so a fresh
    LiDB changes nothing, A random, so training from zero gets gradients) and whatever terms sit on top of them.
    LiDB keeps the attachment, the terms and the merging; routing the layers to shared or per-sample weights is its
    weights' (`LiDBTerm`), relaxing a prediction hdb/relaxations.py's. `config` stays what it was attached with.

    Who changes it: `hdb.pipeline.PersonalPipeline` owns the LiDB of a pipeline that serves people (attach, load a
    person, relax, unload); a training stage holds its own for the stage's length (`LiDB.attached`). Everyone else
    changes its state only inside the scopes below (`scaled`, `merged_into_weights`, `own.per_sample`, `holding`,
    `restored`, `merged_while_training`), which put it back on the way out, also on error.
    """

    def __init__(self, pipe: Pipeline, config: LiDBConfig | None = None) -> None:
        self.config = config = config or LiDBConfig()
        self.pipe = pipe
        family = family_of(pipe)
        targets = find_target_linears(family.lidb_components(pipe, config.layers))
        if not targets:
            raise HdbError(f"No attention projections found in {type(pipe).__name__}, a {family.title} pipeline")
        self.layer_shapes = {name: (linear.in_features, linear.out_features) for name, linear in targets.items()}
        components, bases = _group_layers(targets, config, family.denoiser(pipe).device)
        self.own = LiDBTerm(config, components, family.denoiser(pipe).device)
        self.terms = Terms([self.own])
        self.layers: dict[str, LiDBLinear] = {}
        self._aux_fingerprint: str | None = None
        for index, (name, linear) in enumerate(targets.items()):
            layer = LiDBLinear(linear, name, index, self.terms, *bases[index])
            _put_module(pipe, name, layer)
            self.layers[name] = layer
        self._hooks = [  # each component builds its layers' LiDB factors as its forward pass starts
            getattr(pipe, component).register_forward_pre_hook(
                lambda module, args, component=component: self._build_factors(component)
            )
            for component in components
        ]

    @classmethod
    @contextmanager
    def attached(cls, pipe: Pipeline, config: LiDBConfig | None = None) -> Iterator[LiDB]:
        """A LiDB on `pipe` for the length of the block (a training stage's), taken off again on the way out."""
        lidb = cls(pipe, config)
        try:
            yield lidb
        finally:
            lidb.unmerge()
            lidb.unload()

    def _build_factors(self, component: str) -> None:
        if self.terms.scale != 0 and self.own not in self.terms.merged:  # else the layers would not use them
            self.own.build(component)

    def unload(self) -> None:
        """Put the original linears back (merged weights stay merged; unmerge first to undo them)."""
        for name, layer in self.layers.items():
            _put_module(self.pipe, name, layer.base)
        self.layers = {}
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        self.terms.clear()

    # -- what it is

    @property
    def A_train(self) -> nn.Parameter:
        return self.own.A_train

    @property
    def B_train(self) -> nn.Parameter:
        return self.own.B_train

    @property
    def rank(self) -> int:
        """The rank of the shared weights now: the config's at first, higher once relaxed."""
        return self.A_train.shape[1]

    @property
    def layer_names(self) -> list[str]:
        return list(self.layers)

    def aux_fingerprint(self) -> str:
        if self._aux_fingerprint is None:  # the bases never change; hashing them all costs ~0.1 s at SD1.5 size
            self._aux_fingerprint = aux_fingerprint(
                basis for layer in self.layers.values() for basis in (layer.A_aux, layer.B_aux)
            )
        return self._aux_fingerprint

    def signature(self) -> Signature:
        """What weights must have been made for to work here (the rank: the one it was attached with)."""
        return Signature.of(self.layer_shapes, self.config, self.aux_fingerprint())

    @property
    def base_model(self) -> str:
        """The base's hub id or folder, as diffusers recorded it (informational: the signature decides)."""
        return str(getattr(self.pipe, "name_or_path", "") or "")

    # -- what it computes

    def trainable_parameters(self) -> list[nn.Parameter]:
        """What training moves: the terms' parameters that require gradients (A and B alone; with a plain LoRA on
        top, the LoRA alone, the prediction staying as predicted unless `own.train()` lets it train too)."""
        return [parameter for term in self.terms.terms for parameter in term.parameters() if parameter.requires_grad]

    def start_from(
        self, A: torch.Tensor, B: torch.Tensor, rank: int | None = None, generator: torch.Generator | None = None
    ) -> None:
        """Load rank-k weights (A: [L, k, a], B: [L, b, k]) as the start of training at `rank` >= k (default k).

        The model then computes exactly what (A, B) compute, while any extra rank is free to train within the aux
        bases (`LiDBTerm.start_from`). Any term on top is taken off.
        """
        self.own.start_from(A, B, rank or A.shape[1], generator)
        self.put_on_top()

    def put_on_top(self, *terms: LowRankTerm) -> None:
        """`terms` on top of the LiDB weights, in place of any before. With some, the LiDB weights stay as they are
        (no gradient work for them); with none, they train again."""
        self.terms.terms = [self.own, *terms]
        self.own.train(not terms)
        self.terms.clear()

    def add_lora(self, rank: int, generator: torch.Generator | None = None) -> None:
        """Put a plain rank-`rank` LoRA on top of the LiDB weights: the paper's rank relaxation. It starts as LoRA
        does, changing nothing; from then on training moves it alone, the LiDB weights staying as loaded."""
        self.put_on_top(LoRATerm.starting(rank, self.layer_shapes.values(), self.A_train.device, generator))

    def load_lora(self, downs: list[torch.Tensor], ups: list[torch.Tensor]) -> None:
        """Load a plain LoRA (down [r, in], up [out, r] per layer, in layer order), e.g. from a personal file."""
        lora = LoRATerm(downs, ups, self.A_train.device)
        if not downs or not lora.fits(self.layer_shapes.values()):
            raise HdbError("The plain LoRA does not fit this model's layers")
        self.put_on_top(lora)

    def plain_lora(self) -> LoRATerm | None:
        """The plain LoRA on top, or None when there is none."""
        return next((term for term in self.terms.terms if isinstance(term, LoRATerm)), None)

    @property
    def lora_rank(self) -> int:
        """The rank of the plain LoRA on top of the LiDB; 0 when there is none."""
        lora = self.plain_lora()
        return 0 if lora is None else lora.rank

    @property
    def scale(self) -> float:
        return self.terms.scale

    def set_scale(self, scale: float) -> None:
        """Identity strength: 0 is the base model, 1 the trained person."""
        if self.merged:
            raise HdbError("Unmerge LiDB before changing its scale")
        self.terms.scale = float(scale)
        self.terms.clear()

    # -- merging

    @property
    def merged(self) -> bool:
        return bool(self.terms.merged)

    @property
    def mergeable(self) -> bool:
        """Whether the person can be folded into the base weights (`merge`): not into a quantised base's."""
        return all(layer.mergeable for layer in self.layers.values())

    def merge(self, terms: Sequence[LowRankTerm] | None = None) -> None:
        """Fold the shared weights' `terms` (all by default) into the base weights: sampling then costs what the
        base model costs. Exact to undo (`unmerge` restores the original tensors), at the cost of one copy of the
        targeted weights while merged (`merged_bytes`). Unmerge to change them. `[lidb.own]` folds in the LiDB
        alone: a plain LoRA on top stays live and trainable (the paper's finetune on the merged prediction)."""
        if not self.own.uses_shared:
            raise HdbError("Only shared LiDB weights can be merged; call own.use_shared() first")
        if not self.mergeable:
            raise HdbError("The base's weights are quantised: a person cannot be merged into them (draw unmerged)")
        if self.merged:
            return
        chosen = tuple(self.terms.terms if terms is None else terms)
        for layer in self.layers.values():
            layer.merge(chosen)
        self.terms.merged = chosen
        self.terms.clear()

    def unmerge(self) -> None:
        for layer in self.layers.values():
            layer.unmerge()
        self.terms.merged = ()

    def merged_bytes(self) -> int:
        """What merging costs in memory: one copy of every targeted base weight."""
        return sum(layer.base.weight.numel() * layer.base.weight.element_size() for layer in self.layers.values())

    # -- scopes: each puts back what it changed on the way out, also on error

    @contextmanager
    def merged_into_weights(self, terms: Sequence[LowRankTerm] | None = None) -> Iterator[None]:
        """The shared weights' `terms` folded into the base weights for the block (`merge`), then exactly unmerged."""
        self.merge(terms)
        try:
            yield
        finally:
            self.unmerge()

    @contextmanager
    def merged_while_training(self) -> Iterator[None]:
        """The terms that do not train (a prediction under a plain LoRA) folded into the weights while the rest
        trains, so that a step costs what a plain LoRA step costs. When every term trains, or on a quantised base
        (whose weights take no merge), as it is."""
        fixed = [term for term in self.terms.terms if not any(p.requires_grad for p in term.parameters())]
        with self.merged_into_weights(fixed) if fixed and self.mergeable else nullcontext():
            yield

    @contextmanager
    def scaled(self, scale: float) -> Iterator[None]:
        """The person at identity strength `scale` for the block."""
        before = self.scale
        self.set_scale(scale)
        try:
            yield
        finally:
            self.set_scale(before)

    @contextmanager
    def restored(self) -> Iterator[None]:
        """Whatever the block loads or routes (e.g. a validation pass mid-training), everything before it (shared
        weights, rank, terms on top, routing to shared or per-sample weights) is back on the way out."""
        own = self.own
        per_sample = None if own.uses_shared else (own.A, own.B)
        saved_A, saved_B = own.A_train.detach().clone(), own.B_train.detach().clone()
        requires_grad = own.A_train.requires_grad
        on_top = self.terms.terms[1:]
        saved_on_top = [(parameter, parameter.detach().clone()) for term in on_top for parameter in term.parameters()]
        try:
            yield
        finally:
            self.start_from(saved_A, saved_B)
            with torch.no_grad():
                for parameter, saved in saved_on_top:
                    parameter.copy_(saved)
            self.put_on_top(*on_top)
            own.train(requires_grad)
            if per_sample is not None:
                own.use_per_sample(*per_sample)

    @contextmanager
    def holding(self, A: torch.Tensor, B: torch.Tensor) -> Iterator[None]:
        """The shared weights replaced by (A, B) for the block (e.g. a prediction to look at during training),
        everything before it back on the way out (`restored`)."""
        with self.restored():
            self.start_from(A, B)
            yield

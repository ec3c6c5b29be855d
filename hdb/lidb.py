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
dispatches as many operations as a plain LoRA step on the UNet alone (see `_WeightSource.build_factors`).

One primitive serves every stage. All layers of a pipeline read their weights from one packed pair
of tensors held by `LiDB`:
  * shared weights `A: [L, r, a]`, `B: [L, b, r]`: one person (inference, personal files, finetuning);
  * per-sample weights `A: [S, L, r, a]`, `B: [S, L, b, r]`: a different person per batch element
    (pre-optimising many identities at once, training the hypernetwork), applied with batched matmuls.

On top of the LiDB, each layer can also hold an ordinary LoRA (`add_lora`): the paper's rank relaxation
keeps the predicted rank-1 LiDB and finetunes a plain rank-r LoRA beside it, free of the aux bases. The ways
of relaxing are strategies over LiDB's primitives (hdb/relaxations.py): adding one is a class and a registry
line there.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
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


# ----------------------------------------------------------------------------- the layer


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


class _WeightSource:
    """What every LiDB layer of one pipeline reads at forward time (shared, not a module).

    `A`, `B`: the packed weights, shared or per sample; `scale`: the identity strength; `merged`: whether
    the LiDB is folded into the base weights. `lora_down[i]: [r, in]`, `lora_up[i]: [out, r]`: layer i's
    plain LoRA, or None when there is none.

    `factors[i]`: layer i's (lora_A, lora_B), built for all layers of its component at the start of the
    component's forward pass (`build_factors`, a forward pre-hook) and kept until the next one, so that
    gradient checkpointing's recompute during backward reads the very factors the forward used. Every
    hdb loop runs a component's backward before its next forward; a loop that ran two forwards of a
    checkpointed component before one backward would set `batch_factors = False`. Anything that changes
    the weights from outside a step (loading, switching, scaling, merging) clears them (`clear_factors`),
    and a layer without built factors builds its own (a layer called on its own, or while compiling).
    """

    def __init__(self, A: torch.Tensor, B: torch.Tensor, components: dict[str, ComponentLayers]) -> None:
        self.A, self.B, self.scale, self.merged = A, B, 1.0, False
        self.lora_down: list[torch.Tensor] | None = None
        self.lora_up: list[torch.Tensor] | None = None
        self.components = components
        self.factors: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * A.shape[-3]
        self.batch_factors = True  # False: each layer builds its own, as before (the bench counts both ways)

    def build_factors(self, component: str) -> None:
        """Build the LiDB factors of every layer of `component`: two gathers, and two bmm's per group of shapes.

        Skipped while torch.compile traces (the compiler fuses each layer's own small matmuls), and when
        the layers would not use them (identity strength 0, or merged).
        """
        if not self.batch_factors or self.scale == 0 or self.merged or torch.compiler.is_compiling():
            return
        layers = self.components[component]
        sizes = [len(group.layers) for group in layers.groups]
        A_parts = self.A.index_select(-3, layers.order).split(sizes, dim=-3)
        B_parts = self.B.index_select(-3, layers.order).split(sizes, dim=-3)
        for group, A, B in zip(layers.groups, A_parts, B_parts, strict=True):
            down, up = group.factors(A, B)
            for index, layer_down, layer_up in zip(group.layers, down.unbind(-3), up.unbind(-3), strict=True):
                self.factors[index] = (layer_down, layer_up)

    def clear_factors(self) -> None:
        self.factors = [None] * len(self.factors)


def compute_dtype(linear: nn.Linear) -> torch.dtype:
    """The dtype a linear computes in: its weight's, or for a quantised one (bitsandbytes' 4-bit or 8-bit weights are
    integers) the dtype it dequantises to, else its bias's."""
    if linear.weight.dtype.is_floating_point:
        return linear.weight.dtype
    dtype = getattr(linear, "compute_dtype", None)  # bitsandbytes' Linear4bit
    return dtype or (linear.bias.dtype if linear.bias is not None else torch.float32)


class LiDBLinear(nn.Module):
    """Wraps an nn.Linear: y = W x + scale * (lora_B (lora_A x) + up (down x)), LiDB factors built from the aux
    bases, (down, up) the optional plain LoRA."""

    def __init__(
        self, base: nn.Linear, name: str, index: int, source: _WeightSource, A_aux: torch.Tensor, B_aux: torch.Tensor
    ) -> None:
        super().__init__()
        self.base, self.name, self.index, self.source = base, name, index, source
        # Views into the layer group's stacked bases (fp32 whatever the base dtype, so exported LoRA factors are
        # exact); plain attributes, not buffers: not in state_dict, and a dtype change of the model leaves them be.
        self.A_aux, self.B_aux = A_aux, B_aux
        self.original: torch.Tensor | None = None  # the base weight while merged (see `merge`)
        self.merged_lora = False  # whether the merged weight holds the plain LoRA too, or only the LiDB

    @property
    def merged(self) -> bool:
        return self.original is not None

    @property
    def mergeable(self) -> bool:
        """Whether the person can be added into the weight: not into a quantised base's integers."""
        return self.base.weight.dtype.is_floating_point

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        source = self.source
        plain_lora = source.lora_down is not None and not self.merged_lora
        if source.scale == 0 or (self.merged and not plain_lora):
            return y
        if not self.merged:  # merged: the LiDB is in the weight, and only the plain LoRA on top is live (training)
            y = add_low_rank(y, x, *self.lidb_factors(), source.scale)
        if plain_lora:
            y = add_low_rank(y, x, source.lora_down[self.index], source.lora_up[self.index], source.scale)
        return y

    def lidb_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(lora_A, lora_B) of this layer's LiDB weights: the ones built for its component, else built here."""
        built = None if torch.compiler.is_compiling() else self.source.factors[self.index]
        if built is not None:
            return built
        A = self.source.A.select(-3, self.index)  # [r, a] shared, or [S, r, a] per sample
        B = self.source.B.select(-3, self.index)
        down, up = lora_factors(A, B, self.A_aux, self.B_aux)
        dtype = compute_dtype(self.base)
        return down.to(dtype), up.to(dtype)

    def delta_weight(self, lora: bool = True) -> torch.Tensor:
        """The dense dW (out x in) of the shared weights, and of the plain LoRA when `lora`, for merging."""
        down, up = lora_factors(self.source.A[self.index], self.source.B[self.index], self.A_aux, self.B_aux)
        delta = up @ down
        if lora and self.source.lora_down is not None:
            delta = delta + self.source.lora_up[self.index].float() @ self.source.lora_down[self.index].float()
        return self.source.scale * delta

    @torch.no_grad()
    def merge(self, lora: bool = True) -> None:
        """Swap in W + dW (added in fp32), keeping the original W aside: unmerging puts it back untouched.

        Subtracting dW again would not be exact in half precision, and drift would build up over the
        thousands of generations a server makes; the kept tensor costs one copy of W while merged.
        `lora=False` folds in the LiDB only and leaves the plain LoRA live, so that it can train.
        """
        if not self.merged:
            weight = self.base.weight
            self.original = weight.data
            self.merged_lora = lora
            weight.data = (weight.data.float() + self.delta_weight(lora)).to(weight.dtype)

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.base.weight.data = self.original
            self.original, self.merged_lora = None, False


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
    """All LiDB layers of one pipeline, with their packed trainable weights.

    `A_train: [L, r, a]` and `B_train: [L, b, r]` are the shared (one-person) weights; B starts at zero,
    so a freshly attached LiDB leaves the model unchanged, and A starts random, so that training from
    zero gets gradients (as in LoRA). `config` stays what the LiDB was attached with; `rank` is the rank
    of the weights it holds now (relaxation raises it).

    Who changes it: `hdb.pipeline.PersonalPipeline` owns the LiDB of a pipeline that serves people
    (attach, load a person, relax, unload); a training stage holds its own for the stage's length
    (`LiDB.attached`). Everyone else changes its state only inside the scopes below (`scaled`, `merged_into_weights`,
    `per_sample`, `holding`, `restored`, `merged_while_training`), which put it back on the way out, also on error.
    """

    def __init__(self, pipe: Pipeline, config: LiDBConfig | None = None) -> None:
        self.config = config = config or LiDBConfig()
        self.pipe = pipe
        family = family_of(pipe)
        targets = find_target_linears(family.lidb_components(pipe, config.layers))
        if not targets:
            raise HdbError(f"No attention projections found in {type(pipe).__name__}, a {family.title} pipeline")
        self.layer_shapes = {name: (linear.in_features, linear.out_features) for name, linear in targets.items()}
        device = family.denoiser(pipe).device
        self.A_train = nn.Parameter(start_A(len(targets), config).to(device))  # = initial_weights(): B = 0
        self.B_train = nn.Parameter(torch.zeros(len(targets), config.b, config.rank, device=device))
        components, bases = _group_layers(targets, config, device)
        self.source = _WeightSource(self.A_train, self.B_train, components)
        self.layers: dict[str, LiDBLinear] = {}
        self._aux_fingerprint: str | None = None
        self._lora: tuple[list[nn.Parameter], list[nn.Parameter]] | None = None  # kept for reuse (see add_lora)
        self._frozen_prediction: list[torch.utils.hooks.RemovableHandle] = []  # see freeze_first_ranks
        for index, (name, linear) in enumerate(targets.items()):
            layer = LiDBLinear(linear, name, index, self.source, *bases[index])
            self._replace(name, layer)
            self.layers[name] = layer
        self._hooks = [  # each component builds its layers' factors as its forward pass starts
            getattr(pipe, component).register_forward_pre_hook(
                lambda module, args, component=component: self.source.build_factors(component)
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

    # -- structure

    @property
    def rank(self) -> int:
        """The rank of the shared weights now: the config's at first, higher once relaxed."""
        return self.A_train.shape[1]

    @property
    def layer_names(self) -> list[str]:
        return list(self.layers)

    def _replace(self, name: str, module: nn.Module) -> None:
        component, path = name.split(".", 1)
        parent_path, _, child = path.rpartition(".")
        root = getattr(self.pipe, component)
        setattr(root.get_submodule(parent_path) if parent_path else root, child, module)

    def unload(self) -> None:
        """Put the original linears back (merged weights stay merged; unmerge first to undo them)."""
        for name, layer in self.layers.items():
            self._replace(name, layer.base)
        self.layers = {}
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        self.source.clear_factors()

    def arch_fingerprint(self) -> str:
        return arch_fingerprint(self.layer_shapes)

    def aux_fingerprint(self) -> str:
        if self._aux_fingerprint is None:  # the bases never change; hashing them all costs ~0.1 s at SD1.5 size
            self._aux_fingerprint = aux_fingerprint(
                basis for layer in self.layers.values() for basis in (layer.A_aux, layer.B_aux)
            )
        return self._aux_fingerprint

    def signature(self) -> Signature:
        """What weights must have been made for to work here (the rank: the one it was attached with)."""
        config = self.config
        return Signature(
            self.arch_fingerprint(), len(self.layer_shapes), config.a, config.b, config.seed,
            self.aux_fingerprint(), config.rank, config.layers,
        )  # fmt: skip

    @property
    def base_model(self) -> str:
        """The base's hub id or folder, as diffusers recorded it (informational: the signature decides)."""
        return str(getattr(self.pipe, "name_or_path", "") or "")

    # -- weights

    def trainable_parameters(self) -> list[nn.Parameter]:
        """What training moves: the plain LoRA when there is one (the LiDB stays as predicted, unless
        `train_prediction()` lets it train too), else A and B."""
        own = [self.A_train, self.B_train]
        if self.source.lora_down is None:
            return own
        return [*self.source.lora_down, *self.source.lora_up] + (own if self.A_train.requires_grad else [])

    @property
    def lora_rank(self) -> int:
        """The rank of the plain LoRA on top of the LiDB; 0 when there is none."""
        return 0 if self.source.lora_down is None else self.source.lora_down[0].shape[0]

    def plain_lora(self) -> tuple[list[torch.Tensor], list[torch.Tensor]] | None:
        """The plain LoRA on top (each layer's down [r, in] and up [out, r]), or None when there is none."""
        return None if self.source.lora_down is None else (self.source.lora_down, self.source.lora_up)

    @property
    def uses_shared(self) -> bool:
        """Whether the layers read the shared (one-person) weights, not per-sample ones."""
        return self.source.A is self.A_train

    @property
    def batch_factors(self) -> bool:
        """Whether each component builds its layers' factors at once (True), or each layer its own."""
        return self.source.batch_factors

    @batch_factors.setter
    def batch_factors(self, value: bool) -> None:
        self.source.batch_factors = value
        self.source.clear_factors()

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
        self.source.clear_factors()

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
        self.source.A, self.source.B = A, B
        self.source.clear_factors()

    def use_shared(self) -> None:
        self.source.A, self.source.B = self.A_train, self.B_train
        self.source.clear_factors()

    @property
    def merged(self) -> bool:
        return self.source.merged

    @property
    def scale(self) -> float:
        return self.source.scale

    def set_scale(self, scale: float) -> None:
        """Identity strength: 0 is the base model, 1 the trained person."""
        if self.merged:
            raise HdbError("Unmerge LiDB before changing its scale")
        self.source.scale = float(scale)
        self.source.clear_factors()

    def initial_weights(self, count: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Where training from zero starts, as in LoRA: A random, B zero (no change, yet gradients flow).

        count=None gives one person ([L, r, a], [L, b, r]); count=N gives N people ([N, L, r, a], ...).
        Everyone starts from the same A, the one the hypernetwork starts from (see `start_A`).
        """
        A = start_A(len(self.layers), self.config)
        B = torch.zeros(len(self.layers), self.config.b, self.config.rank)
        if count is not None:
            A, B = A.expand(count, -1, -1, -1).clone(), B.expand(count, -1, -1, -1).clone()
        return A.to(self.A_train.device), B.to(self.A_train.device)

    @torch.no_grad()
    def start_from(
        self, A: torch.Tensor, B: torch.Tensor, rank: int | None = None, generator: torch.Generator | None = None
    ) -> None:
        """Load rank-k weights (A: [L, k, a], B: [L, b, k]) as the start of training at `rank` >= k.

        Relaxation inside the LiDB space (hdb's compact variant; `add_lora` is the paper's): the extra
        rows of A are random and the extra columns of B zero, so the model computes exactly what (A, B)
        compute, while the extra rank is free to train within the aux bases. Any plain LoRA is removed:
        the LiDB then computes exactly these weights. The parameter tensors are reused when the rank
        does not change (a server personalising one person after another, CUDA graphs).
        """
        rank = rank or A.shape[1]
        if A.shape[1] > rank:
            raise HdbError(f"Cannot relax rank {A.shape[1]} down to {rank}")
        for hook in self._frozen_prediction:  # whatever is loaded now trains whole again
            hook.remove()
        self._frozen_prediction = []
        if rank != self.rank:
            self.A_train = nn.Parameter(self.A_train.new_empty(len(self.layers), rank, self.config.a))
            self.B_train = nn.Parameter(self.B_train.new_empty(len(self.layers), self.config.b, rank))
        start = A.shape[1]
        device = self.A_train.device
        self.A_train[:, start:] = random_A(len(self.layers), rank - start, self.config.a, generator=generator).to(
            device
        )
        self.A_train[:, :start] = A.to(device)
        self.B_train.zero_()
        self.B_train[:, :, :start] = B.to(device)
        self.use_shared()
        self.remove_lora()

    def train_prediction(self) -> None:
        """With a plain LoRA on top, let the LiDB weights (the prediction) train too (the toy's crossed ablation)."""
        for parameter in (self.A_train, self.B_train):
            parameter.requires_grad_(True)
        self.source.clear_factors()  # rebuilt with gradients for A and B

    def freeze_first_ranks(self, k: int) -> None:
        """The first `k` ranks of the shared weights (a prediction, relaxed) get no gradient; the rest trains. Until
        the next `start_from`."""
        self._frozen_prediction = [
            self.A_train.register_hook(lambda grad: torch.cat([grad[:, :k] * 0, grad[:, k:]], dim=1)),
            self.B_train.register_hook(lambda grad: torch.cat([grad[..., :k] * 0, grad[..., k:]], dim=-1)),
        ]

    @property
    def mergeable(self) -> bool:
        """Whether the person can be folded into the base weights (`merge`): not into a quantised base's."""
        return all(layer.mergeable for layer in self.layers.values())

    @contextmanager
    def merged_while_training(self) -> Iterator[None]:
        """With a plain LoRA on top, the fixed LiDB folded into the weights while the LoRA trains, so a step costs
        what a plain LoRA step costs; the exact base weights back on the way out. Without one, or on a quantised
        base (whose weights take no merge: the LiDB stays live, at the cost of its low-rank products), as it is."""
        if self.source.lora_down is None or self.A_train.requires_grad or not self.mergeable:
            yield
            return
        with self.merged_into_weights(lora=False):
            yield

    @contextmanager
    def scaled(self, scale: float) -> Iterator[None]:
        """The person at identity strength `scale` for the block; the strength before it back on the way out."""
        before = self.scale
        self.set_scale(scale)
        try:
            yield
        finally:
            self.set_scale(before)

    @contextmanager
    def merged_into_weights(self, lora: bool = True) -> Iterator[None]:
        """The shared weights folded into the base weights for the block (`merge`); exactly unmerged on the way out."""
        self.merge(lora)
        try:
            yield
        finally:
            self.unmerge()

    @contextmanager
    def per_sample(self, A: torch.Tensor, B: torch.Tensor) -> Iterator[None]:
        """Layers read the per-sample weights (A: [S, L, r, a], B: [S, L, b, r]) for the block (forward and
        backward), the shared weights again on the way out."""
        self.use_per_sample(A, B)
        try:
            yield
        finally:
            self.use_shared()

    @contextmanager
    def restored(self) -> Iterator[None]:
        """Whatever the block loads or routes (e.g. a validation pass mid-training), everything before it (shared
        weights, rank, plain LoRA, routing to shared or per-sample weights) is back on the way out."""
        per_sample = None if self.uses_shared else (self.source.A, self.source.B)
        saved_A, saved_B = self.A_train.detach().clone(), self.B_train.detach().clone()
        lora = self.plain_lora()
        saved_lora = None if lora is None else tuple([t.detach().clone() for t in part] for part in lora)
        requires_grad = self.A_train.requires_grad
        try:
            yield
        finally:
            self.start_from(saved_A, saved_B)
            if saved_lora is not None:
                self.load_lora(*saved_lora)
            for parameter in (self.A_train, self.B_train):
                parameter.requires_grad_(requires_grad)
            if per_sample is not None:
                self.use_per_sample(*per_sample)

    @contextmanager
    def holding(self, A: torch.Tensor, B: torch.Tensor) -> Iterator[None]:
        """The shared weights replaced by (A, B) for the block (e.g. a prediction to look at during training),
        everything before it back on the way out (`restored`)."""
        with self.restored():
            self.start_from(A, B)
            yield

    @torch.no_grad()
    def add_lora(self, rank: int, generator: torch.Generator | None = None) -> None:
        """Put a plain rank-`rank` LoRA on every layer, on top of the LiDB weights: the paper's rank relaxation.

        As LoRA starts: down random, up zero, so the model still computes exactly what the LiDB computes.
        From then on training moves the LoRA only (`trainable_parameters`), free of the aux bases; the
        LiDB weights stay as loaded (the hypernetwork's prediction). Tensors are reused at the same rank.
        """
        downs, ups = self._lora_tensors(rank)
        for down, up in zip(downs, ups, strict=True):
            down.copy_(random_A(*down.shape, generator=generator))
            up.zero_()
        self._use_lora(downs, ups)

    @torch.no_grad()
    def load_lora(self, downs: list[torch.Tensor], ups: list[torch.Tensor]) -> None:
        """Load a plain LoRA (down [r, in], up [out, r] per layer, in layer order), e.g. from a personal file."""
        expected = list(self.layer_shapes.values())
        got = [(down.shape[1], up.shape[0]) for down, up in zip(downs, ups, strict=False)]
        if len(downs) != len(expected) or len(ups) != len(expected) or got != expected:
            raise HdbError("The plain LoRA does not fit this model's layers")
        targets = self._lora_tensors(downs[0].shape[0])
        for target, value in zip(targets[0] + targets[1], list(downs) + list(ups), strict=True):
            target.copy_(value)
        self._use_lora(*targets)

    def _lora_tensors(self, rank: int) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """The plain LoRA's tensors at `rank`, made once and reused while the rank stays."""
        if rank < 1:
            raise HdbError(f"A plain LoRA needs rank >= 1, not {rank}")
        if self._lora is None or self._lora[0][0].shape[0] != rank:
            device, shapes = self.A_train.device, list(self.layer_shapes.values())
            self._lora = (
                [nn.Parameter(torch.zeros(rank, i, device=device)) for i, _ in shapes],
                [nn.Parameter(torch.zeros(o, rank, device=device)) for _, o in shapes],
            )
        return self._lora

    def remove_lora(self) -> None:
        """Take the plain LoRA off (its tensors are kept for reuse); the LiDB weights train again."""
        self.source.lora_down = self.source.lora_up = None
        for parameter in (self.A_train, self.B_train):
            parameter.requires_grad_(True)
        self.source.clear_factors()  # built without gradients for A and B

    def _use_lora(self, downs: list[nn.Parameter], ups: list[nn.Parameter]) -> None:
        self.source.lora_down, self.source.lora_up = downs, ups
        for parameter in (self.A_train, self.B_train):  # kept as predicted: no gradient work for them
            parameter.requires_grad_(False)
        self.source.clear_factors()

    def relax_rank(self, rank: int) -> None:
        """Grow the shared weights to a higher rank without changing the function they compute."""
        self.start_from(self.A_train.detach().clone(), self.B_train.detach().clone(), rank)

    def merge(self, lora: bool = True) -> None:
        """Fold the shared weights into the base weights: sampling then costs what the base model costs.

        Exact to undo (`unmerge` restores the original tensors), at the cost of one copy of the targeted
        weights while merged (SD1.5: the attention projections, `merged_bytes`). Unmerge to change them.
        `lora=False` folds in the LiDB weights only: the plain LoRA on top stays live and trainable, and a
        step then costs what a plain LoRA step costs (the paper's finetune on the merged prediction).
        """
        if not self.uses_shared:
            raise HdbError("Only shared LiDB weights can be merged; call use_shared() first")
        if not self.mergeable:
            raise HdbError("The base's weights are quantised: a person cannot be merged into them (draw unmerged)")
        for layer in self.layers.values():
            layer.merge(lora)
        self.source.merged = True
        self.source.clear_factors()

    def unmerge(self) -> None:
        for layer in self.layers.values():
            layer.unmerge()
        self.source.merged = False

    def merged_bytes(self) -> int:
        """What merging costs in memory: one copy of every targeted base weight."""
        return sum(layer.base.weight.numel() * layer.base.weight.element_size() for layer in self.layers.values())

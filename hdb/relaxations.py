"""The paper's rank relaxation, one class per way of doing it: where a fast finetune starts from a prediction.

A hypernetwork predicts rank-1 LiDB weights (A, B); the finetune then "relaxes" that rank so it has room to
learn the person (paper, Sec. 3.3). A `Relaxation` loads the prediction into the pipeline's LiDB so that the model
computes exactly the prediction, and sets up what trains from there. As peft's LoRA variants (`LoraVariant`), each
is a small strategy over the layer's owner, `LiDB`, using its primitives: `start_from`, `put_on_top` (a low-rank
term on top of the LiDB weights, e.g. `add_lora`'s), and its weights' `freeze_first_ranks` and `train`. What trains
(`LiDB.trainable_parameters`: the terms' parameters that require gradients), how a step runs
(`LiDB.merged_while_training`: the terms that do not train folded into the weights) and what a personal file stores
(the LiDB weights, and the plain LoRA if any) follow from what it set up.

To add one: a subclass here and a line in RELAXATIONS; its name joins hdb.config.RELAX_MODES (the command line's
and the configs' choices, which a test holds equal to RELAXATIONS' keys). A relaxation that needs state of its own
adds a `hdb.lidb.LowRankTerm` (forward, merging and training sum or move it unchanged); a personal file stores the
plain LoRA term only, so such a term also needs a place in hdb/personal_file.py and hdb/export.py.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch

from hdb.config import RELAX_MODES
from hdb.errors import check_choice
from hdb.lidb import LiDB


class Relaxation(ABC):
    name: ClassVar[str]  # one of hdb.config.RELAX_MODES

    @abstractmethod
    def start(
        self,
        lidb: LiDB,
        A: torch.Tensor,
        B: torch.Tensor,
        rank: int,
        generator: torch.Generator | None,
        train_prediction: bool | None,
    ) -> None:
        """Load the prediction (A: [L, k, a], B: [L, b, k]) into `lidb`, relaxed to `rank`, the model computing
        exactly the prediction. `train_prediction`: whether the prediction's own numbers train too (None: the
        relaxation's own default; the toy crosses the two)."""


class PlainLoRA(Relaxation):
    """The paper's: the prediction stays as predicted and a plain rank-`rank` LoRA on top trains, free of the aux
    bases (~4.4 MB at SD1.5 size). By default the prediction does not train."""

    name = "lora"

    def start(self, lidb, A, B, rank, generator, train_prediction) -> None:  # noqa: ANN001 (Relaxation.start's)
        lidb.start_from(A, B)
        lidb.add_lora(rank, generator)
        if train_prediction:
            lidb.own.train()


class LiDBRank(Relaxation):
    """hdb's compact variant: the LiDB's own rank grows to `rank` (new rows random, new columns zero), every update
    inside the aux bases (~420 KB at SD1.5 size). By default the prediction trains with the rest."""

    name = "lidb"

    def start(self, lidb, A, B, rank, generator, train_prediction) -> None:  # noqa: ANN001 (Relaxation.start's)
        lidb.start_from(A, B, max(rank, A.shape[1]), generator)
        if train_prediction is False:
            lidb.own.freeze_first_ranks(A.shape[1])


RELAXATIONS: dict[str, Relaxation] = {relaxation.name: relaxation for relaxation in (PlainLoRA(), LiDBRank())}


def relax(
    lidb: LiDB,
    mode: str,
    A: torch.Tensor,
    B: torch.Tensor,
    rank: int,
    generator: torch.Generator | None = None,
    train_prediction: bool | None = None,
) -> None:
    """Start a fast finetune from the prediction (A, B), its rank relaxed to `rank` the `mode` way (RELAX_MODES).
    Then train `lidb.trainable_parameters()` inside `lidb.merged_while_training()`."""
    check_choice("relaxation", mode, RELAX_MODES)
    RELAXATIONS[mode].start(lidb, A, B, rank, generator, train_prediction)

"""A frozen base in 4 bits (QLoRA-style): LiDB and its plain LoRA train and draw on bitsandbytes' quantised linears.

diffusers quantises a base only on a GPU (tests/test_gpu.py loads one with `quantize`); bitsandbytes' 4-bit linears
themselves run on a CPU, so here the tiny FLUX.1's transformer is quantised in place, as diffusers would load it.
"""

import numpy as np
import pytest
import torch
from helpers import ASSETS
from helpers import hdb_cli as hdb
from torch import nn

from hdb.config import PersonalizeConfig
from hdb.errors import HdbError
from hdb.models import build_tiny_pipeline, load_pipeline, save_tiny_pipeline
from hdb.pipeline import PersonalPipeline


def quantised_in_4_bits(model: nn.Module) -> nn.Module:
    """Every nn.Linear of `model` as bitsandbytes' NF4 Linear4bit (quantised as it moves to the CPU)."""
    import bitsandbytes as bnb

    for module in list(model.modules()):
        for name, linear in list(module.named_children()):
            if type(linear) is nn.Linear:
                quantised = bnb.nn.Linear4bit(
                    linear.in_features, linear.out_features, linear.bias is not None, torch.float32, quant_type="nf4"
                )
                quantised.weight = bnb.nn.Params4bit(linear.weight.data.clone(), requires_grad=False, quant_type="nf4")
                if linear.bias is not None:
                    quantised.bias = nn.Parameter(linear.bias.data.clone(), requires_grad=False)
                setattr(module, name, quantised.to("cpu"))
    return model


def test_a_person_trains_and_draws_on_a_4_bit_transformer():
    pipe = build_tiny_pipeline("flux")
    quantised_in_4_bits(pipe.transformer)
    personal = PersonalPipeline(pipe)
    assert not personal.lidb.mergeable  # integers cannot take a person added in
    before = [p.detach().clone() for p in pipe.transformer.parameters()]
    result = personal.personalize(ASSETS / "obama.jpg", PersonalizeConfig(steps=4, learning_rate=1e-2, progress=False))
    assert np.isfinite(result.losses).all() and max(up.abs().max() for up in result.weights.lora_up) > 0
    assert all(torch.equal(a, b) for a, b in zip(before, pipe.transformer.parameters(), strict=True))  # frozen
    drawn = np.asarray(personal.generate("a photo of [V]", steps=2, seed=0)[0], dtype=float)  # unmerged
    without = np.asarray(personal.generate("a photo of [V]", steps=2, seed=0, strength=0.0)[0], dtype=float)
    assert np.abs(drawn - without).max() > 0  # the person is drawn, not the base
    with pytest.raises(HdbError, match="quantised: a person cannot be merged into them"):
        personal.lidb.merge()


def test_a_quantised_base_is_refused_off_a_gpu_before_it_loads(tmp_path):
    base = save_tiny_pipeline(tmp_path / "flux", "flux")
    with pytest.raises(HdbError, match=r"Quantising the base \(nf4\) takes bitsandbytes on a CUDA GPU, not cpu"):
        load_pipeline(str(base), device="cpu", quantize="nf4")
    refused = hdb("personalize", ASSETS / "obama.jpg", "--base", base, "--quantize", "int8", "--device", "cpu",
                  "-o", tmp_path / "me.safetensors", check=False)  # fmt: skip
    assert refused.returncode != 0 and "Quantising the base (int8) takes bitsandbytes on a CUDA GPU" in refused.stderr

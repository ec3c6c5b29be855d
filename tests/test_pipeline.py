"""PersonalPipeline, the owner of a pipeline's person, and the LiDB scopes it and everyone else use."""

import pytest
import torch
from helpers import ASSETS, trained_person
from helpers import hdb_cli as hdb
from PIL import Image, ImageChops

from hdb.errors import HdbError
from hdb.lidb import LiDB, LiDBLinear
from hdb.models import build_tiny_pipeline, save_tiny_pipeline
from hdb.personal_file import PersonalWeights
from hdb.pipeline import PersonalPipeline


def state(personal: PersonalPipeline) -> tuple:
    lidb = personal.lidb
    return lidb.scale, lidb.merged, lidb.own.uses_shared, personal.pipe.scheduler, lidb.A_train.clone(), lidb.rank


def someone(pipe) -> PersonalWeights:
    """A random person with a plain LoRA on top, made on another copy of the tiny pipeline."""
    return PersonalWeights.from_lidb(trained_person(pipe, lora_rank=2))


@pytest.mark.parametrize("failure", ["seed", "sampling"])
def test_a_generation_that_raises_leaves_strength_merge_and_scheduler_as_they_were(failure):
    personal = PersonalPipeline(build_tiny_pipeline("sd15"))
    personal.use(someone(build_tiny_pipeline("sd15")))
    before = state(personal)
    if failure == "sampling":  # the UNet fails mid-way, with the person merged at strength 0.5
        handle = personal.pipe.unet.register_forward_hook(lambda *_: (_ for _ in ()).throw(RuntimeError("boom")))
        with pytest.raises(RuntimeError, match="boom"):
            personal.generate("a [V]", strength=0.5, steps=2)
        handle.remove()
    else:  # 2**64 does not fit a torch generator: refused before anything changes
        with pytest.raises(HdbError, match="seed must be a whole number from 0 to"):
            personal.generate("a [V]", strength=0.5, steps=2, seed=2**64)
    after = state(personal)
    assert after[:4] == before[:4] and torch.equal(after[4], before[4]) and after[5] == before[5]
    first = personal.generate("a [V]", steps=2, seed=3)[0]  # and the next generation works, as before
    assert first.size == (64, 64)


def test_nan_strength_or_guidance_is_refused():
    personal = PersonalPipeline(build_tiny_pipeline("sd15"))
    personal.use(someone(build_tiny_pipeline("sd15")))
    for options in ({"strength": float("nan")}, {"guidance": float("inf")}):
        with pytest.raises(HdbError, match="finite"):
            personal.generate("a [V]", steps=2, **options)
    with pytest.raises(HdbError, match="No person is loaded"):
        PersonalPipeline(build_tiny_pipeline("sd15")).generate("a [V]")


def test_the_scopes_put_everything_back(tiny_sd15):
    lidb = trained_person(tiny_sd15, lora_rank=2)
    shared = lidb.A_train.clone(), lidb.B_train.clone()
    lora = [t.clone() for t in lidb.plain_lora().downs]
    A, B = torch.randn(lidb.A_train.shape[0], 3, lidb.config.a), torch.randn(lidb.B_train.shape[0], lidb.config.b, 3)
    with pytest.raises(RuntimeError), lidb.holding(A[:, :1], B[:, :, :1]), lidb.scaled(0.25):
        assert lidb.rank == 1 and lidb.lora_rank == 0 and lidb.scale == 0.25
        with lidb.merged_into_weights():
            assert lidb.merged
            raise RuntimeError
    assert lidb.scale == 1.0 and not lidb.merged and lidb.rank == 1 and lidb.lora_rank == 2
    assert torch.equal(lidb.A_train, shared[0]) and torch.equal(lidb.B_train, shared[1])
    assert all(torch.equal(a, b) for a, b in zip(lidb.plain_lora().downs, lora, strict=True))
    per_sample = lidb.own.initial_weights(2)
    with lidb.own.per_sample(*per_sample):
        assert not lidb.own.uses_shared
        with lidb.holding(*shared):  # e.g. stage 2 looks at a prediction mid-training
            assert lidb.own.uses_shared
        assert not lidb.own.uses_shared and lidb.own.A is per_sample[0]
    assert lidb.own.uses_shared


def test_a_training_stages_lidb_comes_off_whatever_happens(tiny_sd15):
    with pytest.raises(RuntimeError), LiDB.attached(tiny_sd15) as lidb:
        lidb.merge()
        raise RuntimeError
    modules = [*tiny_sd15.unet.modules(), *tiny_sd15.text_encoder.modules()]
    assert not lidb.layers and not any(isinstance(module, LiDBLinear) for module in modules)
    PersonalPipeline(tiny_sd15)  # a LiDB can be attached again: the last one is really gone


def test_unload_gives_the_pipeline_back_exactly(tiny_sd15):
    weights = {k: v.clone() for k, v in tiny_sd15.unet.state_dict().items()}
    personal = PersonalPipeline(tiny_sd15)
    personal.use(someone(build_tiny_pipeline("sd15")))
    personal.generate("a [V]", steps=2)
    personal.unload()
    assert tiny_sd15.unet.state_dict().keys() == weights.keys()
    assert all(torch.equal(v, weights[k]) for k, v in tiny_sd15.unet.state_dict().items())


def test_the_cli_crops_faces_as_the_library_does(tmp_path):
    """SDXL's native size is 1024: the CLI, the library and the app all crop for it (not for 512)."""
    base = save_tiny_pipeline(tmp_path / "sdxl", "sdxl")
    personal = PersonalPipeline.load(str(base), device="cpu", dtype="fp32")
    library = personal.faces(ASSETS / "obama.jpg")[0].image
    hdb("personalize", ASSETS / "obama.jpg", "--base", base, "-o", tmp_path / "p.safetensors",
        "--steps", "1", "--save-face", tmp_path / "face.png")  # fmt: skip
    cli = Image.open(tmp_path / "face.png").convert("RGB")
    assert cli.size == library.size and not ImageChops.difference(cli, library).getbbox()

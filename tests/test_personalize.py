"""Personalisation end to end on the tiny pipeline: CLI, loss going down, optimizers, bad input."""

import functools

import numpy as np
import pytest
import torch
from helpers import ASSETS, TINY_DECODER, assert_one_line_error, hdb_in_process
from helpers import hdb_cli as hdb
from PIL import Image

from hdb.config import RELAX_MODES
from hdb.errors import HdbError
from hdb.faces import align_face
from hdb.lidb import LiDB
from hdb.models import build_tiny_pipeline
from hdb.personalize import PersonalizeConfig, photo_loss
from hdb.pipeline import PersonalPipeline
from hdb.styles import DEFAULT_NEGATIVE, STYLE_NEGATIVES, STYLE_PRESETS, expand_prompt, negative_for, picture_size


def test_cli_personalize_then_generate_is_reproducible(tiny_sd15_dir, tmp_path):
    person = tmp_path / "obama.safetensors"
    out = hdb(
        "personalize", ASSETS / "obama.jpg", "--base", tiny_sd15_dir, "-o", person, "--steps", "8", "--rank", "1"
    ).stdout
    assert "No --hypernet given" in out and "8 steps" in out
    assert person.stat().st_size <= 120_000

    args = [
        "generate",
        "--base",
        tiny_sd15_dir,
        "--person",
        person,
        "--prompt",
        "[V] as an astronaut",
        "--steps",
        "3",
        "--seed",
        "7",
    ]
    hdb(*args, "-o", tmp_path / "first.png")
    hdb(*args, "-o", tmp_path / "second.png")  # a fresh process loading the file again
    first, second = (np.asarray(Image.open(tmp_path / name)) for name in ("first.png", "second.png"))
    assert first.shape == (64, 64, 3) and np.array_equal(first, second)
    scored = hdb(*args[:-1], "8", "-o", tmp_path / "other_seed.png", "--score", ASSETS / "obama.jpg").stdout
    assert not np.array_equal(first, np.asarray(Image.open(tmp_path / "other_seed.png")))
    assert "(no face found)" in scored  # the tiny random model draws no face; a real one prints "identity 0.xx"


def test_file_reproduces_the_in_memory_person(tiny_sd15_dir, obama_face, tmp_path):
    personal = PersonalPipeline.load(str(tiny_sd15_dir), device="cpu", dtype="fp32")
    personal.personalize(obama_face, PersonalizeConfig(steps=5, progress=False))
    trained = personal.generate("[V] in a garden", steps=3, seed=3)[0]
    path = personal.save(tmp_path / "p.safetensors")
    fresh = PersonalPipeline.load(str(tiny_sd15_dir), device="cpu", dtype="fp32")
    fresh.use(path)
    loaded = fresh.generate("[V] in a garden", steps=3, seed=3)[0]
    assert np.array_equal(np.asarray(trained), np.asarray(loaded))


@pytest.mark.parametrize("optimizer", ["adamw", "adamw8bit"])
def test_finetuning_from_zero_lowers_the_loss_on_the_photo(obama_face, optimizer):
    pipe = build_tiny_pipeline("sd15")
    personal = PersonalPipeline(pipe)
    before = photo_loss(pipe, personal.lidb, obama_face)
    result = personal.personalize(
        obama_face, PersonalizeConfig(steps=30, learning_rate=5e-3, optimizer=optimizer, progress=False)
    )
    after = photo_loss(pipe, personal.lidb, obama_face)
    assert result.steps == 30 and len(result.losses) == 30 and not result.used_hypernet
    assert after < before - 0.02, (before, after)


def test_style_presets_and_prompt_expansion():
    assert expand_prompt("[V] as a chef", "sks person") == "sks person as a chef"
    assert "oil painting" in expand_prompt("[V]", "sks person", "Oil painting")
    assert all("{prompt}" in template for template in STYLE_PRESETS.values())
    with pytest.raises(HdbError, match="Unknown style"):
        expand_prompt("[V]", "sks person", "Nope")
    with pytest.raises(HdbError, match="empty"):
        expand_prompt("  ", "sks person")
    assert negative_for("None") == DEFAULT_NEGATIVE and "photograph" in negative_for("Oil painting")
    assert set(STYLE_NEGATIVES) < set(STYLE_PRESETS)
    assert picture_size("Portrait", 512) == (512, 768) and picture_size("Landscape", 1024) == (1216, 832)
    assert picture_size("Portrait", 64) == (64, 96)  # other bases scale SD1.x's sizes
    with pytest.raises(HdbError, match="Unknown size 'Huge'"):
        picture_size("Huge", 512)


def test_cli_bad_inputs_end_with_one_line_errors(tiny_sd15_dir, tmp_path, capsys):
    # the first in a fresh process (its exit code and stderr), the others through the CLI's main in this one
    (tmp_path / "notes.jpg").write_text("not a photo")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 50)
    base = ["--base", tiny_sd15_dir, "-o", tmp_path / "p.safetensors", "--steps", "1"]
    assert_one_line_error(hdb("personalize", tmp_path / "notes.jpg", *base, check=False), "not an image")
    here = functools.partial(hdb_in_process, capsys)
    assert_one_line_error(here("personalize", ASSETS / "landscape.jpg", *base), "No face")
    assert_one_line_error(here("personalize", tmp_path / "missing.jpg", *base), "Image file not found")
    nowhere = ["--base", tmp_path / "nowhere", "-o", tmp_path / "p.safetensors"]
    assert_one_line_error(here("personalize", ASSETS / "obama.jpg", *nowhere), "does not exist")
    no_hypernet = ["--optimizer", "adamw8bit", "--hypernet", tmp_path / "nohypernet"]
    assert_one_line_error(here("personalize", ASSETS / "obama.jpg", *base, *no_hypernet), "Hypernetwork directory")
    gen = ["generate", "--base", tiny_sd15_dir, "--prompt", "[V]", "-o", tmp_path / "x.png"]
    assert_one_line_error(here(*gen, "--person", tmp_path / "junk.safetensors"), "truncated or corrupt")
    assert_one_line_error(here(*gen, "--person", tmp_path / "missing.safetensors"), "not found")


def tiny_hypernet(pipe):
    from hdb.hypernet import HyperNetwork, build_tiny_image_encoder

    with LiDB.attached(pipe) as lidb:
        return HyperNetwork.for_lidb(lidb, build_tiny_image_encoder(), "tiny", decoder=TINY_DECODER)


@pytest.mark.parametrize("relax", ["lora", "lidb"])
def test_finetuning_from_a_hypernetwork_prediction_lowers_the_loss(obama_face, relax):
    pipe = build_tiny_pipeline("sd15")
    hypernet = tiny_hypernet(pipe)
    with torch.no_grad():  # a prediction that is clearly not zero, as a trained hypernetwork gives
        hypernet.head_bias.normal_(0, 0.05)
    personal = PersonalPipeline(pipe, hypernet)
    A, B = hypernet.predict(obama_face.image)
    personal.use_weights(A, B)
    before = photo_loss(pipe, personal.lidb, obama_face)
    config = PersonalizeConfig(learning_rate=5e-3, relax=relax, progress=False)
    result = personal.personalize(obama_face, config)
    after = photo_loss(pipe, personal.lidb, obama_face)
    assert result.used_hypernet and result.steps == 40  # the paper's default with a hypernetwork
    if relax == "lora":  # the prediction is kept as it is; a plain rank-4 LoRA on top did the learning
        assert result.weights.config.rank == 1 and result.weights.lora_rank == 4
        assert torch.equal(result.weights.A, A) and torch.equal(result.weights.B, B)
    else:  # the LiDB itself grew to rank 4 and trained
        assert result.weights.config.rank == 4 and result.weights.lora_rank == 0
    assert after < before - 0.02, (before, after)


@pytest.mark.parametrize("relax", RELAX_MODES)
def test_the_prediction_trains_or_stays_as_asked(obama_face, relax):
    """The toy's ablation crosses the relaxations with train_prediction: each trains exactly what it says."""
    pipe = build_tiny_pipeline("sd15")
    hypernet = tiny_hypernet(pipe)
    with torch.no_grad():
        hypernet.head_bias.normal_(0, 0.05)
    personal = PersonalPipeline(pipe, hypernet)
    A, B = hypernet.predict(obama_face.image)
    natural = relax == "lidb"  # what each relaxation does when not told
    for train_prediction in (not natural, natural, None):  # frozen hooks must not outlive their finetune
        config = PersonalizeConfig(
            steps=3, learning_rate=5e-3, relax=relax, train_prediction=train_prediction, progress=False
        )
        weights = personal.personalize(obama_face, config).weights
        kept = torch.equal(weights.A[:, :1], A) and torch.equal(weights.B[:, :, :1], B)
        assert kept == (not (natural if train_prediction is None else train_prediction)), train_prediction
        if relax == "lora":  # the plain LoRA on top trains either way
            assert weights.lora_rank == 4 and weights.config.rank == 1 and weights.lora_up[0].any()
        else:  # the added rank inside the LiDB trains either way
            assert weights.config.rank == 4 and weights.B[:, :, 1:].any()


def test_cli_personalize_with_a_hypernetwork_checkpoint(tiny_sd15_dir, tmp_path):
    from hdb.models import load_pipeline

    pipe = load_pipeline(str(tiny_sd15_dir), "fp32", "cpu")
    tiny_hypernet(pipe).save_pretrained(tmp_path / "hypernet")
    out = hdb(
        "personalize",
        ASSETS / "grace_hopper.jpg",
        "--base",
        tiny_sd15_dir,
        "--hypernet",
        tmp_path / "hypernet",
        "-o",
        tmp_path / "p.safetensors",
        "--steps",
        "3",
        "--optimizer",
        "adamw8bit",
    ).stdout
    assert "No --hypernet" not in out and "3 steps" in out
    # a hypernetwork for another architecture is refused with a one-line error
    sdxl = build_tiny_pipeline("sdxl")
    tiny_hypernet(sdxl).save_pretrained(tmp_path / "sdxl_hypernet")
    result = hdb(
        "personalize",
        ASSETS / "grace_hopper.jpg",
        "--base",
        tiny_sd15_dir,
        "--hypernet",
        tmp_path / "sdxl_hypernet",
        "-o",
        tmp_path / "q.safetensors",
        check=False,
    )
    assert_one_line_error(result, "LiDB layers")


def test_several_photos_of_one_person(obama_face, tiny_sd15):
    second, other = (align_face(ASSETS / name, size=256) for name in ("obama2.jpg", "biden.jpg"))
    hypernet = tiny_hypernet(tiny_sd15)
    with torch.no_grad():
        hypernet.head_bias.normal_(0, 0.05)  # predictions that differ from photo to photo
    personal = PersonalPipeline(tiny_sd15, hypernet)
    predictions = [hypernet.predict(face.image) for face in (obama_face, second)]
    config = PersonalizeConfig(steps=0, progress=False)  # no finetuning: the start is what is left
    both = personal.personalize([obama_face, second], config)
    # the prediction combines the photos: the mean of their updates B @ A, layer by layer
    mean_update = sum(B @ A for A, B in predictions) / 2
    torch.testing.assert_close(both.weights.B @ both.weights.A, mean_update, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(predictions[0][1] @ predictions[0][0], mean_update, atol=1e-6)  # not just one photo's
    # an update does not change when both its factors change sign; neither does the mean (a mean of the factors
    # would be zero here)
    A, B = predictions[0]
    flipped = iter([(A, B), (-A, -B)])
    personal.hypernet.predict = lambda image: next(flipped)
    same = personal.personalize([obama_face, second], config)
    torch.testing.assert_close(same.weights.B @ same.weights.A, B @ A, atol=1e-6, rtol=1e-5)
    del personal.hypernet.predict
    assert both.notes == [] and len(both.faces) == 2 and both.face is both.faces[0]
    mixed = personal.personalize([obama_face, other], PersonalizeConfig(steps=2, progress=False))
    assert len(mixed.notes) == 1 and "Photo 2 may show someone other than photo 1" in mixed.notes[0]
    with pytest.raises(HdbError, match="from 1 to 5 photos"):
        personal.personalize([obama_face] * 6)


def test_cli_personalize_from_two_photos_warns_about_different_people(tiny_sd15_dir, tmp_path):
    out = hdb("personalize", ASSETS / "obama.jpg", ASSETS / "biden.jpg", "--base", tiny_sd15_dir,
              "-o", tmp_path / "p.safetensors", "--steps", "2").stdout  # fmt: skip
    assert "warning: Photo 2 may show someone other than photo 1" in out and (tmp_path / "p.safetensors").is_file()

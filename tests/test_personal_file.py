"""Personal weight files: exact round trip, the ~100 KB size bound, clear errors on bad files."""

import os
from datetime import UTC, datetime, timedelta

import pytest
import torch
from helpers import trained_person

from hdb.errors import HdbError
from hdb.families import family_of
from hdb.families.sd import StableDiffusion
from hdb.lidb import LiDBConfig, arch_fingerprint, aux_bases, aux_fingerprint, find_target_linears
from hdb.models import build_full_size_sd15, build_tiny_pipeline, load_pipeline
from hdb.personal_file import (
    PersonalWeights,
    describe,
    family_from_layers,
    hub_id,
    load_personal,
    public_name,
    save_personal,
)
from hdb.pipeline import PersonalPipeline


def holding(pipe, person, lidb_config=None):
    """A PersonalPipeline on `pipe` holding `person` (a file or weights)."""
    personal = PersonalPipeline(pipe, lidb_config=lidb_config)
    personal.use(person)
    return personal


def test_save_load_is_bit_exact_and_reproduces_the_model(tiny_sd15, tmp_path):
    lidb = trained_person(tiny_sd15)
    path = save_personal(PersonalWeights.from_lidb(lidb, "a photo of zxq person"), tmp_path / "person.safetensors")
    loaded = load_personal(path)
    assert torch.equal(loaded.A, lidb.A_train.detach()) and torch.equal(loaded.B, lidb.B_train.detach())
    assert loaded.instance_prompt == "a photo of zxq person"
    assert loaded.layer_names == lidb.layer_names and loaded.config == lidb.config

    fresh = build_tiny_pipeline("sd15")
    fresh_lidb = holding(fresh, path).lidb
    assert torch.equal(fresh_lidb.A_train, lidb.A_train) and torch.equal(fresh_lidb.B_train, lidb.B_train)
    ids = tiny_sd15.tokenizer(["a photo of zxq person"], return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(fresh.text_encoder(ids)[0], tiny_sd15.text_encoder(ids)[0])


def test_a_plain_lora_on_top_round_trips_exactly(tiny_sd15, tmp_path):
    lidb = trained_person(tiny_sd15, lora_rank=2)
    path = save_personal(PersonalWeights.from_lidb(lidb), tmp_path / "person.safetensors")
    loaded = load_personal(path)
    assert loaded.lora_rank == 2 and loaded.config.rank == 1
    assert all(torch.equal(a, b) for a, b in zip(loaded.lora_up, lidb.plain_lora().ups, strict=True))
    assert "plain LoRA:       rank 2" in describe(path)
    fresh = build_tiny_pipeline("sd15")
    personal = holding(fresh, path)
    fresh_lidb = personal.lidb
    assert all(torch.equal(a, b) for a, b in zip(fresh_lidb.plain_lora().downs, lidb.plain_lora().downs, strict=True))
    personal.use(PersonalWeights.from_lidb(trained_person(build_tiny_pipeline("sd15"))))
    assert fresh_lidb.lora_rank == 0  # the next person, a LiDB-only one, does not inherit the LoRA


def test_a_version_1_file_still_loads_with_its_own_token(tiny_sd15, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = save_personal(PersonalWeights.from_lidb(trained_person(tiny_sd15)), tmp_path / "new.safetensors")
    with safe_open(str(path), "pt") as file:  # rewrite it as hdb wrote files before the plain LoRA existed
        metadata, tensors = file.metadata(), {key: file.get_tensor(key) for key in file.keys()}
    del metadata["lora_rank"]
    metadata.update(format_version="1", instance_token="sks person", instance_prompt="a photo of sks person")
    save_file(tensors, str(tmp_path / "v1.safetensors"), metadata=metadata)
    old = load_personal(tmp_path / "v1.safetensors")
    assert old.lora_rank == 0 and old.instance_token == "sks person" and torch.equal(old.B, tensors["B_train"])


def test_a_file_records_its_base_family_and_an_older_one_is_told_by_its_layers(tmp_path):
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from safetensors import safe_open
    from safetensors.torch import save_file

    weights = PersonalWeights.from_lidb(trained_person(build_tiny_pipeline("sd2")))
    path = save_personal(weights, tmp_path / "p.safetensors")
    person = load_personal(path)
    assert (person.base_family, person.prediction_type) == ("sd2", "v_prediction")
    assert "base family:      sd2, predicting v_prediction" in describe(path)

    with safe_open(str(path), "pt") as file:  # as hdb wrote files before it recorded the family
        metadata, tensors = file.metadata(), {key: file.get_tensor(key) for key in file.keys()}
    older = {key: value for key, value in metadata.items() if key not in ("base_family", "prediction_type")}
    save_file(tensors, str(tmp_path / "old.safetensors"), metadata=older)
    assert load_personal(tmp_path / "old.safetensors").base_family == ""  # tiny widths tell nothing: no guess
    save_file(tensors, str(tmp_path / "forged.safetensors"), metadata={**metadata, "base_family": "sd9"})
    with pytest.raises(HdbError, match="damaged metadata.*unknown base family 'sd9'"):
        load_personal(tmp_path / "forged.safetensors")

    def unet_layers(**config) -> dict[str, tuple[int, int]]:  # the real models' shapes, on the meta device
        with init_empty_weights():
            unet = UNet2DConditionModel(sample_size=64, **config)
        targets = find_target_linears({"unet": (unet, StableDiffusion.denoiser_projections)})
        return {name: (linear.in_features, linear.out_features) for name, linear in targets.items()}

    assert family_from_layers(unet_layers(cross_attention_dim=768)) == "sd1"  # SD1.x reads CLIP-L's 768
    sd2 = dict(cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True)
    assert family_from_layers(unet_layers(**sd2)) == "sd2"  # SD2.x reads OpenCLIP-H's 1024
    assert family_from_layers({"text_encoder_2.encoder.layers.0.self_attn.q_proj": (1280, 1280)}) == "sdxl"


def metadata_of(path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as file:
        return file.metadata()


def rewritten(path, target, **changes: str | None):
    """A copy of the personal file `path` at `target` with metadata fields changed (None: left out), as an older
    hdb, another machine or a forger might have written it."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), "pt") as file:
        metadata, tensors = file.metadata(), {key: file.get_tensor(key) for key in file.keys()}
    metadata = {key: value for key, value in {**metadata, **changes}.items() if value is not None}
    save_file(tensors, str(target), metadata=metadata)
    return target


def test_a_file_made_from_a_local_folder_names_the_folder_not_its_path(tiny_sd15_dir, tmp_path):
    weights = PersonalWeights.from_lidb(trained_person(load_pipeline(str(tiny_sd15_dir), "fp32", "cpu")))
    assert weights.base_model == str(tiny_sd15_dir)  # diffusers records where the base was loaded from
    path = save_personal(weights, tmp_path / "person.safetensors")
    metadata = metadata_of(path)
    assert metadata["base_model"] == "sd15" and metadata["base_family"] == "sd1"  # the folder's name and family
    for key, value in metadata.items():  # no path, nor any part of one, anywhere
        assert str(tiny_sd15_dir.parent) not in value and not value.startswith((os.sep, "~")), key
    assert "base model:       sd15  " in describe(path)


@pytest.mark.parametrize("recorded", ["/home/someone/models/sd15", "~/sd15/", "./sd15", "C:\\Users\\someone\\sd15"])
def test_a_loaded_file_with_a_path_is_saved_again_with_the_folder_name_alone(tiny_sd15, tmp_path, recorded):
    made = save_personal(PersonalWeights.from_lidb(trained_person(tiny_sd15)), tmp_path / "made.safetensors")
    uploaded = rewritten(made, tmp_path / "uploaded.safetensors", base_model=recorded)  # a visitor's older file
    saved = metadata_of(save_personal(load_personal(uploaded), tmp_path / "saved.safetensors"))
    assert saved == {**metadata_of(made), "base_model": "sd15"}  # the app re-saves uploads: nothing else changes


def test_hub_ids_and_local_folders_are_told_apart(tmp_path):
    sd15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert hub_id(sd15) == sd15 and public_name(sd15) == sd15
    (tmp_path / "owner" / "name").mkdir(parents=True)
    for local in ("/models/sd15", "./sd15", "~/sd15", "sd15", "a/b/sd15", str(tmp_path / "owner" / "name"), ""):
        assert hub_id(local) is None, local
        assert public_name(public_name(local)) == public_name(local), local  # saving a loaded file changes nothing
    assert public_name("/models/sd15") == public_name("D:\\models\\sd15") == "sd15" and public_name("") == ""
    assert public_name(str(tmp_path / "owner" / "name")) == "name"  # a folder here, though shaped like a hub id


def test_a_file_keeps_when_its_person_was_made_through_every_load_and_save(tiny_sd15, tmp_path):
    weights = PersonalWeights.from_lidb(trained_person(tiny_sd15))
    made = datetime.fromisoformat(weights.created)
    assert made.utcoffset() == timedelta(0) and abs(datetime.now(UTC) - made) < timedelta(minutes=5)
    first = save_personal(weights, tmp_path / "first.safetensors")
    again = save_personal(load_personal(first), tmp_path / "again.safetensors")
    assert first.read_bytes() == again.read_bytes()  # the same person, the same file
    assert f"created:          {weights.created}" in describe(again)

    older = rewritten(first, tmp_path / "older.safetensors", created=None)  # before hdb recorded it
    assert load_personal(older).created == ""
    assert "created" not in metadata_of(save_personal(load_personal(older), tmp_path / "resaved.safetensors"))
    forged = rewritten(first, tmp_path / "forged.safetensors", created="last Tuesday")
    with pytest.raises(HdbError, match="damaged metadata.*creation time is not an ISO 8601 date"):
        load_personal(forged)


def test_fp16_file_is_half_the_size(tiny_sd15, tmp_path):
    weights = PersonalWeights.from_lidb(trained_person(tiny_sd15))
    fp32 = save_personal(weights, tmp_path / "fp32.safetensors")
    fp16 = save_personal(weights, tmp_path / "fp16.safetensors", dtype=torch.float16)
    numbers_bytes = weights.num_numbers * 4
    header = fp32.stat().st_size - numbers_bytes
    assert fp16.stat().st_size <= header + numbers_bytes // 2 + 16  # header padding may differ by a few bytes
    torch.testing.assert_close(load_personal(fp16).A, weights.A, atol=1e-3, rtol=1e-3)


def test_sd15_file_holds_26400_numbers_in_at_most_120_kb(tmp_path):
    # The real SD1.5 layer list: 860M-parameter UNet + CLIP ViT-L text encoder, shapes only (meta device).
    pipe = build_full_size_sd15(empty=True)
    targets = find_target_linears(family_of(pipe).lidb_components(pipe))
    shapes = {name: (linear.in_features, linear.out_features) for name, linear in targets.items()}
    assert len(shapes) == 176 and sum(name.startswith("unet.") for name in shapes) == 128
    config = LiDBConfig()  # r=1, a=100, b=50
    bases = [basis for name, (i, o) in shapes.items() for basis in aux_bases(0, name, i, o, config.a, config.b)]
    weights = PersonalWeights(
        A=torch.randn(176, 1, 100),
        B=torch.randn(176, 50, 1),
        config=config,
        layer_shapes=shapes,
        arch_fingerprint=arch_fingerprint(shapes),
        aux_fingerprint=aux_fingerprint(bases),
        instance_prompt="a photo of sks person",
        base_model="stable-diffusion-v1-5/stable-diffusion-v1-5",
    )
    assert weights.num_numbers == 26_400
    path = save_personal(weights, tmp_path / "sd15.safetensors")
    size = path.stat().st_size
    print(f"SD1.5 personal file: {size:,} bytes fp32")
    assert size <= 120_000
    assert save_personal(weights, tmp_path / "sd15_fp16.safetensors", torch.float16).stat().st_size <= 60_000
    assert torch.equal(load_personal(path).A, weights.A)


def test_truncated_file_is_refused(tiny_sd15, tmp_path):
    path = save_personal(PersonalWeights.from_lidb(trained_person(tiny_sd15)), tmp_path / "p.safetensors")
    data = path.read_bytes()
    for cut in (10, len(data) // 2, len(data) - 7):
        (tmp_path / "cut.safetensors").write_bytes(data[:cut])
        with pytest.raises(HdbError, match="truncated or corrupt"):
            load_personal(tmp_path / "cut.safetensors")


def test_random_bytes_and_missing_files_are_refused(tmp_path):
    (tmp_path / "noise.safetensors").write_bytes(os.urandom(4096))
    with pytest.raises(HdbError, match="truncated or corrupt"):
        load_personal(tmp_path / "noise.safetensors")
    with pytest.raises(HdbError, match="not found"):
        load_personal(tmp_path / "missing.safetensors")


def test_other_safetensors_file_is_refused(tmp_path):
    from safetensors.torch import save_file

    save_file({"lora.down": torch.zeros(2, 2)}, str(tmp_path / "lora.safetensors"))
    with pytest.raises(HdbError, match="not an hdb personal file"):
        load_personal(tmp_path / "lora.safetensors")


def test_file_for_another_architecture_is_refused(tiny_sd15, tiny_sdxl, tmp_path):
    path = save_personal(PersonalWeights.from_lidb(trained_person(tiny_sd15)), tmp_path / "sd15.safetensors")
    with pytest.raises(HdbError, match="another base model architecture"):
        holding(tiny_sdxl, path)


def test_file_from_another_seed_is_refused(tiny_sd15, tmp_path):
    path = save_personal(PersonalWeights.from_lidb(trained_person(tiny_sd15)), tmp_path / "seed0.safetensors")
    other = build_tiny_pipeline("sd15")
    with pytest.raises(HdbError, match="aux seed 0"):
        holding(other, path, LiDBConfig(seed=5))


def test_tampered_aux_fingerprint_is_refused(tiny_sd15, tmp_path):
    weights = PersonalWeights.from_lidb(trained_person(tiny_sd15))
    weights.aux_fingerprint = "0" * 16
    path = save_personal(weights, tmp_path / "bad.safetensors")
    with pytest.raises(HdbError, match="aux bases regenerated here"):
        holding(build_tiny_pipeline("sd15"), path)


def test_nan_weights_are_refused(tiny_sd15, tmp_path):
    weights = PersonalWeights.from_lidb(trained_person(tiny_sd15))
    weights.A[0, 0, 0] = float("nan")
    with pytest.raises(HdbError, match="NaN"):
        load_personal(save_personal(weights, tmp_path / "nan.safetensors"))


def test_describe_names_the_contents(tiny_sdxl, tmp_path):
    path = save_personal(
        PersonalWeights.from_lidb(trained_person(tiny_sdxl), "a photo of zxq person"), tmp_path / "p.safetensors"
    )
    text = describe(path)
    assert "r=1 a=100 b=50" in text and "zxq" in text and "text_encoder_2: 8" in text

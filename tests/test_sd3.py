"""Stable Diffusion 3.5, the second transformer family, in one file (hdb/families/sd3.py): the tiny SD3 pipeline."""

import pytest
import torch
from helpers import ASSETS, trained_person
from helpers import hdb_cli as hdb

from hdb.config import PersonalizeConfig
from hdb.errors import HdbError
from hdb.families import family_of, family_of_layers
from hdb.models import build_tiny_pipeline, save_tiny_pipeline
from hdb.personal_file import PersonalWeights, load_personal
from hdb.pipeline import PersonalPipeline


def test_lidb_targets_both_streams_medium_s_second_attention_and_both_clips():
    pipe = build_tiny_pipeline("sd3")
    layers = PersonalPipeline(pipe).lidb.layer_names
    image, text = ("to_q", "to_k", "to_v", "to_out.0"), ("add_q_proj", "add_k_proj", "add_v_proj")
    first, last = "transformer.transformer_blocks.0.", "transformer.transformer_blocks.1."
    assert layers[:12] == [f"{first}attn.{p}" for p in (*image, *text, "to_add_out")] + [
        f"{first}attn2.{p}" for p in image
    ]  # Medium's image-only attention: no text stream, no `to_add_out`
    assert layers[12:19] == [f"{last}attn.{p}" for p in (*image, *text)]  # the last block's text stops at q/k/v
    encoders = {name.split(".")[0] for name in layers[19:]}
    assert encoders == {"text_encoder", "text_encoder_2"} and len(layers) == 19 + 16  # both CLIPs, not T5
    family = family_of(pipe)
    assert (family.name, family.variant_name(pipe), family.native_resolution(pipe)) == ("sd3", "medium", 64)


def test_an_sd3_person_is_personalised_drawn_saved_and_told_from_other_families(tmp_path):
    personal = PersonalPipeline(build_tiny_pipeline("sd3"))
    result = personal.personalize(ASSETS / "obama.jpg", PersonalizeConfig(steps=4, learning_rate=1e-2, progress=False))
    assert all(torch.isfinite(torch.tensor(result.losses))) and result.weights.base_family == "sd3"
    image = personal.generate("a photo of [V] as an astronaut", steps=2, seed=0)[0]
    assert image.size == (64, 64)
    weights = load_personal(personal.save(tmp_path / "person.safetensors"))
    assert (weights.base_family, weights.prediction_type, weights.base_variant) == ("sd3", "flow", "medium")
    # by its layers alone (a file that does not record its family): SD3.5, not SDXL (two CLIPs) nor FLUX.1
    assert family_of_layers(weights.layer_shapes).name == "sd3"
    with pytest.raises(HdbError, match=r"a Stable Diffusion 3\.5 base; this base is FLUX\.1$"):
        PersonalPipeline(build_tiny_pipeline("flux")).use(weights)


def test_the_command_line_personalises_draws_and_exports_on_a_tiny_sd3(tmp_path):
    base, person = save_tiny_pipeline(tmp_path / "sd3", "sd3"), tmp_path / "me.safetensors"
    hdb("personalize", ASSETS / "obama.jpg", "--base", base, "--steps", "2", "-o", person, "--device", "cpu")
    hdb("generate", "--base", base, "--person", person, "--prompt", "a [V] as an astronaut", "--steps", "2",
        "-o", tmp_path / "out.png", "--device", "cpu")  # fmt: skip
    assert (tmp_path / "out.png").is_file() and load_personal(person).base_family == "sd3"
    refused = hdb("export", person, "--format", "kohya", "-o", tmp_path / "kohya.safetensors", check=False)
    assert refused.returncode != 0 and not (tmp_path / "kohya.safetensors").exists()
    assert "Stable Diffusion 3.5 LoRAs are exported in the diffusers format, not kohya" in refused.stderr


def test_an_sd3_card_carries_the_community_licence_and_loads_the_reference_model():
    from dataclasses import replace

    from hdb.hub import check_card, lora_card

    weights = replace(PersonalWeights.from_lidb(trained_person(build_tiny_pipeline("sd3"))), base_model="/x/my-sd3")
    card, _ = lora_card(weights, "someone/me-sd3-lora", "me.safetensors")
    check_card(card)
    data = card.data.to_dict()
    assert (data["license"], data["license_name"]) == ("other", "stabilityai-ai-community") and "sd3" in data["tags"]
    assert 'DiffusionPipeline.from_pretrained("stabilityai/stable-diffusion-3.5-medium"' in str(card)


def test_pictures_are_drawn_at_the_variants_own_steps_and_guidance():
    from hdb.generate import resolved_guidance, resolved_steps

    medium = build_tiny_pipeline("sd3")
    assert (resolved_steps(medium, None), resolved_guidance(medium, None)) == (40, 4.5)


def test_the_app_offers_and_describes_only_the_lora_files_the_family_exports():
    from hdb.app.handlers import KOHYA_FILE
    from hdb.app.page import downloads_help
    from hdb.families import FAMILIES

    assert KOHYA_FILE not in downloads_help(FAMILIES["sd3"].lora_formats)
    assert KOHYA_FILE in downloads_help(FAMILIES["sd1"].lora_formats) and "AUTOMATIC1111" in downloads_help(("kohya",))

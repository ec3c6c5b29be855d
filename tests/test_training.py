"""Training: stages 1 and 2 (DDP, resume, bad data), the loop's divergence guard, and the stage scaffold."""

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
from helpers import ASSETS, FailingUNet, assert_one_line_error
from helpers import hdb_cli as hdb
from PIL import Image, ImageOps
from safetensors.torch import load_file

from hdb.cache import TrainingData
from hdb.config import (
    WEIGHT_LOSSES,
    DatasetSource,
    HypernetTrainConfig,
    LiDBConfig,
    PersonalizeConfig,
    PreoptimizeConfig,
)
from hdb.diffusion import draw_noise, sample_seed, tokenize_prompts
from hdb.errors import HdbError
from hdb.hub import model_card
from hdb.hypernet import HyperNetwork, build_tiny_image_encoder
from hdb.identities import Identity
from hdb.lidb import LiDB, find_target_linears
from hdb.models import build_tiny_pipeline, save_tiny_pipeline
from hdb.personal_file import PersonalWeights, load_personal, save_personal
from hdb.pipeline import PersonalPipeline
from hdb.preoptimize import preoptimize
from hdb.train_hypernet import LOSSES_FILE, train_hypernetwork, weight_loss
from hdb.training import (
    TrainConfig,
    TrainingDiverged,
    learning_rate_factor,
    load_optimizer,
    make_optimizer,
    save_optimizer,
    train,
)

TINY_HYPERNET = ["--image-encoder", "tiny", "--width", "32", "--depth", "2", "--heads", "4", "--device", "cpu"]


@pytest.fixture(scope="module")
def identity_folder(tmp_path_factory):
    """Four identities (one with two photos in a sub-folder) plus a photo with no face and a broken file."""
    folder = tmp_path_factory.mktemp("identities")
    (folder / "obama").mkdir()
    shutil.copy(ASSETS / "obama.jpg", folder / "obama")
    shutil.copy(ASSETS / "obama2.jpg", folder / "obama")
    for name in ("biden.jpg", "astronaut.png", "grace_hopper.jpg", "landscape.jpg"):
        shutil.copy(ASSETS / name, folder / name)
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    return folder


@pytest.fixture(scope="module")
def preoptimized(identity_folder, tiny_sd15_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("preopt")
    result = hdb(
        "preoptimize",
        "--images",
        identity_folder,
        "--out",
        out,
        "--base",
        tiny_sd15_dir,
        "--steps",
        "6",
        "--group-size",
        "2",
    )
    return out, result.stdout


def train_args(identity_folder, tiny_sd15_dir, weights, out, steps=4):
    return [
        "train",
        "--images",
        identity_folder,
        "--weights",
        weights,
        "--out",
        out,
        "--base",
        tiny_sd15_dir,
        "--steps",
        str(steps),
        "--batch-size",
        "2",
        "--checkpoint-every",
        "2",
        "--validate-every",
        "2",
        *TINY_HYPERNET,
    ]


def logged(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "losses.jsonl").read_text().splitlines()]


def test_preoptimize_writes_a_resumable_dataset(preoptimized, identity_folder, tiny_sd15_dir):
    out, stdout = preoptimized
    assert "4 identities: 4 pre-optimised now" in stdout
    assert "'no face': 1" in stdout and "'unreadable': 1" in stdout
    names = sorted(p.stem for p in (out / "weights").glob("*.safetensors"))
    assert names == ["astronaut", "biden", "grace_hopper", "obama"]
    weights = {name: load_personal(out / "weights" / f"{name}.safetensors") for name in names}
    assert all(w.B.abs().max() > 0 for w in weights.values())  # trained away from the zero start
    assert not torch.equal(weights["obama"].B, weights["biden"].B)  # each identity its own weights
    again = hdb(
        "preoptimize", "--images", identity_folder, "--out", out, "--base", tiny_sd15_dir, "--steps", "6"
    ).stdout
    assert "0 pre-optimised now, 4 already done" in again


def accelerate_launch(*args, processes: int = 2, script: Path | None = None) -> subprocess.CompletedProcess:
    """`accelerate launch -m hdb ARGS` (or `SCRIPT ARGS`) on `processes` CPU processes (a gloo DDP group with
    --device cpu)."""
    launch = [
        str(Path(sys.executable).parent / "accelerate"),
        "launch",
        "--multi_gpu",
        "--num_processes",
        str(processes),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        *(["-m", "hdb"] if script is None else [str(script)]),
    ]
    checkout = str(Path(__file__).resolve().parent.parent)  # hdb, for a script too
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        PYTHONPATH=os.pathsep.join(filter(None, [checkout, os.environ.get("PYTHONPATH")])),
    )
    return subprocess.run([*launch, *map(str, args)], capture_output=True, text=True, env=env, timeout=600)


def test_a_diverging_group_is_recorded_and_the_others_are_written(tmp_path):
    pipe, people = build_tiny_pipeline("sd15"), random_people(5)
    config = PreoptimizeConfig(steps=3, group_size=2, lidb=LiDBConfig(a=8, b=4), progress=False)
    FailingUNet(pipe, "nan")  # the first group's first step: person0 and person1
    summary = preoptimize(pipe, people, tmp_path, config)
    assert summary["failed"] == ["person0", "person1"] and summary["trained"] == 3
    weights = sorted(path.name for path in (tmp_path / "weights").iterdir())
    assert weights == [
        "person0.failed.json", "person1.failed.json",
        "person2.safetensors", "person3.safetensors", "person4.safetensors",
    ]  # fmt: skip
    record = json.loads((tmp_path / "weights" / "person0.failed.json").read_text())
    assert record["step"] == 0 and record["loss"] == "nan" and record["group"] == ["person0", "person1"]
    assert "loss became nan" in record["error"]
    assert json.loads((tmp_path / "manifest.json").read_text())["failed"] == ["person0", "person1"]
    logged_losses = [json.loads(line) for line in (tmp_path / "losses.jsonl").read_text().splitlines()]
    assert [r["identity"] for r in logged_losses] == ["person2", "person3", "person4"]
    assert all(r["first_loss"] > 0 and r["last_loss"] > 0 for r in logged_losses)
    assert logged_losses[0]["first_loss"] != logged_losses[1]["first_loss"]  # each identity's own loss
    # the rest of the stage is unchanged by the failure: person4, alone in its group either way, as if fresh
    fresh = tmp_path / "fresh"
    preoptimize(build_tiny_pipeline("sd15"), people[4:], fresh, config)
    assert torch.equal(
        load_personal(fresh / "weights" / "person4.safetensors").B,
        load_personal(tmp_path / "weights" / "person4.safetensors").B,
    )

    again = preoptimize(pipe, people, tmp_path, config)  # a rerun leaves them out ...
    assert again["trained"] == 0 and again["failed_before"] == ["person0", "person1"]
    retried = preoptimize(pipe, people, tmp_path, dataclasses.replace(config, retry_failed=True))
    assert retried["trained"] == 2 and retried["failed"] == []  # ... until asked; then the records go
    assert not list((tmp_path / "weights").glob("*.failed.json"))
    assert json.loads((tmp_path / "manifest.json").read_text())["failed"] == []


def test_preoptimisation_shared_out_over_processes_writes_what_one_process_does(
    preoptimized, identity_folder, tiny_sd15_dir, tmp_path
):
    one, _ = preoptimized  # groups (astronaut, biden), (grace_hopper, obama)
    out = tmp_path / "two"
    args = ["preoptimize", "--images", identity_folder, "--out", out, "--base", tiny_sd15_dir, "--device", "cpu"]
    result = accelerate_launch(*args, "--steps", "6", "--group-size", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    # groups of two folder entries alternate (broken.jpg and landscape.jpg hold no face): process 0 trains
    # astronaut with biden, then obama; process 1 grace_hopper. The groups of one process: the same weights
    assert "process 0 of 2: 3 identities: 3 pre-optimised now" in result.stdout
    assert "process 1 of 2: 1 identities: 1 pre-optimised now" in result.stdout
    assert json.loads((out / "manifest.json").read_text()) == json.loads((one / "manifest.json").read_text())
    names = sorted(path.name for path in (one / "weights").iterdir())
    assert sorted(path.name for path in (out / "weights").iterdir()) == names
    for name in names:
        mine, theirs = load_personal(out / "weights" / name), load_personal(one / "weights" / name)
        assert torch.equal(mine.A, theirs.A) and torch.equal(mine.B, theirs.B), name
    # resumed by one process: only the missing identity is trained
    (out / "weights" / "obama.safetensors").unlink()
    again = hdb(*args, "--steps", "6", "--group-size", "2").stdout
    assert "4 identities: 1 pre-optimised now, 3 already done" in again
    assert torch.equal(
        load_personal(out / "weights" / "obama.safetensors").B, load_personal(one / "weights" / "obama.safetensors").B
    )


# Stage 1 in each of the processes `accelerate launch` starts, on random people (no face detection), the UNet
# of process argv[1] made to give NaN once: its first group diverges.
DIVERGE_IN_ONE_PROCESS = """
import sys
from pathlib import Path

import torch
from accelerate import PartialState
from PIL import Image

tests = Path(sys.argv[3])
sys.path[:0] = [str(tests), str(tests.parent)]  # the tests' helpers, and hdb from the checkout
from helpers import FailingUNet

from hdb.config import LiDBConfig, PreoptimizeConfig
from hdb.identities import Identity
from hdb.models import build_tiny_pipeline
from hdb.preoptimize import preoptimize

generator = torch.Generator().manual_seed(0)
people = [
    Identity(f"person{k}", [Image.fromarray(torch.randint(0, 256, (64, 64, 3), generator=generator,
             dtype=torch.uint8).numpy())])
    for k in range(5)
]
pipe = build_tiny_pipeline("sd15")
if PartialState(cpu=True).process_index == int(sys.argv[1]):
    FailingUNet(pipe, "nan")
config = PreoptimizeConfig(steps=3, group_size=2, lidb=LiDBConfig(a=8, b=4), progress=False)
summary = preoptimize(pipe, people, Path(sys.argv[2]), config)
print(f"process {summary['process']}: failed {summary['failed']}, trained {summary['trained']}")
"""


def test_a_group_diverging_in_one_of_two_processes_stops_neither(tmp_path):
    script = tmp_path / "diverge.py"
    script.write_text(DIVERGE_IN_ONE_PROCESS)
    # groups (person0, person1), (person2, person3), (person4): process 0 takes the first and the last
    result = accelerate_launch("1", tmp_path / "out", Path(__file__).parent, script=script)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "process 0: failed [], trained 3" in result.stdout
    assert "process 1: failed ['person2', 'person3'], trained 0" in result.stdout
    weights = sorted(path.name for path in (tmp_path / "out" / "weights").iterdir())
    assert weights == [
        "person0.safetensors", "person1.safetensors", "person2.failed.json",
        "person3.failed.json", "person4.safetensors",
    ]  # fmt: skip
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["failed"] == ["person2", "person3"]
    logged_losses = (tmp_path / "out" / "losses.jsonl").read_text().splitlines()
    assert sorted(json.loads(line)["identity"] for line in logged_losses) == ["person0", "person1", "person4"]


# Each of two processes checks a folder both see, then one that only the main process writes to.
SHARED_FOLDER_CHECK = """
import sys
from pathlib import Path

from accelerate import PartialState

sys.path.insert(0, sys.argv[2])  # hdb from the checkout
from hdb.errors import HdbError
from hdb.files import check_shared_folder

state, root = PartialState(cpu=True), Path(sys.argv[1])
check_shared_folder(state, root / "shared")
print(f"process {state.process_index}: shared, leaving {sorted(p.name for p in (root / 'shared').iterdir())}")
try:  # as if each node had its own disk: the other process looks in a folder of its own
    check_shared_folder(state, root / ("main" if state.is_main_process else f"local{state.process_index}"))
except HdbError as error:
    print(f"process {state.process_index}: refused: {error}")
state.wait_for_everyone()
state.destroy_process_group()  # both leave together: gloo aborts a process that exits while its peer still talks
"""


def test_every_process_must_see_the_output_folder(tmp_path):
    script = tmp_path / "check.py"
    script.write_text(SHARED_FOLDER_CHECK)
    result = accelerate_launch(tmp_path, Path(__file__).parent.parent, script=script)
    assert result.returncode == 0, result.stderr[-3000:]
    for process in (0, 1):  # the probe is gone again; both processes refuse the unshared folder, naming who is blind
        assert f"process {process}: shared, leaving []" in result.stdout
        assert f"process {process}: refused: {tmp_path / ('main' if process == 0 else 'local1')} is not shared by " \
               "every process: process 1 on " in result.stdout  # fmt: skip
    assert "process 0 on" not in result.stdout


def test_a_hugging_face_dataset_gives_identities_by_column_aligned_once(tiny_sd15_dir, tmp_path, monkeypatch):
    import datasets

    from hdb import faces
    from hdb.identities import identity_names, resolve_identities

    photos = [Image.open(ASSETS / name) for name in ("obama.jpg", "obama2.jpg", "biden.jpg", "landscape.jpg")]
    rows = {"image": photos, "person": ["Barack Obama", "Barack Obama", "Joe Biden", "nobody"]}
    datasets.Dataset.from_dict(rows).cast_column("image", datasets.Image()).save_to_disk(tmp_path / "data")
    by_person = DatasetSource(str(tmp_path / "data"), identity_column="person")
    assert identity_names(by_person) == ["Barack_Obama", "Joe_Biden", "nobody"]
    people, skipped = resolve_identities(by_person, 64, tmp_path / "faces", progress=False)
    assert [(p.name, len(p.faces)) for p in people] == [("Barack_Obama", 2), ("Joe_Biden", 1)]
    assert skipped == {"no face": 1}
    monkeypatch.setattr(faces, "align_face", None)  # aligned once: the second time reads the cached crops
    again, _ = resolve_identities(by_person, 64, tmp_path / "faces", progress=False, names={"Barack_Obama"})
    assert [p.name for p in again] == ["Barack_Obama"] and again[0].faces[1].size == (64, 64)
    monkeypatch.undo()
    assert identity_names(DatasetSource(str(tmp_path / "data"))) == ["row000000", "row000001", "row000002", "row000003"]
    with pytest.raises(HdbError, match="has no column 'who'; its columns: image, person"):
        identity_names(DatasetSource(str(tmp_path / "data"), identity_column="who"))
    with pytest.raises(HdbError, match="Could not load dataset"):
        identity_names(DatasetSource(str(tmp_path / "missing")))
    # the CLI's --dataset reaches stage 1 (faces from the cache above)
    out = hdb(
        "preoptimize", "--dataset", tmp_path / "data", "--identity-column", "person", "--out", tmp_path,
        "--base", tiny_sd15_dir, "--steps", "1", "--resolution", "64",
    ).stdout  # fmt: skip
    assert "2 identities: 2 pre-optimised now" in out
    assert sorted(p.name for p in (tmp_path / "weights").iterdir()) == [
        "Barack_Obama.safetensors",
        "Joe_Biden.safetensors",
    ]


def test_the_face_cache_recovers_from_broken_files_and_remembers_photos_without_a_face(tmp_path, monkeypatch):
    from hdb import faces
    from hdb.identities import load_identities

    folder, cache = tmp_path / "photos", tmp_path / "faces"
    folder.mkdir()
    shutil.copy(ASSETS / "obama.jpg", folder / "obama.jpg")
    shutil.copy(ASSETS / "landscape.jpg", folder / "landscape.jpg")  # no face
    detected = []

    def counting_align_face(source, size):
        detected.append(Path(source).name)
        return align_face(source, size=size)

    align_face = faces.align_face
    monkeypatch.setattr(faces, "align_face", counting_align_face)

    def load() -> list[Image.Image]:
        people, skipped = load_identities(folder, 64, cache, progress=False)
        assert [p.name for p in people] == ["obama"] and skipped == {"no face": 1}
        return people[0].faces

    first = load()
    again = load()  # the crop from its PNG, the landscape known to hold no face: nothing detected again
    assert sorted(detected) == ["landscape.jpg", "obama.jpg"]
    assert list(again[0].getdata()) == list(first[0].getdata())
    crop = cache / "obama" / "obama_64.png"
    crop.write_bytes(crop.read_bytes()[: crop.stat().st_size // 2])  # a copy cut short
    assert list(load()[0].getdata()) == list(first[0].getdata())  # aligned again, not a crash
    assert Image.open(crop).convert("RGB").size == (64, 64)  # and written again whole
    crop.unlink()
    stale = crop.with_name(crop.name + ".partial")  # what a run killed while writing the crop leaves
    stale.write_bytes(b"half a png")
    load()
    assert crop.is_file() and not stale.exists()
    assert sorted(detected) == ["landscape.jpg", "obama.jpg", "obama.jpg", "obama.jpg"]


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


def write_script(folder: Path, text: str) -> Path:
    script = folder / "script.py"
    script.write_text(text)
    return script


# Runs `hdb train` in a process that kills itself (SIGKILL: no cleanup) right after the checkpoint of a
# given step is written: a kill at a known point, not a race with a polling loop.
KILL_AFTER_CHECKPOINT = """
import os, signal, sys
import hdb.train_hypernet as stage

save, kill_after = stage._save_checkpoint, int(sys.argv[1])

def save_then_die(out, step, *args):
    save(out, step, *args)
    if step == kill_after:
        os.kill(os.getpid(), signal.SIGKILL)

stage._save_checkpoint = save_then_die
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


def random_people(count: int, size: int = 64) -> list[Identity]:
    """Prepared identities of random pixels: no face detection, for tests of the training plumbing."""
    generator = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (size, size, 3), generator=generator, dtype=torch.uint8) for _ in range(count)]
    return [Identity(f"person{k}", [Image.fromarray(image.numpy())]) for k, image in enumerate(images)]


def tiny_stage2(**overrides) -> HypernetTrainConfig:
    values = dict(steps=2, batch_size=2, image_encoder="tiny", width=32, depth=2, heads=4, sample_steps=0)
    return HypernetTrainConfig(**{**values, "progress": False, **overrides})


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
            weight_loss="paper", decoder_input="concatenated")  # fmt: skip
    refused("identities: {'trained': 2, ", people=people)  # another identity list
    refused("identities: ", people=people[1:] + people[:1])  # the same count, others held out
    # what does not change the steps still to run may change: this resume goes on (with nothing left to do)
    again = train_hypernetwork(pipe, people[:3], out, None, dataclasses.replace(config, validate_every=5,
                               checkpoints_total_limit=1), device="cpu")  # fmt: skip
    assert again["start_step"] == 3 and again["losses"] == []
    state = json.loads((out / "checkpoints" / "checkpoint-2" / "state.json").read_text())
    assert state["step"] == 2 and state["settings"]["learning_rate"] == 1e-4
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
    A, B = lidb.initial_weights(2)
    lidb.use_per_sample(A, B)  # as training leaves it between steps
    shared = lidb.A_train.detach().clone(), lidb.B_train.detach().clone()
    prediction = torch.ones_like(lidb.A_train), torch.ones_like(lidb.B_train)  # to sample
    with pytest.raises(RuntimeError, match="sampling failed"), lidb.holding(*prediction), _in_eval_mode(unet):
        assert not unet.training and torch.equal(lidb.A_train, prediction[0]) and lidb.uses_shared
        raise RuntimeError("sampling failed")
    assert unet.training and lidb.source.A is A and lidb.source.B is B
    assert torch.equal(lidb.A_train, shared[0]) and torch.equal(lidb.B_train, shared[1])
    lidb.unload()


# ----------------------------------------------------------------------------- the learning-rate schedule


def test_warmup_then_cosine_or_constant():
    cosine = TrainConfig(steps=12, learning_rate=1.0, warmup_steps=4, lr_schedule="cosine")
    assert [learning_rate_factor(step, cosine) for step in (0, 1, 3, 4, 8)] == [0.25, 0.5, 1.0, 1.0, 0.5]
    assert 0 < learning_rate_factor(11, cosine) < 0.05  # near 0 by the last step
    constant = TrainConfig(steps=12, learning_rate=1.0, warmup_steps=2)
    assert [learning_rate_factor(step, constant) for step in (0, 1, 2, 11)] == [0.5, 1.0, 1.0, 1.0]
    with pytest.raises(HdbError, match="Unknown learning-rate schedule 'linear'"):
        train(
            [torch.nn.Parameter(torch.ones(1))], lambda step: torch.ones(()), TrainConfig(1, 0.1, lr_schedule="linear")
        )


def test_a_resumed_run_applies_exactly_the_learning_rates_of_an_uninterrupted_one(tmp_path):
    config = TrainConfig(steps=10, learning_rate=0.1, warmup_steps=3, lr_schedule="cosine", progress=False)

    class Killed(Exception):
        pass

    def run(weight, optimizer, rates, start_step=0, kill_at=None):
        def loss_fn(step):
            if step == kill_at:
                raise Killed
            rates.append(optimizer.param_groups[0]["lr"])  # the rate this step is applied with
            return ((weight - torch.arange(3.0)) ** 2).sum()

        train([weight], loss_fn, config, optimizer=optimizer, start_step=start_step)

    straight, straight_rates = torch.nn.Parameter(torch.zeros(3)), []
    run(straight, make_optimizer([straight], "adamw", 0.1), straight_rates)
    assert straight_rates == [0.1 * learning_rate_factor(step, config) for step in range(10)]

    killed, rates = torch.nn.Parameter(torch.zeros(3)), []
    optimizer = make_optimizer([killed], "adamw", 0.1)
    with pytest.raises(Killed):
        run(killed, optimizer, rates, kill_at=6)  # steps 0..5 done, as in a checkpoint of step 5
    save_optimizer(optimizer, tmp_path / "optimizer.safetensors")
    resumed = torch.nn.Parameter(killed.detach().clone())
    optimizer = make_optimizer([resumed], "adamw", 0.1)  # a fresh process: a fresh optimizer, then its checkpoint
    load_optimizer(optimizer, tmp_path / "optimizer.safetensors")
    run(resumed, optimizer, rates, start_step=6)
    assert rates == straight_rates
    assert torch.equal(resumed.detach(), straight.detach())


@pytest.mark.parametrize("start_step", [0, 2])
def test_on_step_sees_the_weights_after_that_steps_update(start_step):
    """The snapshot steps (every `snapshot_every` from `start_step`) are read at once, the others one step late;
    either way a checkpoint written in `on_step(step)` must hold step `step`'s update, or resuming skips it."""
    weight = torch.nn.Parameter(torch.zeros(3))
    started_from, seen_in_on_step = {}, {}

    def loss_fn(step):
        started_from[step] = weight.detach().clone()
        return ((weight - torch.arange(3.0)) ** 2).sum()

    config = TrainConfig(steps=8, learning_rate=0.1, snapshot_every=3, progress=False)
    train([weight], loss_fn, config, lambda step, loss: seen_in_on_step.update({step: weight.detach().clone()}),
          start_step=start_step)  # fmt: skip
    after_update = {step: started_from[step + 1] for step in range(start_step, 7)} | {7: weight.detach()}
    assert sorted(seen_in_on_step) == list(range(start_step, 8))
    for step, seen in seen_in_on_step.items():
        assert torch.equal(seen, after_update[step]), step


def test_a_run_killed_after_a_snapshot_steps_checkpoint_resumes_exactly(tmp_path, monkeypatch):
    """Step 0 is a snapshot step of the first run, step 1 of the resumed one: both checkpoint (every step) and
    validate there, and the resumed run must log what an uninterrupted one does."""
    import hdb.train_hypernet as stage

    pipe, people = build_tiny_pipeline("sd15"), random_people(3)
    config = tiny_stage2(steps=4, beta=0.0, checkpoint_every=1, validate_every=1)
    train_hypernetwork(pipe, people, tmp_path / "straight", None, config, device="cpu")

    class Killed(Exception):
        pass

    save = stage._save_checkpoint

    def save_then_die(out, step, *args):
        save(out, step, *args)
        if step == 0:
            raise Killed

    monkeypatch.setattr(stage, "_save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        train_hypernetwork(pipe, people, tmp_path / "killed", None, config, device="cpu")
    monkeypatch.undo()
    resumed = train_hypernetwork(pipe, people, tmp_path / "killed", None, config, device="cpu")
    assert resumed["start_step"] == 1
    straight, killed = logged(tmp_path / "straight"), logged(tmp_path / "killed")
    assert [r["step"] for r in killed] == [0, 1, 2, 3]
    for a, b in zip(straight, killed, strict=True):
        for name in ("loss", "validation_loss"):
            assert abs(a[name] - b[name]) < 1e-6, (name, a, b)


# ----------------------------------------------------------------------------- the divergence guard


@pytest.mark.parametrize(("every", "kept"), [(1, 2), (4, 0), (2, 2)])
def test_nan_restores_the_latest_snapshot_exactly(every, kept):
    weight = torch.nn.Parameter(torch.ones(3))
    seen = []

    def loss_fn(step):
        seen.append(weight.detach().clone())  # the weights step `step` starts from
        return (weight.sum() * (float("nan") if step == 3 else 1.0)) ** 2

    config = TrainConfig(steps=10, learning_rate=0.1, progress=False, snapshot_every=every)
    with pytest.raises(TrainingDiverged, match=f"at step 3.*kept the weights of step {kept}"):
        train([weight], loss_fn, config)
    # the weights of the newest snapshot whose loss passed, not the NaN-producing ones
    assert torch.equal(weight.detach(), seen[kept]) and not torch.equal(seen[kept], seen[3])
    assert weight.grad is None  # the failed step's NaN gradients are not left for the next user


def test_training_stops_when_the_loss_explodes():
    weight = torch.nn.Parameter(torch.ones(2))
    losses = iter([1.0, 1.1, 500.0])

    def loss_fn(step):
        return weight.sum() * 0 + next(losses)

    with pytest.raises(TrainingDiverged, match="loss became 500"):
        train([weight], loss_fn, TrainConfig(steps=3, learning_rate=0.1, progress=False))


def test_a_first_step_at_high_noise_does_not_stop_healthy_training():
    # one sample a step: a first draw near t=1000 has a tiny loss, a later one near t=0 a ~200x larger one
    weight = torch.nn.Parameter(torch.ones(2))
    losses = iter([0.002, 0.45, 0.01, 0.6, 0.003])

    def loss_fn(step):
        return weight.sum() * 0 + next(losses)

    assert len(train([weight], loss_fn, TrainConfig(steps=5, learning_rate=0.1, progress=False)).losses) == 5


def _overflowing_loss(weight, overflow_at):
    """A finite loss whose gradient is infinite at the steps in `overflow_at`, as an fp16 overflow makes it."""

    def loss_fn(step):
        used = weight * 1  # a fresh tensor each step, so the hook below touches this step's gradient only
        if step in overflow_at:
            used.register_hook(lambda grad: grad * float("inf"))
        return (used**2).sum()

    return loss_fn


def test_fp16_overflow_steps_are_skipped_by_the_scaler_and_counted():
    weight = torch.nn.Parameter(torch.ones(3))
    config = TrainConfig(steps=8, learning_rate=0.1, fp16_loss_scaling=True, progress=False, snapshot_every=3)
    result = train([weight], _overflowing_loss(weight, {2, 5}), config)
    assert result.skipped_steps == [2, 5] and len(result.losses) == 8
    assert torch.isfinite(weight).all() and weight.sum() < 3  # trained, and the overflow steps left no trace


def test_fp16_overflow_under_accelerate_is_skipped_not_divergence():
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    # accelerate builds its scaler for fp16 on GPUs only; hand it one, as `mixed_precision="fp16"` does there
    accelerator.scaler = torch.amp.GradScaler("cpu")
    model = torch.nn.Linear(3, 1, bias=False)
    model, optimizer = accelerator.prepare(model, torch.optim.AdamW(model.parameters(), lr=0.1))
    weight = model.weight
    config = TrainConfig(steps=6, learning_rate=0.1, progress=False)
    result = train([weight], _overflowing_loss(weight, {1, 4}), config, optimizer=optimizer, accelerator=accelerator)
    assert result.skipped_steps == [1, 4] and torch.isfinite(weight).all()


def test_gradients_that_always_overflow_still_stop_training():
    weight = torch.nn.Parameter(torch.ones(3))
    config = TrainConfig(steps=40, learning_rate=0.1, fp16_loss_scaling=True, progress=False, max_skips_in_a_row=5)
    with pytest.raises(TrainingDiverged, match="gradients became NaN/inf at step 6"):
        train([weight], _overflowing_loss(weight, set(range(2, 40))), config)
    assert torch.isfinite(weight).all()


def test_an_infinite_gradient_without_loss_scaling_stops_at_once():
    weight = torch.nn.Parameter(torch.ones(3))
    with pytest.raises(TrainingDiverged, match="at step 1"):
        train([weight], _overflowing_loss(weight, {1}), TrainConfig(steps=4, learning_rate=0.1, progress=False))


def test_the_snapshot_goes_to_host_memory_for_large_trainables(monkeypatch):
    from hdb import training

    small = [torch.nn.Parameter(torch.ones(4))]
    assert not training._Snapshot(small, "auto", 0).on_host
    monkeypatch.setattr(training, "SNAPSHOT_ON_DEVICE_BYTES", 8)  # 4 floats are now "large"
    snapshot = training._Snapshot(small, "auto", 0)
    assert snapshot.on_host and snapshot.values[0].device.type == "cpu"
    assert training._Snapshot(small, "device", 0).on_host is False
    with pytest.raises(HdbError, match="Unknown snapshot place 'gpu'"):
        training._Snapshot(small, "gpu", 0)


# ----------------------------------------------------------------------------- a failed stage leaves the pipeline clean


def pipeline_state(pipe):
    modules = {"unet": pipe.unet, "text_encoder": pipe.text_encoder, "vae": pipe.vae}
    return {
        "training": {name: m.training for name, m in modules.items()},
        "checkpointing": (pipe.unet.is_gradient_checkpointing, pipe.text_encoder.is_activation_checkpointing),
        "requires_grad": {name: [p.requires_grad for p in m.parameters()] for name, m in modules.items()},
        "lidb_layers": len(find_target_linears({"unet": pipe.unet, "text_encoder": pipe.text_encoder})),
    }


@pytest.mark.parametrize("failure", ["nan", "oom"])
def test_a_failed_personalisation_leaves_the_pipeline_as_it_was(obama_face, failure):
    pipe = build_tiny_pipeline("sd15")
    pipe.unet.eval()
    before = pipeline_state(pipe)
    config = PersonalizeConfig(steps=3, gradient_checkpointing=True, progress=False)
    FailingUNet(pipe, failure)
    expected = {"nan": "loss became nan", "oom": "ran out of memory while finetuning.*gradient_checkpointing=True"}[
        failure
    ]
    personal = PersonalPipeline(pipe)
    with pytest.raises(HdbError, match=expected):
        personal.personalize(obama_face, config)
    assert personal.person is None and not personal.lidb.B_train.any()  # nobody held: not a half-trained person
    personal.unload()
    assert pipeline_state(pipe) == before  # modes, checkpointing and frozen flags restored, its LiDB taken off


def test_after_a_failed_visitor_the_next_personalisation_is_exactly_a_fresh_one(obama_face):
    config = PersonalizeConfig(steps=4, progress=False)
    fresh = PersonalPipeline(build_tiny_pipeline("sd15")).personalize(obama_face, config).weights
    pipe = build_tiny_pipeline("sd15")
    personal = PersonalPipeline(pipe)  # one LiDB serving every visitor, as in the app
    FailingUNet(pipe, "nan")
    with pytest.raises(TrainingDiverged):
        personal.personalize(obama_face, config)
    assert all(p.grad is None for p in personal.lidb.trainable_parameters())
    again = personal.personalize(obama_face, config).weights
    torch.testing.assert_close(again.A, fresh.A, rtol=0, atol=0)
    torch.testing.assert_close(again.B, fresh.B, rtol=0, atol=0)


def test_a_failed_preoptimisation_then_a_personalisation_works(obama_face, tmp_path):
    from hdb.identities import Identity

    pipe = build_tiny_pipeline("sd15")
    pipe.unet.eval()
    before = pipeline_state(pipe)
    people = [Identity("a", [obama_face.image]), Identity("b", [ImageOps.mirror(obama_face.image)])]
    FailingUNet(pipe, "nan")
    config = PreoptimizeConfig(steps=3, gradient_checkpointing=True, progress=False)
    assert preoptimize(pipe, people, tmp_path, config)["failed"] == ["a", "b"]  # one group: both given up on
    assert pipeline_state(pipe) == before
    result = PersonalPipeline(pipe).personalize(obama_face, PersonalizeConfig(steps=2, progress=False))
    assert len(result.losses) == 2


# ----------------------------------------------------------------------------- the step recipe and explicit state


def test_each_sample_draws_the_same_noise_whatever_its_batch():
    latents = torch.zeros(3, 4, 8, 8)
    seeds = [sample_seed(0, name, 7) for name in ("ann", "bob", "cy")]
    noise, timesteps = draw_noise(latents, seeds, 1000)
    for k, seed in enumerate(seeds):
        alone_noise, alone_timestep = draw_noise(latents[k : k + 1], [seed], 1000)
        assert torch.equal(noise[k], alone_noise[0]) and timesteps[k] == alone_timestep[0]
    assert not torch.equal(noise[0], noise[1])
    assert sample_seed(0, "ann", 7) == sample_seed(0, "ann", 7) != sample_seed(0, "ann", 8)


def test_library_calls_change_no_process_setting_and_no_hidden_state(obama_face):
    from hdb.generate import generate

    pipe = build_tiny_pipeline("sd15")
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        personal = PersonalPipeline(pipe)
        assert torch.get_num_threads() == 2  # attaching LiDB leaves the thread count alone
    finally:
        torch.set_num_threads(threads)
    scheduler = pipe.scheduler
    generate(pipe, personal.lidb, "a photo of sks person", steps=2)
    assert pipe.scheduler is scheduler  # sampling borrows DPM-Solver and gives the scheduler back
    with pytest.raises(HdbError, match="PersonalizeConfig.lidb does not fit.*aux seed 3"):
        personal.personalize(obama_face, PersonalizeConfig(steps=1, lidb=LiDBConfig(seed=3)))
    with pytest.raises(HdbError, match="already attached"):
        PersonalPipeline(pipe)  # a second LiDB on the same pipeline


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
    assert own["weight_loss"].item() == 0 and swapped["weight_loss"].item() > 0.5


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

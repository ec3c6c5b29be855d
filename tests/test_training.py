"""Training: stage 1 (DDP, restarts, the face cache), the shared loop (schedule, divergence guard), the scaffold."""

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import ASSETS, FailingUNet, accelerate_launch, logged, random_people, tiny_stage2
from helpers import hdb_cli as hdb
from PIL import Image, ImageOps

from hdb.config import (
    DatasetSource,
    LiDBConfig,
    PersonalizeConfig,
    PreoptimizeConfig,
)
from hdb.diffusion import draw_noise, sample_seed
from hdb.errors import HdbError
from hdb.families import family_of
from hdb.identities import Identity
from hdb.lidb import find_target_linears
from hdb.models import build_tiny_pipeline
from hdb.personal_file import load_personal
from hdb.pipeline import PersonalPipeline
from hdb.preoptimize import preoptimize
from hdb.train_hypernet import train_hypernetwork
from hdb.training import (
    TrainConfig,
    TrainingDiverged,
    learning_rate_factor,
    load_optimizer,
    make_optimizer,
    save_optimizer,
    train,
)


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
    import hdb.checkpoints as checkpoints

    pipe, people = build_tiny_pipeline("sd15"), random_people(3)
    config = tiny_stage2(steps=4, beta=0.0, checkpoint_every=1, validate_every=1)
    train_hypernetwork(pipe, people, tmp_path / "straight", None, config, device="cpu")

    class Killed(Exception):
        pass

    save = checkpoints.save_checkpoint

    def save_then_die(out, step, *args):
        save(out, step, *args)
        if step == 0:
            raise Killed

    monkeypatch.setattr(checkpoints, "save_checkpoint", save_then_die)
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
        "lidb_layers": len(find_target_linears(family_of(pipe).lidb_components(pipe))),
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

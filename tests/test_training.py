"""Stages 1 and 2 on the tiny pipeline: pre-optimisation, hypernetwork training, DDP, resume, bad data."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import assert_one_line_error
from helpers import hdb_cli as hdb
from safetensors.torch import load_file

from hdb.personal_file import load_personal

ASSETS = Path(__file__).parent.parent / "assets"
TINY_HYPERNET = ["--width", "32", "--depth", "2", "--heads", "4", "--device", "cpu"]


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


def test_two_processes_match_one_and_checkpoint_once(preoptimized, identity_folder, tiny_sd15_dir, tmp_path):
    weights, _ = preoptimized
    single = hdb(*train_args(identity_folder, tiny_sd15_dir, weights, tmp_path / "one")).stdout
    assert "on 1 process(es)" in single
    # torchrun-style launch of 2 processes; `--device cpu` makes them a gloo (CPU) DDP group
    accelerate = Path(sys.executable).parent / "accelerate"
    launch = [
        str(accelerate),
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "hdb",
    ]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [*launch, *map(str, train_args(identity_folder, tiny_sd15_dir, weights, tmp_path / "two"))],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("on 2 process(es)") == 1  # summary from the main process only
    one, two = logged(tmp_path / "one"), logged(tmp_path / "two")
    assert [r["step"] for r in two] == [0, 1, 2, 3]  # written once, not once per process
    for a, b in zip(one, two):
        assert abs(a["loss"] - b["loss"]) < 1e-4
    checkpoints = sorted(p.name for p in (tmp_path / "two" / "checkpoints").iterdir())
    assert checkpoints == ["checkpoint-3", "latest"]
    samples = sorted(p.name for p in (tmp_path / "two" / "samples").iterdir())  # validation images of a held-out face
    assert samples == ["step-000001.png", "step-000003.png"]
    assert list((tmp_path / "two").glob("hdb/events.out.tfevents.*"))  # TensorBoard log
    final_one = load_file(str(tmp_path / "one" / "hypernet" / "hypernet.safetensors"))
    final_two = load_file(str(tmp_path / "two" / "hypernet" / "hypernet.safetensors"))
    for key in final_one:
        torch.testing.assert_close(final_two[key], final_one[key], atol=1e-5, rtol=1e-4)


def test_resume_after_a_kill_continues_the_same_loss_curve(preoptimized, identity_folder, tiny_sd15_dir, tmp_path):
    weights, _ = preoptimized
    hdb(*train_args(identity_folder, tiny_sd15_dir, weights, tmp_path / "straight", steps=8))
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    args = [
        sys.executable,
        "-m",
        "hdb",
        *map(str, train_args(identity_folder, tiny_sd15_dir, weights, tmp_path / "killed", steps=8)),
    ]
    process = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = tmp_path / "killed" / "checkpoints" / "latest"
    deadline = time.time() + 300
    while not latest.exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert latest.exists(), "no checkpoint was written before the kill"
    checkpoint_step = json.loads((latest.parent / latest.read_text() / "state.json").read_text())["step"]
    assert checkpoint_step < 7, "the run finished before it could be killed"
    resumed = hdb(*train_args(identity_folder, tiny_sd15_dir, weights, tmp_path / "killed", steps=8)).stdout
    assert f"steps {checkpoint_step + 1}..7" in resumed
    straight, killed = logged(tmp_path / "straight"), logged(tmp_path / "killed")
    assert [r["step"] for r in killed] == list(range(8))
    for a, b in zip(straight, killed):
        assert abs(a["loss"] - b["loss"]) < 1e-6, (a, b)


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
    hdb("tiny-model", tmp_path / "sdxl", "--arch", "sdxl")
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
    assert_one_line_error(result, "different base model architecture")
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

"""Small helpers shared by the tests."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from PIL import Image

from hdb.config import DecoderConfig, HypernetTrainConfig
from hdb.diffusion import encode_prompts, predict_noise
from hdb.identities import Identity
from hdb.lidb import LiDB, LiDBConfig

ASSETS = Path(__file__).resolve().parent.parent / "assets"  # real photos (see assets/SOURCES.md)
PROMPTS = ["a sks face", "a painting of a dog"]


def forward(pipe, prompts=PROMPTS, seed=0):
    """Text conditioning and the denoiser's prediction for a fixed batch."""
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(len(prompts), pipe.vae.config.latent_channels, 8, 8, generator=generator)
    timesteps = torch.tensor([10, 700, 300, 999][: len(prompts)])
    cond = encode_prompts(pipe, prompts)
    return cond, predict_noise(pipe, latents, timesteps, cond)


def trained_person(pipe, seed: int = 0, config: LiDBConfig | None = None, lora_rank: int = 0) -> LiDB:
    """Attach LiDB with random non-zero weights, standing in for a trained person (with a plain LoRA on top
    when `lora_rank` > 0, as the paper's rank relaxation leaves one)."""
    lidb = LiDB(pipe, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        lidb.A_train.copy_(torch.randn(lidb.A_train.shape, generator=generator) * 0.1)
        lidb.B_train.copy_(torch.randn(lidb.B_train.shape, generator=generator) * 0.3)
        if lora_rank:
            lidb.add_lora(lora_rank, generator)
            for up in lidb.plain_lora().ups:
                up.copy_(torch.randn(up.shape, generator=generator) * 0.05)
    return lidb


def hdb_cli(*args, check=True):
    """Run the CLI in a fresh process, offline, and return the finished process."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1")
    result = subprocess.run(
        [sys.executable, "-m", "hdb", *map(str, args)], capture_output=True, text=True, env=env, timeout=300
    )
    if check and result.returncode != 0:
        raise AssertionError(f"hdb {args} failed:\n{result.stderr}")
    return result


def hdb_in_process(capsys, *args) -> subprocess.CompletedProcess:
    """The CLI's `main` in this process, as `hdb_cli` reports a run: where a refusal is what is tested, this spares
    a process start (seconds of imports each); a test keeps one fresh-process run for the exit code itself."""
    from hdb import cli

    try:
        returncode = cli.main([str(arg) for arg in args])
    except SystemExit as exit:  # argparse's refusals
        returncode = exit.code
    output = capsys.readouterr()
    return subprocess.CompletedProcess(args, returncode, output.out, output.err)


def refused(*args, fragment: str, code: int = 1, capsys=None, base: bool = True):
    """The CLI refuses, in one line, before loading a model: in a fresh process, or (`capsys` given) in this one."""
    args = [*args, *(["--base", "/no/such/base"] if base else [])]  # a model loaded would be named
    result = hdb_cli(*args, check=False) if capsys is None else hdb_in_process(capsys, *args)
    assert result.returncode == code and "Traceback" not in result.stderr, result.stderr
    assert fragment in result.stderr and "no/such/base" not in result.stderr, result.stderr
    assert sum("error:" in line for line in result.stderr.splitlines()) == 1, result.stderr  # after argparse's usage
    return result


def assert_one_line_error(result, *fragments):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in error_lines[0]


class FailingUNet:
    """Makes the UNet's next forward pass fail: NaN output, or a (simulated) CUDA out-of-memory."""

    def __init__(self, pipe, failure: str) -> None:
        self.failure = failure
        self.handle = pipe.unet.register_forward_hook(self.hook)

    def hook(self, module, inputs, output):
        self.handle.remove()  # one failure, then the model is healthy again
        if self.failure == "oom":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        output.sample = output.sample * float("nan")
        return output


def free_port() -> int:
    """A TCP port free on this machine now, for a test's server."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app(tmp_path, port: int, **env: str) -> subprocess.Popen:
    """`python app.py --tiny` in a fresh process, its temporary files under `tmp_path` (TMPDIR), offline."""
    environment = dict(os.environ, TMPDIR=str(tmp_path), HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False", **env)
    command = [sys.executable, "app.py", "--tiny", "--device", "cpu", "--port", str(port)]
    root = Path(__file__).resolve().parent.parent
    return subprocess.Popen(command, cwd=root, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def client_of(server: subprocess.Popen, port: int, timeout: float = 180):
    """A gradio_client Client of the app `server` started, once it answers (its stderr if it died instead)."""
    import time

    from gradio_client import Client

    deadline = time.time() + timeout
    while True:
        try:
            return Client(f"http://127.0.0.1:{port}/", verbose=False)
        except Exception:
            assert server.poll() is None and time.time() < deadline, server.stderr.read().decode()[-2000:]
            time.sleep(1)


# ----------------------------------------------------------------------------- training (stages 1 and 2)

TINY_HYPERNET = ["--image-encoder", "tiny", "--width", "32", "--depth", "2", "--heads", "4", "--device", "cpu"]


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


def write_script(folder: Path, text: str) -> Path:
    script = folder / "script.py"
    script.write_text(text)
    return script


def random_people(count: int, size: int = 64) -> list[Identity]:
    """Prepared identities of random pixels: no face detection, for tests of the training plumbing."""
    generator = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (size, size, 3), generator=generator, dtype=torch.uint8) for _ in range(count)]
    return [Identity(f"person{k}", [Image.fromarray(image.numpy())]) for k, image in enumerate(images)]


TINY_DECODER = DecoderConfig(width=32, depth=2, heads=4)  # a hypernetwork's decoder small enough for tests


def tiny_stage2(**overrides) -> HypernetTrainConfig:
    values = dict(steps=2, batch_size=2, image_encoder="tiny", decoder=TINY_DECODER, sample_steps=0)
    return HypernetTrainConfig(**{**values, "progress": False, **overrides})

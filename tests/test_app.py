"""The Gradio demo, served for real on the tiny pipeline: driven by gradio_client and by headless Chromium."""

import json
import logging
import os
import re
import shutil
import signal
import threading
import time
import types
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from gradio_client import Client, handle_file
from helpers import ASSETS, FailingUNet, client_of, free_port, start_app
from PIL import Image

from hdb.personal_file import load_personal

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def engine():
    from hdb.app.engine import Engine
    from hdb.app.main import parse_args

    return Engine(parse_args(["--tiny", "--device", "cpu"]))


@pytest.fixture(scope="module")
def visitor_files(tmp_path_factory):
    from hdb.app.visitors import VisitorFiles

    return VisitorFiles(tmp_path_factory.mktemp("visitors"))


@pytest.fixture(scope="module")
def app_url(engine, visitor_files):
    from hdb.app.page import build_demo, serve

    with pytest.MonkeyPatch.context() as patch:  # as `app.main` does: Gradio's cache inside the app's folder
        patch.setenv("GRADIO_TEMP_DIR", str(visitor_files.gradio_cache))  # read on every upload: keep it set
        demo = build_demo(engine, visitor_files)
        _, url, _ = serve(demo, visitor_files, "127.0.0.1", free_port(), prevent_thread_lock=True, quiet=True)
        yield url
        demo.close()


def personalize(client: Client, photo: Path, steps: int = 3, more: list[Path] = ()):
    more_photos = [handle_file(str(p)) for p in more] or None
    return client.predict(handle_file(str(photo)), True, steps, more_photos, api_name="/personalize")


def generate(client: Client, prompt: str = "[V] as an astronaut", seed: int = 1, count: int = 2, captions=None):
    # prompt, style, negative, strength, steps, guidance, seed, random seed, size, images -> gallery, seed used
    inputs = (prompt, "Oil painting", "", 1.0, 3, 7.5, seed, False, "Square", count)
    gallery, used_seed = client.predict(*inputs, api_name="/generate")
    assert used_seed == seed
    if captions is not None:
        captions.extend(item["caption"] for item in gallery)
    return [np.asarray(Image.open(item["image"])) for item in gallery]


def test_client_personalises_generates_and_downloads(app_url):
    client = Client(app_url, verbose=False)
    crop, status, files = personalize(client, ASSETS / "obama.jpg")
    assert Image.open(crop).size == (256, 256)  # at least 256 px, whatever the model's native size
    assert "Personalised" in status and "from zero" in status
    names = sorted(Path(f).name for f in files)
    assert names == ["person.safetensors", "person_lora_diffusers.safetensors", "person_lora_kohya.safetensors"]
    person = load_personal(next(f for f in files if Path(f).name == "person.safetensors"))
    assert person.num_numbers > 0 and person.config.rank + person.lora_rank == 1 + 4  # the paper's relaxation
    images = generate(client)
    assert len(images) == 2 and images[0].shape == (64, 64, 3)


def test_clear_messages_for_bad_photos(app_url, tmp_path):
    client = Client(app_url, verbose=False)
    (tmp_path / "notes.png").write_text("this is not a picture")
    with pytest.raises(Exception, match="not an image"):
        personalize(client, tmp_path / "notes.png")
    with pytest.raises(Exception, match="No face found"):
        personalize(client, ASSETS / "landscape.jpg")
    with pytest.raises(Exception, match="right to use this photo"):
        client.predict(handle_file(str(ASSETS / "obama.jpg")), False, 3, None, api_name="/personalize")
    with pytest.raises(Exception, match="Personalise a photo first"):
        generate(client)


def test_two_clients_do_not_see_each_other(app_url):
    alice, bob = Client(app_url, verbose=False), Client(app_url, verbose=False)
    _, _, alice_files = personalize(alice, ASSETS / "obama.jpg")
    alice_before = generate(alice, seed=5)
    with pytest.raises(Exception, match="Personalise a photo first"):
        generate(bob)  # Bob has no person yet: Alice's is not visible to him
    _, _, bob_files = personalize(bob, ASSETS / "grace_hopper.jpg")
    bob_images = generate(bob, seed=5)
    alice_after = generate(alice, seed=5)
    assert all(np.array_equal(a, b) for a, b in zip(alice_before, alice_after, strict=True))  # still Alice's person
    assert not np.array_equal(alice_after[0], bob_images[0])
    alice_person = [f for f in alice_files if Path(f).name == "person.safetensors"][0]
    bob_person = [f for f in bob_files if Path(f).name == "person.safetensors"][0]
    alice_lora, bob_lora = load_personal(alice_person).lora_up, load_personal(bob_person).lora_up  # what trained
    assert not all(torch.equal(a, b) for a, b in zip(alice_lora, bob_lora, strict=True))


def test_upload_a_saved_person_skips_personalisation(app_url, tmp_path):
    first = Client(app_url, verbose=False)
    _, _, files = personalize(first, ASSETS / "obama.jpg")
    person = [f for f in files if Path(f).name == "person.safetensors"][0]
    reference = generate(first, seed=9)
    second = Client(app_url, verbose=False)
    status, _ = second.predict(handle_file(person), api_name="/upload_person")  # the session State is not in the API
    assert "Loaded a saved person" in status
    assert all(np.array_equal(a, b) for a, b in zip(reference, generate(second, seed=9), strict=True))
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(Exception, match="truncated or corrupt"):
        second.predict(handle_file(str(tmp_path / "bad.safetensors")), api_name="/upload_person")


def test_real_browser_flow(app_url, visitor_files, tmp_path):
    assert CHROMIUM, "Debian's chromium is needed (apt-get install chromium; .ci/run installs it)"
    from playwright.sync_api import expect, sync_playwright

    args = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--disable-quic",
    ]
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=args)
        page = browser.new_page(viewport={"width": 1280, "height": 800})  # a laptop screen
        sessions_before = set(visitor_files.sessions.glob("*"))
        photo = tmp_path / "my_own_photo.jpg"  # a visitor's photo (examples are shared, and stay)
        shutil.copy(ASSETS / "obama.jpg", photo)
        page.goto(app_url)
        page.locator("#photo input[type=file]").set_input_files(str(photo))
        expect(page.locator("#status")).to_contain_text("Face found and aligned", timeout=60_000)
        page.locator("#consent input[type=checkbox]").check()
        page.locator("#personalize").click()
        expect(page.locator("#cpu-estimate")).to_contain_text("about")  # an estimate before any long work
        expect(page.locator("#status")).to_contain_text("Personalised", timeout=120_000)
        # one click: the first pictures follow the personalisation, captioned with their seed and identity score,
        # and they are in view without scrolling
        expect(page.locator("#gallery img")).to_have_count(2, timeout=120_000)
        expect(page.locator("#gallery")).to_contain_text("seed")
        for picture in page.locator("#gallery img").all():
            box = picture.bounding_box()
            assert box is not None and box["y"] >= 0 and box["y"] + box["height"] <= 800, box
        first = re.search(r"seed \d+", page.locator("#gallery").inner_text()).group()
        page.get_by_text("a [V] wearing a wizard hat, fantasy illustration").click()  # a prompt example draws at once
        expect(page.locator("#gallery")).not_to_contain_text(first, timeout=120_000)  # pictures of a new seed
        expect(page.locator("#gallery img")).to_have_count(2, timeout=120_000)
        page.get_by_text("Your aligned face, personal file and LoRA exports").click()  # what waits below
        expect(page.locator("#downloads-help")).to_contain_text("AUTOMATIC1111")  # where each download goes
        expect(page.locator("#crop img")).to_be_visible()
        page.get_by_text("Tips, identity scores, responsible use").click()
        expect(page.locator("#identity-legend")).to_contain_text("the same person")
        screenshot = Path(os.environ.get("HDB_SCREENSHOT", tmp_path / "app.jpg"))
        page.screenshot(path=str(screenshot), full_page=True, quality=80)  # the page as a visitor has it now
        mine = set(visitor_files.sessions.glob("*")) - sessions_before
        assert len(mine) == 1 and list(next(iter(mine)).glob("*/person.safetensors"))
        assert list(visitor_files.gradio_cache.rglob(photo.name))  # Gradio's copy of the upload
        page.close()  # the visitor leaves: Gradio ends the session and calls VisitorFiles.forget
        deadline = time.time() + 90
        while time.time() < deadline and (
            next(iter(mine)).exists() or list(visitor_files.gradio_cache.rglob(photo.name))
        ):
            time.sleep(0.5)
        assert not next(iter(mine)).exists(), "the visitor's personal files outlived the session"
        assert not list(visitor_files.gradio_cache.rglob(photo.name)), "the visitor's photo outlived the session"
        browser.close()
    assert screenshot.stat().st_size > 10_000


VISITOR_PHOTOS = ("obama.jpg", "grace_hopper.jpg", "astronaut.png")


def lone_visit(url: str, photo: str) -> list[np.ndarray]:
    client = Client(url, verbose=False)
    personalize(client, ASSETS / photo)
    return generate(client, seed=11, count=1)


@pytest.fixture(scope="module")
def lone_pictures(app_url):
    """What each photo gives a visitor who has the server to themselves."""
    return {photo: lone_visit(app_url, photo) for photo in VISITOR_PHOTOS}


def test_concurrent_visitors_each_get_exactly_what_a_lone_visitor_gets(app_url, lone_pictures):
    photos = [photo for photo in VISITOR_PHOTOS for _ in range(2)]  # six visitors at once, two per photo
    with ThreadPoolExecutor(len(photos)) as pool:
        results = list(pool.map(lambda photo: lone_visit(app_url, photo), photos))
    for photo, pictures in zip(photos, results, strict=True):
        assert all(np.array_equal(a, b) for a, b in zip(pictures, lone_pictures[photo], strict=True)), photo
    assert not np.array_equal(lone_pictures["obama.jpg"][0], lone_pictures["grace_hopper.jpg"][0])


def test_a_failed_visitor_does_not_break_the_next_one(app_url, engine, lone_pictures):
    FailingUNet(engine.pipe, "nan")  # the next training step of the shared pipeline goes NaN
    with pytest.raises(Exception, match="loss became nan"):
        personalize(Client(app_url, verbose=False), ASSETS / "obama.jpg")
    pictures = lone_visit(app_url, "grace_hopper.jpg")
    assert all(np.array_equal(a, b) for a, b in zip(pictures, lone_pictures["grace_hopper.jpg"], strict=True))


def stand_in_spaces(zero_gpu: bool, calls: list | None = None) -> types.ModuleType:
    """What hdb uses of the `spaces` package: spaces.config.Config.zero_gpu, and GPU(duration=callable), which here
    records each call's requested seconds and marks the time inside a GPU function in `calls`."""
    spaces = types.ModuleType("spaces")
    spaces.config = SimpleNamespace(Config=SimpleNamespace(zero_gpu=zero_gpu))

    def gpu(duration):
        def decorate(fn):
            def run(*args, **kwargs):
                calls.append(("requested", duration(*args, **kwargs)))
                calls.append("inside")
                try:
                    return fn(*args, **kwargs)
                finally:
                    calls.append("outside")

            return run

        return decorate

    spaces.GPU = gpu
    return spaces


def test_zero_gpu_asks_for_the_time_its_gpu_work_needs_and_nothing_else_runs_inside(engine, visitor_files, monkeypatch):
    import hdb.app.handlers as handlers_module
    from hdb.app import engine as app
    from hdb.app.handlers import Handlers

    calls: list = []
    monkeypatch.setattr(engine, "spaces", stand_in_spaces(True, calls))
    monkeypatch.setattr(engine, "seconds_per_step", None)  # on ZeroGPU nothing was timed: the estimates count
    for name in ("export_lora", "save_personal", "face_embedding", "identity_score"):  # CPU work, named in calls
        real = getattr(handlers_module, name)
        monkeypatch.setattr(
            handlers_module, name, lambda *a, real=real, name=name, **k: calls.append(name) or real(*a, **k)
        )
    import hdb.pipeline

    real_align = hdb.pipeline.align_face
    monkeypatch.setattr(hdb.pipeline, "align_face", lambda *a, **k: calls.append("align") or real_align(*a, **k))
    handlers = Handlers(engine, visitor_files)
    request = SimpleNamespace(session_hash="zero-gpu")
    *_, (_, status, session, _) = handlers.personalize(str(ASSETS / "obama.jpg"), True, 3, None, None, request)
    assert "Personalised" in status
    gallery, _ = handlers.generate(session, "[V]", "None", "", 1.0, 2, 7.5, 0, False, "Portrait", 2)
    assert len(gallery) == 2
    per_step = app.GPU_SECONDS["finetune_step"] * engine.pixel_scale
    requested = [c[1] for c in calls if isinstance(c, tuple)]
    assert requested[0] == pytest.approx(app.GPU_SECONDS["setup"] + 3 * per_step)
    portrait = 2 * 2 * app.GPU_SECONDS["image_step"] * engine.pixel_scale * 1.5  # 2 images x 2 steps, 1.5x the pixels
    assert requested[1] == pytest.approx(app.GPU_SECONDS["setup"] / 2 + portrait)
    inside = False
    for call in calls:  # no face alignment, descriptor, identity score or file export while the GPU is rented
        inside = {"inside": True, "outside": False}.get(call, inside) if isinstance(call, str) else inside
        assert not (inside and call in ("align", "export_lora", "save_personal", "face_embedding", "identity_score"))
    assert {"align", "export_lora", "face_embedding", "identity_score"} <= {c for c in calls if isinstance(c, str)}
    visitor_files.forget("zero-gpu")


def test_zero_gpu_defaults_fit_an_anonymous_visitors_quota(monkeypatch):
    """The engine under SPACES_ZERO_GPU asks for CUDA (in bf16), and sizes its default steps to the quota."""
    from hdb.app import engine as app
    from hdb.app.main import parse_args

    asked = []
    monkeypatch.setattr("hdb.devices.resolve_device", lambda name: asked.append(name) or torch.device("cpu"))
    monkeypatch.setattr("hdb.devices.resolve_dtype", lambda dtype, device: asked.append(dtype) or torch.float32)
    zero = app.Engine(parse_args(["--tiny"]), stand_in_spaces(True))
    assert asked == ["cuda", "bf16"] and zero.zero_gpu
    monkeypatch.setattr(app.Engine, "pixel_scale", 1.0)  # SD1.5's 512 px, not the tiny model's 64
    monkeypatch.setattr(zero, "seconds_per_step", None)
    first = zero.personalize_seconds(zero.default_steps) + zero.generate_seconds(25, 2)
    assert first * app.ZERO_GPU_FACTOR <= app.QUOTA_SECONDS["anonymous"] and 40 < zero.default_steps < 200
    most = zero.personalize_seconds(zero.max_finetune_steps)  # the slider's end: within a free account's quota
    assert most * app.ZERO_GPU_FACTOR <= app.QUOTA_SECONDS["free account"] and most <= app.MAX_GPU_SECONDS
    # README's figures are these
    readme, quota = " ".join((ROOT / "README.md").read_text().split()), app.QUOTA_MINUTES
    assert f"finetunes **{zero.default_steps} steps** by default" in readme
    assert f"asks for about {zero.personalize_seconds(zero.default_steps):.0f} s" in readme
    assert f"first two pictures for about {zero.generate_seconds(25, 2):.0f} s" in readme
    assert f"The steps slider stops at {zero.max_finetune_steps}" in readme
    assert f"the paper's 40 steps ask for about {zero.personalize_seconds(40):.0f} s" in readme
    assert (
        f"{quota['anonymous']} minutes for a visitor who is not signed in, {quota['free account']} with a free "
        f"account, {quota['PRO']} with PRO or Team, {quota['Enterprise']} for Enterprise" in readme
    )
    assert f"multiplies each request on this card by {app.ZERO_GPU_FACTOR:g}" in readme
    # at SD1.5's and SDXL's sizes, the most the sliders allow still fits in what one call may ask for
    for scale in (1.0, 4.0):
        base = SimpleNamespace(seconds_per_step=None, pixel_scale=scale, zero_gpu=False)
        most_steps = app.Engine.max_finetune_steps.fget(base)
        assert app.Engine.personalize_seconds(base, most_steps) <= app.MAX_GPU_SECONDS
        most_sampling = app.Engine.max_sampling_steps.fget(base)
        assert app.Engine.generate_seconds(base, most_sampling, app.MAX_IMAGES, app.MAX_AREA) <= app.MAX_GPU_SECONDS


def test_compile_is_ignored_on_a_cpu_and_on_zero_gpu_but_not_on_a_dedicated_gpu_space(monkeypatch, caplog):
    from hdb.app import engine as app
    from hdb.app.main import parse_args

    compiled = []
    monkeypatch.setattr("hdb.models.compile_pipeline", lambda pipe, mode: compiled.append(mode))
    monkeypatch.setenv("HDB_COMPILE", "1")  # as a Space's settings would ask for it
    options = parse_args(["--tiny", "--device", "cpu"])
    assert options.compile
    with caplog.at_level(logging.WARNING, logger="hdb.app"):
        engine = app.Engine(options, stand_in_spaces(False))  # a dedicated Space has `spaces` too
    assert compiled == [] and engine.warm_up is None and "--compile is ignored on cpu" in caplog.text
    assert app.compile_refusal("cuda", zero_gpu=app.on_zero_gpu(stand_in_spaces(False))) is None
    assert "ZeroGPU" in app.compile_refusal("cuda", zero_gpu=app.on_zero_gpu(stand_in_spaces(True)))
    assert not app.on_zero_gpu(None) and not app.on_zero_gpu(types.ModuleType("spaces"))


SPACES_STAND_IN = """
import gc, json, os, sys
gradio = sys.modules.get("gradio")
if gradio is not None and not hasattr(gradio, "Blocks"):  # as the real package: not while gradio is importing
    raise ImportError("spaces cannot be imported while gradio is importing")
torch = sys.modules.get("torch")
if torch is not None and torch.cuda.is_initialized():  # as the real package on ZeroGPU
    raise RuntimeError("CUDA has been initialized before importing the `spaces` package")
models = [type(o).__name__ for o in gc.get_objects() if type(o).__name__ in ("UNet2DConditionModel", "AutoencoderKL")]
record = {"cuda_initialized": bool(torch and torch.cuda.is_initialized()), "models_built": models}
open(os.environ["SPACES_RECORD"], "w").write(json.dumps(record))
class _Config:
    zero_gpu = os.environ.get("SPACES_ZERO_GPU", "").lower() in ("1", "t", "true")  # as the real package reads it
config = type("config", (), {"Config": _Config})
if _Config.zero_gpu:
    # The real package lets models go to "cuda" outside GPU functions by emulating CUDA in torch; this CPU-only
    # torch cannot, so "cuda" resolves to the CPU at the one place hdb resolves devices.
    import torch, hdb.devices
    hdb.devices.resolve_device = lambda name: torch.device("cpu")
def GPU(task=None, *, duration=None, size=None):
    assert task is None and size in (None, "large", "xlarge") and (duration is None or callable(duration))
    return lambda fn: fn
"""


def start_under_spaces_stand_in(tmp_path, **env: str):
    """`python app.py --tiny` with the `spaces` stand-in importable; its record of what existed on import."""
    (tmp_path / "stand_in" / "spaces").mkdir(parents=True)
    (tmp_path / "stand_in" / "spaces" / "__init__.py").write_text(SPACES_STAND_IN)
    record, port = tmp_path / "record.json", free_port()
    stand_in = f"{tmp_path / 'stand_in'}{os.pathsep}{ROOT}"
    return start_app(tmp_path, port, PYTHONPATH=stand_in, SPACES_RECORD=str(record), **env), port, record


def test_spaces_is_imported_before_any_model_exists(tmp_path):
    server, _, record = start_under_spaces_stand_in(tmp_path)
    try:
        deadline = time.time() + 120
        while not record.is_file():
            assert server.poll() is None and time.time() < deadline, server.stderr.read().decode()[-2000:]
            time.sleep(0.5)
        time.sleep(1)  # the record is written whole before the app goes on
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
    assert json.loads(record.read_text()) == {"cuda_initialized": False, "models_built": []}


def test_the_page_starts_and_serves_as_a_zero_gpu_space(tmp_path):
    """As Spaces starts it on ZeroGPU (SPACES_ZERO_GPU set): only what requirements.txt installs, no sign-in
    button (it would need gradio[oauth], and ZeroGPU knows a visitor from the Hub, not from the app)."""
    from hdb.app.engine import QUOTA_MINUTES

    server, port, record = start_under_spaces_stand_in(tmp_path, SPACES_ZERO_GPU="true")
    try:
        client = client_of(server, port)
        config = json.dumps(client.config)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
    assert json.loads(record.read_text()) == {"cuda_initialized": False, "models_built": []}
    assert "On ZeroGPU" in config and f"{QUOTA_MINUTES['free account']} minutes a day" in config
    assert '"login_button"' not in config and "Sign in with Hugging Face" not in config


def test_compiling_warms_up_in_the_background_and_the_page_says_so(monkeypatch, visitor_files):
    """The dedicated-GPU path, run on the CPU with compiling itself stubbed out (it takes minutes here)."""
    import hdb.pipeline
    from hdb.app import engine as app
    from hdb.app.main import parse_args
    from hdb.app.page import build_demo
    from hdb.options import APP_COMPILE_MODE

    compiled, release, real_generate = [], threading.Event(), hdb.pipeline.generate
    monkeypatch.setattr("hdb.models.compile_pipeline", lambda pipe, mode: compiled.append(mode))
    monkeypatch.setattr(app, "compile_refusal", lambda device_type, zero_gpu: None)  # as on a dedicated GPU
    monkeypatch.setattr("hdb.pipeline.generate", lambda *a, **k: release.wait(60) and real_generate(*a, **k))
    engine = app.Engine(parse_args(["--tiny", "--device", "cpu", "--compile"]))  # no `spaces`: not on Spaces
    assert engine.warm_up.is_alive() and engine.warm_up_note.startswith("⏳")  # the page is served meanwhile
    page = build_demo(engine, visitor_files)
    assert any(getattr(block, "elem_id", None) == "warm-up" for block in page.blocks.values())
    release.set()
    engine.warm_up.join(timeout=60)
    assert compiled == [APP_COMPILE_MODE] and engine.warm_up_note == ""  # compiled: the note goes


def test_a_stopped_server_leaves_no_visitor_file_and_the_next_one_sweeps_a_crashed_ones(tmp_path):
    stale = tmp_path / "hdb_app" / "999999999"  # a process id no system runs: an app that was killed
    (stale / "sessions" / "someone").mkdir(parents=True)
    (stale / "sessions" / "someone" / "person.safetensors").write_bytes(b"weights")
    port = free_port()
    server = start_app(tmp_path, port)
    try:
        client = client_of(server, port)
        assert not stale.exists()  # swept at start
        (root,) = (tmp_path / "hdb_app").glob(f"{server.pid}-*")  # the server's own folder: its pid and start time
        photo = tmp_path / "my_own_photo.jpg"
        shutil.copy(ASSETS / "obama.jpg", photo)
        personalize(client, photo, steps=2)
        assert list(root.glob("gradio/hdb_sessions/*/*/person.safetensors"))
        assert list(root.glob(f"gradio/**/{photo.name}"))
    finally:
        server.send_signal(signal.SIGTERM)  # how a container or a Space is stopped
        server.wait(timeout=60)
    assert not root.exists() and not list((tmp_path / "hdb_app").iterdir())


def test_a_session_hash_from_the_browser_can_only_name_a_folder_of_its_own(tmp_path):
    from hdb.app.visitors import VisitorFiles

    files = VisitorFiles(tmp_path / "hdb_app")
    outside = tmp_path / "keep.txt"
    outside.write_text("not the app's")
    hostile = "../../../" + outside.stem
    (written,) = files.write(hostile, "face", {"face.png": lambda path: path.write_bytes(b"png")})
    assert written.parent.parent.parent == files.sessions
    files.note_upload(hostile, str(outside))  # a path outside the app's folder is never deleted
    files.forget(hostile)
    assert outside.exists() and not written.exists()


def test_captions_say_the_seed_and_how_close_the_face_is(app_url):
    client = Client(app_url, verbose=False)
    personalize(client, ASSETS / "obama.jpg")
    captions = []
    generate(client, seed=42, count=2, captions=captions)
    # the tiny random model draws no faces: the score says so instead of inventing one
    assert captions == ["seed 42 · no face found", "seed 42 #2 · no face found"]
    inputs = ("[V]", "None", "", 1.0, 2, 7.5, 0, True, "Portrait", 1)  # random seed, portrait size
    gallery, used_seed = client.predict(*inputs, api_name="/generate")
    assert gallery[0]["caption"].startswith(f"seed {used_seed}") and Image.open(gallery[0]["image"]).size == (64, 96)


def test_identity_score_of_a_real_face(obama_face):
    from hdb.evaluate import identity_similarity

    same, other = (identity_similarity(obama_face, ASSETS / name) for name in ("obama2.jpg", "biden.jpg"))
    assert same > 0.9 > other  # the legend's ranges: the same person ~0.95, different people ~0.8


def test_several_photos_in_the_app(app_url):
    client = Client(app_url, verbose=False)
    _, status, _ = personalize(client, ASSETS / "obama.jpg", more=[ASSETS / "obama2.jpg"])
    assert "Personalised from 2 photos" in status and "may show someone" not in status
    _, status, _ = personalize(client, ASSETS / "obama.jpg", more=[ASSETS / "biden.jpg"])
    assert "Photo 2 may show someone other than photo 1" in status


def test_handlers_are_plain_methods_a_test_can_call(engine, visitor_files):
    """No server: the app's crop is the library's, and handler errors are clear Gradio errors."""
    import gradio as gr

    from hdb.app.handlers import Handlers

    handlers = Handlers(engine, visitor_files)
    request = SimpleNamespace(session_hash="direct-call")
    crop, note, _ = handlers.show_crop(str(ASSETS / "obama.jpg"), None, request)
    library = engine.personal.faces(ASSETS / "obama.jpg")[0].image
    assert np.array_equal(np.asarray(Image.open(crop).convert("RGB")), np.asarray(library))
    assert note == "Face found and aligned."
    with pytest.raises(gr.Error, match="Personalise a photo first"):
        handlers.generate(None, "[V]", "None", "", 1.0, 2, 7.5, 0, False, "Square", 1)
    photos = [str(ASSETS / "obama.jpg")] * 6
    with pytest.raises(gr.Error, match="from 1 to 5 photos"):
        next(handlers.personalize(photos[0], True, 2, None, photos[1:], request))
    visitor_files.forget("direct-call")


def test_the_space_preloads_every_file_the_pipeline_reads(tiny_sd15_dir):
    """Each config and weights file of a saved pipeline (weights as the fp16 files a GPU Space loads) is in the
    README's preload_from_hub, so nothing downloads when the Space starts. Listed by hand beside them, as the
    SD1.5 repository has them: the tokenizer's files (the tiny one is saved in transformers' newer format)
    and the safety checker with its feature extractor (the tiny pipeline has none)."""
    front = (ROOT / "README.md").read_text().split("---")[1]
    line = next(line for line in front.splitlines() if line.startswith("- stable-diffusion-v1-5/") and "," in line)
    preloaded = set(line.split(" ", 2)[2].split(","))
    saved = {p.relative_to(tiny_sd15_dir).as_posix() for p in tiny_sd15_dir.rglob("*") if p.is_file()}
    models = {
        name.replace(".safetensors", ".fp16.safetensors") for name in saved if not name.startswith(("tok", "hdb"))
    }
    assert models <= preloaded, sorted(models - preloaded)
    by_hand = {"tokenizer/vocab.json", "tokenizer/merges.txt", "tokenizer/tokenizer_config.json",
               "safety_checker/model.fp16.safetensors", "feature_extractor/preprocessor_config.json"}  # fmt: skip
    assert by_hand <= preloaded

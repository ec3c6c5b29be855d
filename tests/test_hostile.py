"""A public Space survives its visitors, and the CLI never destroys its inputs (issue #25).

A real Gradio server (the tiny pipeline) is driven through its API as a hostile or careless visitor would,
past the page's sliders; after each attack the next ordinary visitor must get exactly what a lone visitor
gets. The CLI is pointed at its own inputs and given values no one should type.
"""

import base64
import json
import os
import shutil
import signal
import time
import zlib
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from gradio_client import Client, handle_file
from helpers import ASSETS, client_of, free_port, refused, start_app, trained_person
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from hdb.errors import HdbError
from hdb.models import build_tiny_pipeline
from hdb.personal_file import PersonalWeights, load_personal, save_personal

ROOT = Path(__file__).resolve().parent.parent
ORDINARY = ("[V] as an astronaut", "None", "", 1.0, 2, 7.5, 4, False, "Square", 1)  # the generate API's inputs


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from hdb.app.engine import Engine
    from hdb.app.main import parse_args
    from hdb.app.page import EXAMPLE_PHOTOS, build_demo, serve
    from hdb.app.visitors import VisitorFiles

    engine = Engine(parse_args(["--tiny", "--device", "cpu"]))
    files = VisitorFiles(tmp_path_factory.mktemp("visitors"), [Path(p) for p in EXAMPLE_PHOTOS])
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GRADIO_TEMP_DIR", str(files.gradio_cache))
        demo = build_demo(engine, files)
        _, url, _ = serve(demo, files, "127.0.0.1", free_port(), prevent_thread_lock=True, quiet=True)
        LINE_OF[url] = demo
        yield url, engine, files
        demo.close()


def personalise(client: Client, photo: Path = ASSETS / "obama.jpg", steps: int = 2) -> list[str]:
    _, status, downloads = client.predict(handle_file(str(photo)), True, steps, None, api_name="/personalize")
    assert "Personalised" in status
    return downloads


def pictures(client: Client, *inputs: object) -> np.ndarray:
    gallery, _ = client.predict(*(inputs or ORDINARY), api_name="/generate")
    return np.asarray(Image.open(gallery[0]["image"]))


@pytest.fixture(scope="module")
def ordinary(server):
    """What an ordinary visitor gets when they have the server to themselves."""
    client = Client(server[0], verbose=False)
    personalise(client)
    return pictures(client)


def the_next_visitor_is_unaffected(url: str, expected: np.ndarray) -> None:
    client = Client(url, verbose=False)
    personalise(client)
    assert np.array_equal(pictures(client), expected)


# ----------------------------------------------------------------------------- 1. one request breaks everything


def test_a_seed_past_2_to_the_64_is_refused_and_breaks_nothing(server, ordinary):
    client = Client(server[0], verbose=False)
    personalise(client)
    for seed in (2**64, -1):  # (1.5: Gradio rounds it itself; NaN: see test_nan_and_infinity_in_raw_json)
        inputs = list(ORDINARY)
        inputs[6] = seed
        with pytest.raises(Exception, match="seed must be a whole number from 0"):
            pictures(client, *inputs)
    assert not server[1].personal.lidb.merged and server[1].personal.lidb.scale == 1.0
    assert np.array_equal(pictures(client), ordinary)  # the same visitor, the same server: as before
    the_next_visitor_is_unaffected(server[0], ordinary)


# ----------------------------------------------------------------------------- 2. crafted personal files


def rewrite(path: Path, out: Path, tensors: dict | None = None, **metadata: str) -> Path:
    with safe_open(str(path), "pt") as file:
        original, values = file.metadata(), {key: file.get_tensor(key) for key in file.keys()}
    save_file({**values, **(tensors or {})}, str(out), metadata={**original, **metadata})
    return out


def pack(table: object) -> str:
    text = table if isinstance(table, str) else json.dumps(table)  # a string: JSON text as it is
    return base64.b64encode(zlib.compress(text.encode(), 9)).decode()


@pytest.fixture(scope="module")
def real_file(tmp_path_factory):
    return save_personal(
        PersonalWeights.from_lidb(trained_person(build_tiny_pipeline("sd15"))),
        tmp_path_factory.mktemp("person") / "real.safetensors",
    )


def crafted_files(real: Path, folder: Path) -> dict[str, Path]:
    """Files a hostile visitor could make from a real one, each with the fragment its refusal names."""
    with safe_open(str(real), "pt") as file:
        layers = json.loads(zlib.decompress(base64.b64decode(file.metadata()["layers"])))
        A = file.get_tensor("A_train")
    wide = [[layers[0][0], [2_000_000, layers[0][1][1]]], *layers[1:]]  # the fingerprints copied, one layer widened
    nested = "[" * 100_000 + "]" * 100_000  # lists in lists, deeper than Python recurses
    return {
        "shape outside": rewrite(real, folder / "wide.safetensors", layers=pack(wide)),
        "unpacks to more than": rewrite(real, folder / "bomb.safetensors", layers=pack(["x" * 30_000_000])),
        "non-floating-point": rewrite(real, folder / "ints.safetensors", {"A_train": A.to(torch.int32)}),
        "holds a weight of": rewrite(real, folder / "huge.safetensors", {"A_train": A * 0 + 1e30}),
        "must be a whole number from 1 to 64": rewrite(real, folder / "rank.safetensors", r="2000"),
        "must list 1 to": rewrite(real, folder / "number.safetensors", layers=pack(7)),
        "damaged metadata": rewrite(real, folder / "nested.safetensors", layers=pack(nested)),
    }


def test_crafted_personal_files_are_refused_before_any_allocation(real_file, tmp_path):
    for fragment, path in crafted_files(real_file, tmp_path).items():
        with pytest.raises(HdbError, match=fragment):
            load_personal(path)


def test_a_file_whose_shapes_do_not_match_its_fingerprint_is_refused_by_the_base(real_file, tmp_path):
    from hdb.pipeline import PersonalPipeline

    with safe_open(str(real_file), "pt") as file:
        layers = json.loads(zlib.decompress(base64.b64decode(file.metadata()["layers"])))
    layers[0][1] = [layers[0][1][0] + 1, layers[0][1][1]]  # one layer one wider; the stored fingerprint kept
    weights = load_personal(rewrite(real_file, tmp_path / "forged.safetensors", layers=pack(layers)))
    with pytest.raises(HdbError, match="another base model architecture"):
        PersonalPipeline(build_tiny_pipeline("sd15")).check(weights)


def test_crafted_uploads_get_one_clear_line_and_the_server_carries_on(server, ordinary, real_file, tmp_path):
    client = Client(server[0], verbose=False)
    for fragment, path in crafted_files(real_file, tmp_path).items():
        with pytest.raises(Exception, match=fragment.split(" ")[0]):
            client.predict(handle_file(str(path)), api_name="/upload_person")
    the_next_visitor_is_unaffected(server[0], ordinary)


# ----------------------------------------------------------------------------- 3, 4. files outlive their visitor


def served(url: str, path: Path) -> int:
    return httpx.get(f"{url}gradio_api/file={path}").status_code


def test_everything_a_visitor_sent_or_made_goes_when_they_leave(server, tmp_path):
    url, _, files = server
    client = Client(url, verbose=False, download_files=False)  # answers name the server's files, not copies
    aligned_only = tmp_path / "only_aligned.jpg"
    shutil.copy(ASSETS / "obama2.jpg", aligned_only)
    crop, _ = client.predict(handle_file(str(aligned_only)), api_name="/align")  # sent, never personalised
    own_obama = tmp_path / "obama.jpg"  # named like an example, but the visitor's own photo
    Image.open(ASSETS / "obama3.jpg").save(own_obama)
    odd_name = tmp_path / "me\u2028you\u0085.jpg"  # line separators in a file name
    shutil.copy(ASSETS / "biden.jpg", odd_name)
    for photo in (own_obama, odd_name):
        crop, status, downloads = client.predict(handle_file(str(photo)), True, 2, None, api_name="/personalize")
        assert "Personalised" in status
    person = Path(downloads[0]["path"])
    mine = shutil.copy(person, tmp_path / "mine.safetensors")
    _, downloads = client.predict(handle_file(str(mine)), api_name="/upload_person")
    gallery, _ = client.predict(*ORDINARY, api_name="/generate")
    made = [Path(item["path"]) for item in [crop, *downloads, *(picture["image"] for picture in gallery)]]
    assert all(path.is_relative_to(files.sessions) for path in made)  # served in place, never copied elsewhere
    assert all(served(url, path) == 200 for path in made)
    assert not person.exists()  # a visitor keeps the latest of each kind only: the uploaded person's files
    names = (aligned_only.name, own_obama.name, "mine.safetensors")
    cached = [p for p in files.gradio_cache.rglob("*") if p.is_file() and (p.name in names or "\u2028" in p.name)]
    example = (ASSETS / "obama.jpg").read_bytes()
    sent = [path for path in cached if path.read_bytes() != example]  # Gradio's copy of the example stays
    assert len(sent) == 4 and len(cached) == 5
    files.forget(client.session_hash)  # what the page's unload (or the session's expiry) calls
    assert [path for path in [*made, *sent] if path.exists()] == []
    assert [path for path in cached if path.exists()] == [path for path in cached if path not in sent]
    assert all(served(url, path) != 200 for path in made)


def test_one_visitor_leaving_keeps_what_another_sent_and_the_examples(tmp_path):
    from hdb.app.visitors import VisitorFiles

    example = tmp_path / "assets" / "obama.jpg"
    example.parent.mkdir()
    shutil.copy(ASSETS / "obama.jpg", example)
    files = VisitorFiles(tmp_path / "app", [example])
    shared = files.gradio_cache / "abc" / "me.jpg"  # Gradio keeps one copy of identical uploads
    cached_example = files.gradio_cache / "def" / "obama.jpg"  # Gradio's copy of the example, shared by everyone
    for path, source in ((shared, ASSETS / "biden.jpg"), (cached_example, example)):
        path.parent.mkdir(parents=True)
        shutil.copy(source, path)
    for visitor in ("alice", "bob"):
        files.note_upload(visitor, shared)
        files.note_upload(visitor, cached_example)
    files.forget("alice")
    assert shared.is_file()  # Bob still uses it
    files.forget("bob")
    assert not shared.exists() and cached_example.is_file()


def test_a_stale_folder_is_swept_even_when_its_process_id_is_taken(tmp_path):
    from hdb.app.visitors import VisitorFiles

    taken = tmp_path / "hdb_app" / f"{os.getpid()}-1"  # this pid, but a process that started at another time
    taken.mkdir(parents=True)
    files = VisitorFiles(tmp_path / "hdb_app")
    assert taken in files.swept and not taken.exists() and files.root.is_dir()
    assert VisitorFiles(tmp_path / "hdb_app").swept == []  # a running app's folder stays


# ----------------------------------------------------------------------------- 5, 6. limits, and commits


def test_limits_per_visitor(server, ordinary, tmp_path):
    url = server[0]
    client = Client(url, verbose=False)
    personalise(client)
    with pytest.raises(Exception, match="at most 1,000 are read"):
        pictures(client, "[V] " * 2_500_000, *ORDINARY[1:])  # 10 MB of prompt
    big = tmp_path / "big.png"
    big.write_bytes(b"\x89PNG" + os.urandom(25 * 2**20))
    with pytest.raises(Exception):  # noqa: B017 -- Gradio refuses the upload itself (413) before any handler
        client.predict(handle_file(str(big)), api_name="/align")
    jobs = [client.submit(handle_file(str(ASSETS / "obama.jpg")), True, 30, None, api_name="/personalize")]
    time.sleep(0.5)
    with pytest.raises(Exception):  # noqa: B017 -- the line is refused (400: one request per visitor at a time)
        client.submit(*ORDINARY, api_name="/generate").result()
    jobs[0].result()
    assert pictures(client).shape == ordinary.shape  # once it finished, the visitor is served again


def test_a_failed_upload_does_not_replace_the_visitors_person(server, tmp_path):
    client = Client(server[0], verbose=False)
    personalise(client)
    before = pictures(client)
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(Exception, match="truncated or corrupt"):
        client.predict(handle_file(str(tmp_path / "bad.safetensors")), api_name="/upload_person")
    assert np.array_equal(pictures(client), before)


# ----------------------------------------------------------------------------- 9, 10. bad values, messages, stopping


def test_bad_values_past_the_sliders_get_clear_messages(server, ordinary):
    client = Client(server[0], verbose=False)
    with pytest.raises(Exception, match="right to use this photo"):
        client.predict(handle_file(str(ASSETS / "obama.jpg")), "no", 2, None, api_name="/personalize")
    personalise(client)
    with pytest.raises(Exception, match="prompt must be text"):
        pictures(client, None, *ORDINARY[1:])
    with pytest.raises(Exception):  # noqa: B017 -- past the slider's maximum: Gradio's own check refuses it (400)
        pictures(client, *ORDINARY[:4], 10**6, *ORDINARY[5:])
    the_next_visitor_is_unaffected(server[0], ordinary)


def test_nan_and_infinity_in_raw_json(server):
    """A hand-written request can carry NaN (Python's JSON reads it; gradio_client refuses to send it): the
    handlers, which the server runs with whatever arrives, refuse it by name."""
    import gradio as gr

    from hdb.app.handlers import Handlers
    from hdb.app.visitors import Session

    _, engine, files = server
    handlers = Handlers(engine, files)
    request = type("Request", (), {"session_hash": "raw-json"})()
    with pytest.raises(gr.Error, match="Finetune steps must be a whole number"):
        next(handlers.personalize(str(ASSETS / "obama.jpg"), True, float("nan"), None, None, request))
    someone = Session("raw-json", load_personal_of(engine))
    for position, value, message in (
        (3, float("nan"), "Identity strength must be a number"),
        (5, float("inf"), "Guidance must be a number"),
        (6, float("nan"), "seed must be a whole number"),
        (4, float("nan"), "Sampling steps must be a whole number"),
    ):
        inputs = list(ORDINARY)
        inputs[position] = value
        with pytest.raises(gr.Error, match=message):
            handlers.generate(someone, *inputs)
    files.forget("raw-json")


def load_personal_of(engine) -> PersonalWeights:
    """A person that fits the server's base: random weights, on a copy of its tiny pipeline."""
    return PersonalWeights.from_lidb(trained_person(build_tiny_pipeline("sd15")))


def test_messages_name_no_server_path(server, tmp_path):
    client = Client(server[0], verbose=False)
    notes = tmp_path / "notes.safetensors"
    notes.write_text("not weights")
    with pytest.raises(Exception) as refused:
        client.predict(handle_file(str(notes)), api_name="/upload_person")
    message = str(refused.value)
    assert "notes.safetensors" in message and str(server[2].root) not in message and "/tmp" not in message


def test_sigterm_during_a_job_exits_cleanly(tmp_path):
    port = free_port()
    server = start_app(tmp_path, port)
    try:
        client = client_of(server, port)
        client.submit(handle_file(str(ASSETS / "obama.jpg")), True, 300, None, api_name="/personalize")
        time.sleep(5)  # the job is running
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=60) == 0
    finally:
        server.kill()
    assert not list((tmp_path / "hdb_app").iterdir())


# ----------------------------------------------------------------------------- 7, 8. the CLI


@pytest.fixture
def person(tmp_path, real_file):
    return Path(shutil.copy(real_file, tmp_path / "p.safetensors"))


def test_the_cli_never_writes_over_its_inputs(tmp_path, person, capsys):
    photo = Path(shutil.copy(ASSETS / "obama.jpg", tmp_path / "p.jpg"))
    before = {path: path.read_bytes() for path in (photo, person)}
    refused("export", person, "-o", person, fragment="also an input", base=False)  # in a fresh process
    refused("personalize", photo, "-o", photo, fragment="should end in .safetensors", capsys=capsys)
    args = ["personalize", photo, "-o", tmp_path / "q.safetensors", "--save-face", photo]
    refused(*args, fragment="also an input", capsys=capsys)
    refused("personalize", photo, "-o", person, "--save-face", person, fragment="should end in", capsys=capsys)
    generate = ["generate", "--person", person, "--prompt", "[V]"]
    refused(*generate, "--score", photo, "-o", photo, fragment="also an input", capsys=capsys)
    refused(*generate, "-o", person, fragment="should end in", capsys=capsys)
    assert all(path.read_bytes() == data for path, data in before.items())


def test_the_cli_refuses_unwritable_outputs_and_bad_numbers_in_one_line(tmp_path, person, capsys):
    # one refusal of each kind in a fresh process (exit codes, nothing on stderr but the line), the rest in this one
    photo = ASSETS / "obama.jpg"
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "folder.safetensors").mkdir()
    gen = ["generate", "--person", person, "--prompt", "[V]"]
    refused("personalize", photo, "-o", tmp_path / "a_file" / "p.safetensors", fragment="not a folder")
    refused("personalize", photo, "-o", tmp_path / "p2.safetensors", "--lr", "nan", fragment="--lr", code=2)
    refused("personalize", photo, "-o", tmp_path / "folder.safetensors", fragment="is a folder", capsys=capsys)
    refused(*gen, "-o", tmp_path / "out.xyz", fragment="should end in .png", capsys=capsys)
    for option, value in (("--steps", "-5"), ("--seed", str(2**70)), ("--resolution", "8"), ("--rank", "0")):
        args = ["personalize", photo, "-o", tmp_path / "p2.safetensors", option, value]
        refused(*args, fragment=option, code=2, capsys=capsys)
    for option, value in (("--height", "100000"), ("--height", "7"), ("--seed", str(2**70)), ("--steps", "x")):
        refused(*gen, "-o", tmp_path / "o.png", option, value, fragment=option, code=2, capsys=capsys)
    # every crafted file (test_crafted_personal_files_are_refused_before_any_allocation) through the export command
    for fragment, path in crafted_files(person, tmp_path).items():
        refused("export", path, "-o", tmp_path / "lora.safetensors", fragment=fragment, capsys=capsys, base=False)


# ----------------------------------------------------------------------------- 11. a crowd: the line and the files


def join_body(fn: str, data: list, session_hash: str) -> dict:
    return {
        "data": data,
        "fn_index": FN_INDEX[fn],
        "session_hash": session_hash,
        "event_data": None,
        "trigger_id": None,
    }


FN_INDEX = {"align": 3, "personalize": 5, "upload_person": 8, "generate": 9}  # the page's events (GET /config)


def test_the_event_indices_are_the_pages(server):
    dependencies = httpx.get(f"{server[0]}config").json()["dependencies"]
    assert {name: next(d["id"] for d in dependencies if d["api_name"] == name) for name in FN_INDEX} == FN_INDEX


def upload(url: str, path: Path) -> dict:
    """POST a file as the page does; the FileData an event then names."""
    with path.open("rb") as file:
        (server_path,) = httpx.post(f"{url}gradio_api/upload", files={"files": (path.name, file)}).json()
    return {"path": server_path, "orig_name": path.name, "meta": {"_type": "gradio.FileData"}}


def flood(url: str, bodies: list[dict], headers: list[dict] | None = None) -> list[httpx.Response]:
    """Every join at once, as a crowd (or one client with many session hashes) sends them."""
    import asyncio

    async def send_all() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=len(bodies))
        async with httpx.AsyncClient(limits=limits, timeout=60) as client:
            sends = [
                client.post(f"{url}gradio_api/queue/join", json=body, headers=(headers or [{}] * len(bodies))[k])
                for k, body in enumerate(bodies)
            ]
            return await asyncio.gather(*sends)

    return asyncio.run(send_all())


def wait_for_an_empty_line(engine_files_demo_url: str, timeout: float = 120) -> None:
    from hdb.app import line

    deadline = time.time() + timeout
    while line.events_in_line(LINE_OF[engine_files_demo_url]) and time.time() < deadline:
        time.sleep(0.2)


LINE_OF: dict = {}  # url -> the Blocks served there (set by the `server` fixture)


def test_a_flood_of_fresh_session_hashes_from_one_address_gets_its_share_and_a_fast_reason(server, ordinary):
    """150 joins at once, each with a fresh session hash, from one address: at most MAX_JOBS_PER_ADDRESS get in (the
    rest are refused at once, saying why), however the joins interleave; then an ordinary visitor is served."""
    from hdb.app.line import MAX_JOBS_PER_ADDRESS
    from hdb.faces import DLIB_LOCK

    url = server[0]
    photo = upload(url, ASSETS / "obama.jpg")
    bodies = [join_body("align", [photo, None], f"flood-{k}") for k in range(150)]
    with DLIB_LOCK:  # the first previews hold the line: each stays in it while the flood arrives
        answers = flood(url, bodies)
    accepted = [a for a in answers if a.status_code == 200]
    refused = [a for a in answers if a.status_code == 429]
    assert len(accepted) == MAX_JOBS_PER_ADDRESS and len(refused) == 150 - MAX_JOBS_PER_ADDRESS
    assert all("from your network are already waiting" in a.json()["detail"] for a in refused)
    one_session = flood(url, [join_body("align", [photo, None], "one-visitor") for _ in range(20)])
    assert [a.status_code for a in one_session].count(200) <= 1  # (the line may still hold the flood's share)
    wait_for_an_empty_line(url)
    the_next_visitor_is_unaffected(url, ordinary)


def test_a_crowd_of_addresses_cannot_grow_the_line_past_its_size(server, ordinary):
    """Gradio checks its queue's size before it awaits the validators, so joins that arrive together all passed it:
    150 visitors from 150 addresses (uvicorn takes X-Forwarded-For from 127.0.0.1) now fill it to LINE_SIZE only."""
    from hdb.app.line import LINE_SIZE
    from hdb.faces import DLIB_LOCK

    url = server[0]
    photo = upload(url, ASSETS / "obama.jpg")
    bodies = [join_body("align", [photo, None], f"crowd-{k}") for k in range(150)]
    addresses = [{"X-Forwarded-For": f"10.1.{k // 250}.{k % 250}"} for k in range(150)]
    with DLIB_LOCK:
        answers = flood(url, bodies, addresses)
    assert [a.status_code for a in answers].count(200) == LINE_SIZE
    assert all("The line is full" in a.json()["detail"] for a in answers if a.status_code != 200)
    wait_for_an_empty_line(url)
    the_next_visitor_is_unaffected(url, ordinary)


def test_a_shared_picture_link_opens_nothing_else_and_another_visitor_cannot_take_the_files(server, ordinary):
    url, _, files = server
    victim = Client(url, verbose=False, download_files=False)
    _, _, downloads = victim.predict(handle_file(str(ASSETS / "obama.jpg")), True, 2, None, api_name="/personalize")
    gallery, _ = victim.predict(*ORDINARY, api_name="/generate")
    picture, person = Path(gallery[0]["image"]["path"]), Path(downloads[0]["path"])
    assert served(url, picture) == 200 and served(url, person) == 200  # the visitor's own links work
    for guess in ("person.safetensors", "uploads.jsonl", "face.png"):  # names next to the shared picture
        assert served(url, picture.parent / guess) != 200 and served(url, picture.parent.parent / guess) != 200
    for event, data in (("upload_person", [None]), ("personalize", [True, 2, None, None])):  # the victim's file
        stolen = {"path": str(person if event == "upload_person" else picture), "meta": {"_type": "gradio.FileData"}}
        answer = httpx.post(f"{url}gradio_api/queue/join", json=join_body(event, [stolen, *data], "attacker"))
        assert answer.status_code == 422 and "was not uploaded here" in json.dumps(answer.json())
    files.forget("attacker")  # the attacker leaves: nothing of the victim's goes with them
    assert person.is_file() and picture.is_file()
    the_next_visitor_is_unaffected(url, ordinary)


def test_nothing_is_written_for_a_visitor_who_left_during_their_job(server):
    url, engine, files = server
    client = Client(url, verbose=False)
    with engine.lock:  # the finetune waits for the shared pipeline while the visitor closes the tab
        job = client.submit(handle_file(str(ASSETS / "obama.jpg")), True, 2, None, api_name="/personalize")
        time.sleep(3)
        files.forget(client.session_hash)  # what the page's unload calls
    with pytest.raises(Exception, match="session has ended"):
        job.result()
    assert not (files.sessions / _visitor_folder(client.session_hash)).exists()


def _visitor_folder(session_hash: str) -> str:
    from hdb.app.visitors import _visitor

    return _visitor(session_hash)


def test_a_shared_upload_stays_for_a_visitor_whose_job_waits_when_the_other_leaves(server, tmp_path):
    url, engine, files = server
    photo = tmp_path / "the_same_photo.jpg"
    shutil.copy(ASSETS / "grace_hopper.jpg", photo)
    first, waiting, busy = (Client(url, verbose=False) for _ in range(3))
    first.predict(handle_file(str(photo)), api_name="/align")  # the first visitor only looked at their photo
    with engine.lock:  # someone else's personalisation holds the pipeline; the second visitor waits in line
        ahead = busy.submit(handle_file(str(ASSETS / "obama.jpg")), True, 2, None, api_name="/personalize")
        time.sleep(2)
        job = waiting.submit(handle_file(str(photo)), True, 2, None, api_name="/personalize")
        time.sleep(2)
        files.forget(first.session_hash)  # the first visitor leaves: Gradio kept one copy of the photo for both
    assert "Personalised" in ahead.result()[1] and "Personalised" in job.result()[1]


def test_a_visitor_keeps_one_crop_and_file_inputs_leave_no_temporaries(server, real_file, tmp_path):
    url, _, files = server
    client = Client(url, verbose=False)
    before = {path for path in files.gradio_cache.rglob("tmp*") if path.is_file()}
    for photo in ("obama.jpg", "obama2.jpg", "obama3.jpg"):
        client.predict(handle_file(str(ASSETS / photo)), api_name="/align")
    client.predict(handle_file(str(real_file)), api_name="/upload_person")
    client.predict(handle_file(str(real_file)), api_name="/upload_person")
    mine = files.sessions / _visitor_folder(client.session_hash)
    assert len(list(mine.glob("*/face.png"))) == 1 and len(list(mine.glob("*/person.safetensors"))) == 1
    assert {path for path in files.gradio_cache.rglob("tmp*") if path.is_file()} == before  # gr.File made 2 a call


def test_uploads_without_an_event_are_swept_and_an_address_uploads_within_its_budget(server, monkeypatch, tmp_path):
    from hdb.app import line

    url, _, files = server
    client = Client(url, verbose=False)
    client.predict(handle_file(str(ASSETS / "biden.jpg")), api_name="/align")  # named in an event: kept
    never_named = tmp_path / "never_named.png"  # content of its own: Gradio keeps one copy of identical uploads
    Image.fromarray(np.random.default_rng().integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(never_named)
    orphan = Path(upload(url, never_named)["path"])  # posted, never named in an event
    assert orphan.is_file() and served(url, orphan) == 200
    swept = files.sweep_orphans(older_than=0)
    assert orphan in swept and not orphan.exists()
    assert all(path.name != "biden.jpg" for path in swept) and list(files.gradio_cache.rglob("biden.jpg"))
    monkeypatch.setattr(line, "UPLOAD_BYTES", 2**20)  # the budget, small enough to test with small files
    big = tmp_path / "noise.png"
    big.write_bytes(os.urandom(400_000))
    answers = []
    for _ in range(4):
        with big.open("rb") as file:
            answers.append(httpx.post(f"{url}gradio_api/upload", files={"files": ("noise.png", file)}))
    assert [a.status_code for a in answers][-2:] == [429, 429]
    assert "uploaded" in answers[-1].json()["detail"]
    files.sweep_orphans(older_than=0)


def test_messages_keep_slashes_between_values_and_lose_server_paths_and_bad_characters():
    from hdb.app.handlers import visitor_error

    shapes = "tensor shapes (40, 1, 100)/(40, 50, 1) do not match its metadata (40, 1, 90)/(40, 50, 1)"
    assert visitor_error(HdbError(shapes)).message == shapes
    where = "Image file not found: /tmp/hdb_app/123-45/gradio/abc/me.jpg, nor '/home/someone/x.png'"
    assert visitor_error(HdbError(where)).message == "Image file not found: me.jpg, nor 'x.png'"
    assert visitor_error(HdbError("a lone \ud800 surrogate")).message == "a lone ? surrogate"  # sendable as JSON


def test_the_readme_quotes_the_lines_limits():
    from hdb.app import line, visitors

    text = " ".join((ROOT / "README.md").read_text().split())
    assert line.MAX_JOBS_PER_VISITOR == 1  # the README says "one"
    quoted = (
        f"at most {line.LINE_SIZE} requests waiting or running, one per visitor",
        f"{line.MAX_JOBS_PER_ADDRESS} per network address",
        f"{line.UPLOAD_BYTES // 2**20} MB of uploads per address in {line.UPLOAD_WINDOW // 60} minutes",
        f"removed after {visitors.ORPHAN_SECONDS // 60} minutes",
    )
    assert [phrase for phrase in quoted if phrase not in text] == []


def test_a_lone_surrogate_and_a_seed_of_1e308_get_readable_answers(server, ordinary):
    client = Client(server[0], verbose=False)
    personalise(client)
    # gradio_client cannot send a lone surrogate; JSON can (as an escape), so a hand-written request does
    answer = raw_event(server[0], "generate", [None, "[V] \ud800", *ORDINARY[1:]], client.session_hash)
    assert answer["success"] is False and "not valid Unicode text" in answer["output"]["error"]
    inputs = list(ORDINARY)
    inputs[6] = 1e308
    with pytest.raises(Exception) as refused:
        pictures(client, *inputs)
    assert "seed must be a whole number" in str(refused.value) and len(str(refused.value)) < 300
    the_next_visitor_is_unaffected(server[0], ordinary)


def raw_event(url: str, fn: str, data: list, session_hash: str) -> dict:
    """Join the line with a hand-written JSON body and read the event's completion message from the stream."""
    body = json.dumps(join_body(fn, data, session_hash))  # ensure_ascii: a lone surrogate travels as an escape
    joined = httpx.post(f"{url}gradio_api/queue/join", content=body, headers={"content-type": "application/json"})
    assert joined.status_code == 200, joined.text
    with httpx.stream("GET", f"{url}gradio_api/queue/data", params={"session_hash": session_hash}, timeout=60) as sse:
        for line in sse.iter_lines():
            message = json.loads(line[6:]) if line.startswith("data: ") else {}
            if message.get("msg") == "process_completed":
                return message
    raise AssertionError("the stream ended before the event completed")

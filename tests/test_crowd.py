"""Many visitors at once, each in a process of its own: native code behind one owner, and a server that survives.

What could crash the process runs in a fresh one (a crash here would take the pytest worker with it); the line's
limits and the files are tried on the in-process server of tests/test_hostile.py.
"""

import json
import signal
import subprocess
import sys
import threading
import time

import numpy as np
from gradio_client import Client, handle_file
from helpers import ASSETS, client_of, free_port, start_app
from PIL import Image

DLIB_IN_TWO_THREADS = """
import json, sys, threading, time
import numpy as np
from hdb.faces import align_face, face_embedding
from hdb.example_photos import ASSETS

photos = [ASSETS / "obama.jpg", ASSETS / "grace_hopper.jpg"]
alone = [face_embedding(align_face(photo, size=256)) for photo in photos]  # each photo's descriptor, one thread
rounds, wrong = [0, 0], []

def work(k):
    end = time.time() + float(sys.argv[1])
    while time.time() < end:
        descriptor = face_embedding(align_face(photos[k], size=256))
        wrong.extend([k] if not np.array_equal(descriptor, alone[k]) else [])
        rounds[k] += 1

threads = [threading.Thread(target=work, args=(k,)) for k in (0, 1)]
[thread.start() for thread in threads]
[thread.join() for thread in threads]
print(json.dumps([rounds, wrong]))
"""


def test_two_threads_in_dlib_at_once_neither_crash_nor_corrupt_each_other():
    """Without hdb.faces.DLIB_LOCK this process segfaults within a second or two, or its crops go wrong."""
    run = subprocess.run([sys.executable, "-c", DLIB_IN_TWO_THREADS, "10"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    rounds, wrong = json.loads(run.stdout.strip().splitlines()[-1])
    assert min(rounds) > 0 and wrong == []


def pictures_of(client: Client) -> np.ndarray:
    _, status, _ = client.predict(handle_file(str(ASSETS / "obama.jpg")), True, 2, None, api_name="/personalize")
    assert "Personalised" in status
    gallery, _ = client.predict("[V]", "None", "", 1.0, 2, 7.5, 3, False, "Square", 1, api_name="/generate")
    return np.asarray(Image.open(gallery[0]["image"]))


def test_two_visitors_previewing_and_personalising_at_once_for_a_minute(tmp_path):
    """The photo preview (/align) runs outside the pipeline's line, the personalisation and its captions inside it:
    both call dlib, from two threads of the server at once."""
    port = free_port()
    server = start_app(tmp_path, port)
    try:
        lone = pictures_of(client_of(server, port))
        counts, failures, end = {"align": 0, "personalize": 0}, [], time.time() + 60

        def visit(kind: str) -> None:
            client, photos = Client(f"http://127.0.0.1:{port}/", verbose=False), ["obama.jpg", "grace_hopper.jpg"]
            while time.time() < end and server.poll() is None:
                photo = handle_file(str(ASSETS / photos[counts[kind] % 2]))
                try:
                    if kind == "align":
                        client.predict(photo, api_name="/align")
                    else:
                        client.predict(photo, True, 1, None, api_name="/personalize")
                    counts[kind] += 1
                except Exception as error:  # noqa: BLE001 -- a dead server ends the loop; anything else is a failure
                    failures.append(repr(error)[:300])
                    break

        visitors = [threading.Thread(target=visit, args=(kind,)) for kind in counts]
        [visitor.start() for visitor in visitors]
        [visitor.join() for visitor in visitors]
        assert server.poll() is None, server.stderr.read().decode()[-2000:]
        assert failures == [] and min(counts.values()) > 2, (counts, failures)
        assert np.array_equal(pictures_of(Client(f"http://127.0.0.1:{port}/", verbose=False)), lone)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)

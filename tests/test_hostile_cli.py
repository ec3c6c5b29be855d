"""What a careless or hostile user gives the library and the CLI, beyond the app (issue #33).

Personal files with strings of any length, prompts that grow when [V] is replaced or hold text that is not
Unicode, huge numbers, `--steps 0`, a full disk, file names that are not UTF-8, and FIFOs where files belong:
each is one clear line (an HdbError; `error: ...` on the command line), before any model loads where it can be.
"""

import errno
import os
import resource
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from helpers import ASSETS, TINY_DECODER, assert_one_line_error, hdb_in_process, refused, trained_person
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from hdb.config import MAX_SEED, HypernetTrainConfig, PersonalizeConfig, PreoptimizeConfig, value_problem
from hdb.errors import HdbError
from hdb.models import build_tiny_pipeline
from hdb.personal_file import PersonalWeights, load_personal, save_personal
from hdb.styles import check_prompt, expand_prompt

PHOTO = ASSETS / "obama.jpg"
NOT_UTF8 = os.fsdecode(b"\xff.safetensors")  # a name as Linux allows it: its byte 0xff decodes to no character


@pytest.fixture(scope="module")
def real_file(tmp_path_factory):
    return save_personal(
        PersonalWeights.from_lidb(trained_person(build_tiny_pipeline("sd15"))),
        tmp_path_factory.mktemp("person") / "real.safetensors",
    )


def forged(real: Path, out: Path, **metadata: str) -> Path:
    """A copy of the personal file `real` with some metadata changed, as anyone can write one."""
    with safe_open(str(real), "pt") as file:
        original, tensors = file.metadata(), {key: file.get_tensor(key) for key in file.keys()}
    save_file(tensors, str(out), metadata={**original, **metadata})
    return out


def tiny_hypernet_folder(base: Path, folder: Path) -> Path:
    from hdb.hypernet import HyperNetwork, build_tiny_image_encoder
    from hdb.lidb import LiDB
    from hdb.models import load_pipeline

    with LiDB.attached(load_pipeline(str(base), "fp32", "cpu")) as lidb:
        hypernet = HyperNetwork.for_lidb(lidb, build_tiny_image_encoder(), "tiny", decoder=TINY_DECODER)
    hypernet.save_pretrained(folder)
    return folder


# ----------------------------------------------------------------------------- 1. bounded strings in personal files


def test_a_150000_character_token_is_refused_on_load_naming_the_field(real_file, tmp_path, capsys):
    # the reported attack: a 223 KB file whose token, put into "[V]"*333, tied a server up for minutes
    path = forged(real_file, tmp_path / "p.safetensors", instance_token="x" * 150_000)
    with pytest.raises(HdbError, match=r"p.safetensors has damaged metadata \(instance_token is 150,000 characters; "):
        load_personal(path)
    assert_one_line_error(hdb_in_process(capsys, "info", path), "instance_token is 150,000 characters; at most 100")


def test_every_string_of_a_personal_file_is_capped_on_load(real_file, tmp_path):
    from hdb.personal_file import MAX_METADATA_CHARS

    with safe_open(str(real_file), "pt") as file:
        written = set(file.metadata())
    assert written - {"format", "layers"} <= set(MAX_METADATA_CHARS)  # every other string hdb writes has its cap
    for field, cap in MAX_METADATA_CHARS.items():
        path = forged(real_file, tmp_path / f"{field}.safetensors", **{field: "7" * (cap + 1)})
        with pytest.raises(HdbError, match=f"{field} is {cap + 1:,} characters; at most {cap:,}"):
            load_personal(path)


def test_the_metadata_as_a_whole_is_bounded_before_anything_is_unpacked(real_file, tmp_path, monkeypatch):
    from hdb import personal_file

    def unpacked(*args):
        raise AssertionError("the layer table was unpacked")

    monkeypatch.setattr(personal_file, "_unpack_layers", unpacked)
    path = forged(real_file, tmp_path / "big.safetensors", padding="x" * 300_000)  # a key hdb does not read
    with pytest.raises(HdbError, match=r"damaged metadata \(its header is [\d,]+ bytes; at most 262,144\)"):
        load_personal(path)


@pytest.mark.parametrize("token", ["", "   ", "sks\nface", "sks\x00face", "sks\u2028face", "x" * 101])
def test_a_token_that_is_not_a_few_words_on_one_line_is_refused_everywhere(token, real_file, tmp_path):
    with pytest.raises(HdbError, match="damaged metadata \\(instance_token"):
        load_personal(forged(real_file, tmp_path / "p.safetensors", instance_token=token))
    weights = load_personal(real_file)
    weights.instance_token = token
    with pytest.raises(HdbError, match="instance_token"):  # what load would refuse is never written
        save_personal(weights, tmp_path / "q.safetensors")
    assert not list(tmp_path.glob("q.safetensors*"))
    for config in (PersonalizeConfig, PreoptimizeConfig, HypernetTrainConfig):  # and as a setting
        with pytest.raises(HdbError, match="`instance_token`") as caught:
            config(instance_token=token)
        assert "\n" not in str(caught.value) and len(str(caught.value)) < 200  # the token itself is not echoed


def test_ordinary_tokens_still_pass(real_file, tmp_path):
    for token in ("sks face", "zxq person", "ohwx man with glasses", "x" * 100, "Zoë"):
        weights = load_personal(real_file)
        weights.instance_token = weights.instance_prompt = token
        assert load_personal(save_personal(weights, tmp_path / "p.safetensors")).instance_token == token
        assert PersonalizeConfig(instance_token=token).instance_token == token


# ----------------------------------------------------------------------------- 2. prompts


def test_the_prompt_is_bounded_with_the_persons_token_in_place():
    prompt = "[V]" * 333  # 999 characters: within the cap as typed
    assert len(check_prompt(prompt)) == 999
    with pytest.raises(HdbError, match="with the person's token in place of \\[V\\] is 2,664 characters"):
        expand_prompt(prompt, "sks face")
    assert expand_prompt("a [V] " + "x" * 900, "sks face").startswith("a sks face x")  # an ordinary long one passes


def test_text_that_is_not_valid_unicode_is_one_clear_error_that_does_not_echo_it():
    for what in ("prompt", "negative prompt"):
        with pytest.raises(HdbError, match=f"The {what} contains characters that are not valid Unicode text") as caught:
            check_prompt("a [V] \ud800 face", what)
        assert "\ud800" not in str(caught.value)
    with pytest.raises(HdbError, match="not valid Unicode text"):
        expand_prompt("a [V] \udcff", "sks face")


def test_the_cli_refuses_a_prompt_that_is_not_unicode_before_loading_a_model(real_file, tmp_path, capsys):
    # a prompt from the command line in a broken encoding reaches Python as surrogate escapes
    generate = ["generate", "--person", real_file, "-o", tmp_path / "x.png"]
    bad = os.fsdecode(b"a [V] \xff")
    refused(*generate, "--prompt", bad, fragment="The prompt contains characters that are not valid", capsys=capsys)
    refused(*generate, "--prompt", "[V]", "--negative-prompt", bad, fragment="negative prompt", capsys=capsys)


# ----------------------------------------------------------------------------- 3. numbers


def test_huge_numbers_are_shown_compactly():
    seed_range = (0, MAX_SEED)
    assert value_problem(10**308, seed_range, True) == (
        "must be a whole number from 0 to 9,223,372,036,854,775,807, not 1e+308"
    )
    assert value_problem(1e308, seed_range, True).endswith("not 1e+308")
    assert value_problem(-(10**20), seed_range, True).endswith("not -1e+20")
    assert len(value_problem(10**5000, seed_range, True)) < 120  # past a float, past str()'s 4,300 digits
    assert value_problem(2000, (1, 64), True) == "must be a whole number from 1 to 64, not 2000"  # small: as typed
    assert value_problem("x" * 10_000, (1, 64), True).startswith("must be a whole number from 1 to 64, not 'xxx")
    assert len(value_problem("x" * 10_000, (1, 64), True)) < 120


def test_the_cli_shows_a_huge_number_compactly(tmp_path, capsys):
    for seed in ("1" + "0" * 308, "9" * 5000):
        result = refused("personalize", PHOTO, "-o", tmp_path / "p.safetensors", "--seed", seed, fragment="--seed",
                         code=2, capsys=capsys)  # fmt: skip
        assert len(result.stderr.splitlines()[-1]) < 200, result.stderr


# ----------------------------------------------------------------------------- 4. the CLI: --steps 0


def test_steps_0_without_a_hypernetwork_is_refused_before_any_model_loads(tmp_path, capsys, obama_face):
    from hdb.pipeline import PersonalPipeline

    out = tmp_path / "p.safetensors"
    refused("personalize", PHOTO, "-o", out, "--steps", "0", capsys=capsys,
            fragment="--steps 0 keeps the start, which without a hypernetwork is the base model")  # fmt: skip
    assert not out.exists()
    personal = PersonalPipeline(build_tiny_pipeline("sd15"))
    with pytest.raises(HdbError, match="`steps=0` keeps the start"):
        personal.personalize(obama_face, PersonalizeConfig(steps=0, progress=False))
    assert personal.person is None
    start = personal.lidb.own.initial_weights()  # a start given: 0 steps keep it (the toy scores a prediction so)
    assert personal.personalize(obama_face, PersonalizeConfig(steps=0, progress=False), start=start).losses == []


def test_steps_0_with_a_hypernetwork_writes_its_prediction_alone(tiny_sd15_dir, tmp_path, capsys):
    hypernet = tiny_hypernet_folder(tiny_sd15_dir, tmp_path / "hypernet")
    out = tmp_path / "p.safetensors"
    args = ["personalize", PHOTO, "--base", tiny_sd15_dir, "--hypernet", hypernet, "-o", out, "--steps", "0"]
    result = hdb_in_process(capsys, *args)
    assert result.returncode == 0, result.stderr
    assert "0 steps: the hypernetwork's prediction alone, no finetune" in result.stdout
    person = load_personal(out)  # the prediction: rank 1, no relaxed LoRA on top
    assert person.B.abs().sum() > 0 and person.config.rank == 1 and person.lora_rank == 0


# ----------------------------------------------------------------------------- 4. the CLI: a full disk


def full_disk_for(name: str, monkeypatch) -> None:
    """Writes of files whose name starts with `name` (their partial too) fail as on a full disk."""
    write_bytes = Path.write_bytes

    def full(path: Path, data: bytes) -> int:
        if path.name.startswith(name):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return write_bytes(path, data)

    monkeypatch.setattr(Path, "write_bytes", full)


def test_a_full_disk_keeps_the_trained_person_elsewhere_and_says_where(tiny_sd15_dir, tmp_path, capsys, monkeypatch):
    spare = tmp_path / "spare"
    spare.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spare))  # the system's temporary folder, for this test
    full_disk_for("p.safetensors", monkeypatch)
    out = tmp_path / "p.safetensors"
    result = hdb_in_process(capsys, "personalize", PHOTO, "--base", tiny_sd15_dir, "-o", out, "--steps", "1")
    assert_one_line_error(result, "Could not write", "p.safetensors: No space left on device", "trained person")
    (kept,) = spare.iterdir()
    assert str(kept) in result.stderr
    assert any(up.abs().sum() > 0 for up in load_personal(kept).lora_up)  # the finetune's LoRA, trained a step
    assert not list(tmp_path.glob("p.safetensors*"))  # no partial left behind


def test_a_disk_that_takes_no_file_says_the_trained_person_is_lost(tiny_sd15_dir, tmp_path):
    def files_of_at_most_2000_bytes():  # in the child: the kernel refuses larger files (EFBIG), as a full disk would
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (2000, 2000))

    out = tmp_path / "p.safetensors"
    command = [sys.executable, "-m", "hdb", "personalize", PHOTO, "--base", tiny_sd15_dir, "-o", out, "--steps", "1"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONDONTWRITEBYTECODE="1", TMPDIR=str(tmp_path))
    result = subprocess.run(
        command, capture_output=True, text=True, env=env, timeout=300, preexec_fn=files_of_at_most_2000_bytes
    )
    assert_one_line_error(result, "Could not write", "File too large", "the trained person is lost")
    assert not list(tmp_path.glob("*.safetensors*"))


def test_a_full_disk_during_an_export_is_one_line(real_file, tmp_path, capsys, monkeypatch):
    full_disk_for("lora.safetensors", monkeypatch)
    for format in ("diffusers", "kohya"):
        result = hdb_in_process(capsys, "export", real_file, "--format", format, "-o", tmp_path / "lora.safetensors")
        assert_one_line_error(result, "Could not write", "lora.safetensors: No space left on device")
        assert not list(tmp_path.glob("lora.safetensors*"))


# ----------------------------------------------------------------------------- 4. the CLI: names that are not UTF-8


def test_a_file_name_that_is_not_utf8_works_through_every_command(real_file, tiny_sd15_dir, tmp_path, capsys):
    person = tmp_path / NOT_UTF8
    person.write_bytes(real_file.read_bytes())
    result = hdb_in_process(capsys, "info", person)
    assert result.returncode == 0 and "\\xff.safetensors" in result.stdout, result.stderr
    for format in ("diffusers", "kohya"):
        lora = tmp_path / os.fsdecode(f"\xfe{format}.safetensors".encode("latin-1"))
        result = hdb_in_process(capsys, "export", person, "--format", format, "-o", lora)
        assert result.returncode == 0 and "\\xfe" in result.stdout, result.stderr
        with safe_open(str(shutil.copy(lora, tmp_path / "copy.safetensors")), "pt") as file:
            assert len(list(file.keys())) > 0
    picture = tmp_path / os.fsdecode(b"\xfd.png")
    generate = ["generate", "--base", tiny_sd15_dir, "--person", person, "--prompt", "[V]", "--steps", "1"]
    result = hdb_in_process(capsys, *generate, "-o", picture)
    assert result.returncode == 0 and "saved" in result.stdout and "\\xfd.png" in result.stdout, result.stderr
    assert Image.open(picture).size == (64, 64)


def test_personalize_prints_a_name_that_is_not_utf8_on_a_strict_utf8_terminal(tiny_sd15_dir, tmp_path):
    out = tmp_path / NOT_UTF8
    command = [sys.executable, "-m", "hdb", "personalize", PHOTO, "--base", tiny_sd15_dir, "-o", out, "--steps", "1"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONIOENCODING="utf-8")  # strict: a lone surrogate cannot print
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert "\\xff.safetensors" in result.stdout
    assert load_personal(out).lora_rank > 0  # the person, trained


# ----------------------------------------------------------------------------- 4. the CLI: FIFOs, sockets, devices


def test_what_is_not_a_regular_file_is_refused_before_any_work(real_file, tmp_path, capsys):
    fifo = {name: tmp_path / name for name in ("photo.jpg", "person.safetensors", "out.png", "out.safetensors")}
    for path in fifo.values():
        os.mkfifo(path)
    out, person = tmp_path / "p.safetensors", fifo["person.safetensors"]
    here = {"capsys": capsys, "fragment": "is not a regular file"}
    # inputs: a reader of a FIFO would wait for a writer forever
    refused("personalize", fifo["photo.jpg"], "-o", out, **here)
    refused("info", person, base=False, **here)
    refused("export", person, "-o", tmp_path / "lora.safetensors", base=False, **here)
    refused("generate", "--person", person, "--prompt", "[V]", "-o", tmp_path / "x.png", **here)
    refused("generate", "--person", real_file, "--prompt", "[V]", "--score", fifo["photo.jpg"], "-o",
            tmp_path / "x.png", **here)  # fmt: skip
    with pytest.raises(HdbError, match="is not a regular file"):
        load_personal(person)
    # outputs: refused before the work, not replaced by a file nor written into
    refused("generate", "--person", real_file, "--prompt", "[V]", "-o", fifo["out.png"], **here)
    refused("export", real_file, "-o", fifo["out.safetensors"], base=False, **here)
    refused("personalize", PHOTO, "-o", fifo["out.safetensors"], **here)
    refused("personalize", PHOTO, "-o", out, "--save-face", fifo["out.png"], **here)
    with socket.socket(socket.AF_UNIX) as listening:
        listening.bind(str(tmp_path / "socket.safetensors"))
        refused("export", real_file, "-o", tmp_path / "socket.safetensors", base=False, **here)
    assert all(stat.S_ISFIFO(path.stat().st_mode) for path in fifo.values())
    assert not out.exists() and not (tmp_path / "lora.safetensors").exists()

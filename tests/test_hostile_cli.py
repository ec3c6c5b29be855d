"""What a careless or hostile user gives the library and the CLI, beyond the app (issue #33).

Personal files with strings of any length, prompts that grow when [V] is replaced or hold text that is not
Unicode, huge numbers, a full disk: each is one clear line (an HdbError; `error: ...` on the command line).
"""

import errno
import os
from pathlib import Path

import pytest
from helpers import assert_one_line_error, hdb_in_process, trained_person
from safetensors import safe_open
from safetensors.torch import save_file

from hdb.config import MAX_SEED, HypernetTrainConfig, PersonalizeConfig, PreoptimizeConfig, value_problem
from hdb.errors import HdbError
from hdb.models import build_tiny_pipeline
from hdb.personal_file import PersonalWeights, load_personal, save_personal
from hdb.styles import check_prompt, expand_prompt


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


# ----------------------------------------------------------------------------- 4. a full disk


def full_disk_for(name: str, monkeypatch) -> None:
    """Writes of files whose name starts with `name` (their partial too) fail as on a full disk."""
    write_bytes = Path.write_bytes

    def full(path: Path, data: bytes) -> int:
        if path.name.startswith(name):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return write_bytes(path, data)

    monkeypatch.setattr(Path, "write_bytes", full)


def test_a_full_disk_during_an_export_is_one_line(real_file, tmp_path, capsys, monkeypatch):
    full_disk_for("lora.safetensors", monkeypatch)
    for format in ("diffusers", "kohya"):
        result = hdb_in_process(capsys, "export", real_file, "--format", format, "-o", tmp_path / "lora.safetensors")
        assert_one_line_error(result, "Could not write", "lora.safetensors: No space left on device")
        assert not list(tmp_path.glob("lora.safetensors*"))

"""`python -m hdb` for the foundation: help, tiny-model, base loading, info, export, clear errors in its terms."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import assert_one_line_error, hdb_in_process, trained_person
from helpers import hdb_cli as hdb

from hdb.errors import HdbError
from hdb.models import load_pipeline
from hdb.personal_file import PersonalWeights, save_personal
from hdb.terms import app_terms, cli_terms, for_visitors


def test_help_lists_the_subcommands():
    out = hdb("--help").stdout
    for command in ("tiny-model", "info", "export"):
        assert command in out


def test_tiny_model_is_loaded_by_the_real_loader(tmp_path):
    hdb("tiny-model", tmp_path / "tiny", "--arch", "sdxl")
    pipe = load_pipeline(str(tmp_path / "tiny"), dtype="fp32", device="cpu")
    assert type(pipe).__name__ == "StableDiffusionXLPipeline"
    image = pipe("a photo of sks person", num_inference_steps=2, height=64, width=64, output_type="pil").images[0]
    assert image.size == (64, 64)


def test_offline_hub_id_gives_a_clear_error():
    with pytest.raises(HdbError, match=r"`hf download stable-diffusion-v1-5/.*pass `base=DIR`.*save_tiny_pipeline"):
        load_pipeline("stable-diffusion-v1-5/stable-diffusion-v1-5", device="cpu")
    with pytest.raises(HdbError, match="model_index.json"):
        load_pipeline(os.path.dirname(__file__), device="cpu")


def test_half_precision_loads_the_fp16_variant_and_pickles_are_refused(tiny_sd15, tmp_path):
    tiny_sd15.save_pretrained(tmp_path / "fp16_only", variant="fp16")  # as SD1.5's fp16 files, alone
    for dtype in ("fp16", "bf16"):
        pipe = load_pipeline(str(tmp_path / "fp16_only"), dtype=dtype, device="cpu")
        assert pipe.unet.dtype == {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    tiny_sd15.save_pretrained(tmp_path / "plain")  # no fp16 variant: the full-precision files, cast
    assert load_pipeline(str(tmp_path / "plain"), dtype="fp16", device="cpu").unet.dtype == torch.float16
    tiny_sd15.save_pretrained(tmp_path / "pickled", safe_serialization=False)
    with pytest.raises(HdbError, match="no file named diffusion_pytorch_model.safetensors"):
        load_pipeline(str(tmp_path / "pickled"), dtype="fp32", device="cpu")


def test_info_and_export_through_the_cli(tiny_sd15, tmp_path):
    path = save_personal(
        PersonalWeights.from_lidb(trained_person(tiny_sd15), "a photo of zxq person"), tmp_path / "p.safetensors"
    )
    info = hdb("info", path).stdout
    assert "zxq" in info and "r=1 a=100 b=50" in info
    out = hdb("export", path, "--format", "kohya", "-o", tmp_path / "k.safetensors").stdout
    assert "kohya LoRA written" in out and (tmp_path / "k.safetensors").is_file()


def test_cli_errors_are_one_line(tmp_path, capsys):
    (tmp_path / "junk.safetensors").write_bytes(os.urandom(300))
    assert_one_line_error(hdb("info", tmp_path / "junk.safetensors", check=False), "truncated or corrupt")
    assert_one_line_error(hdb_in_process(capsys, "info", tmp_path / "nope.safetensors"), "not found")
    out = tmp_path / "x.safetensors"
    assert_one_line_error(hdb_in_process(capsys, "export", tmp_path / "junk.safetensors", "-o", out), "corrupt")


def test_the_cli_shows_a_setting_the_library_names_as_its_flag(monkeypatch, capsys):
    from hdb import cli
    from hdb.personalize import MEMORY_OPTIONS

    def out_of_memory(args):
        raise HdbError(f"The GPU ran out of memory while finetuning. Lower memory with {MEMORY_OPTIONS}.")

    monkeypatch.setattr(cli, "quiet_libraries", lambda: None)  # it sets this process's environment
    monkeypatch.setattr(cli, "cmd_info", out_of_memory)
    assert cli.main(["info", "any.safetensors"]) == 1
    assert capsys.readouterr().err == (
        "error: The GPU ran out of memory while finetuning. Lower memory with --gradient-checkpointing, "
        "--optimizer adamw8bit, --dtype fp16, a lower --resolution, or a smaller base model.\n"
    )


@pytest.mark.parametrize(
    ("library", "command_line"),
    [
        ("`device='cuda'` was asked for; use `device='cpu'`", "--device cuda was asked for; use --device cpu"),
        ("a smaller `batch_size` with `accumulation_steps`", "a smaller --batch-size with --accumulation-steps"),
        ("`beta` > 0 needs `weights_dir`; or set `beta=0`", "--beta > 0 needs --weights; or set --beta 0"),
        ("`relaxed_rank`, `learning_rate`, `freeze_encoder=False`", "--rank, --lr, --train-encoder"),
        ("`hdb.models.save_tiny_pipeline(DIR)` writes one", "`python -m hdb tiny-model DIR` writes one"),
        ("`hf download a/b --local-dir DIR`, `preoptimize`", "`hf download a/b --local-dir DIR`, `preoptimize`"),
    ],
)
def test_cli_terms_turn_settings_into_flags_and_leave_the_rest(library, command_line):
    assert cli_terms(library) == command_line


def test_app_terms_offer_the_demos_switch_for_the_tiny_pipeline():
    message = "then pass `base=DIR`. Or a tiny pipeline: `hdb.models.save_tiny_pipeline(DIR)`."
    assert app_terms(message) == "then pass --base DIR. Or a tiny pipeline: `--tiny`."


def test_an_offline_start_says_what_to_do_in_one_last_line(tmp_path):
    """Without a network and without a downloaded base: the demo names its own switches, the CLI its command;
    and no third-party chatter comes before it."""
    environment = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), GRADIO_ANALYTICS_ENABLED="False")
    root = Path(__file__).resolve().parent.parent
    photo = str(root / "assets" / "obama.jpg")
    for command, advice in (
        (["app.py"], ("--base DIR", "`--tiny`")),
        (["-m", "hdb", "personalize", photo, "-o", str(tmp_path / "p.safetensors")], ("--base DIR", "tiny-model DIR")),
    ):
        run = subprocess.run([sys.executable, *command], cwd=root, env=environment, capture_output=True, text=True)
        lines = (run.stdout + run.stderr).strip().splitlines()
        assert run.returncode != 0 and len(lines) == 1, lines
        assert all(words in lines[-1] for words in ("hf download", *advice)), lines[-1]


def test_every_memory_advice_names_settings_the_cli_has():
    from hdb import personalize, preoptimize, train_hypernet

    for module in (personalize, preoptimize, train_hypernet):
        assert "`" in module.MEMORY_OPTIONS and "`" not in cli_terms(module.MEMORY_OPTIONS), module.__name__


def test_visitors_are_spared_advice_about_settings_they_cannot_change():
    from hdb.personalize import MEMORY_OPTIONS

    message = f"The GPU ran out of memory while finetuning. Lower memory with {MEMORY_OPTIONS}."
    assert for_visitors(message) == "The GPU ran out of memory while finetuning."
    assert for_visitors("Unknown style 'x'. Choose one of A, B.") == "Unknown style 'x'. Choose one of A, B."


def test_resolve_dtype_refuses_unknown_names():
    from hdb.devices import resolve_dtype

    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    with pytest.raises(HdbError, match="Unknown dtype"):
        resolve_dtype("fp8", torch.device("cpu"))


def test_auto_dtype_is_bf16_only_where_the_gpu_computes_it_natively(monkeypatch):
    from hdb.devices import resolve_dtype

    cuda = torch.device("cuda")
    for capability, expected in [((7, 5), torch.float16), ((7, 0), torch.float16), ((8, 0), torch.bfloat16),
                                 ((8, 9), torch.bfloat16), ((9, 0), torch.bfloat16)]:  # fmt: skip
        # T4 (sm_75) and V100 (sm_70) emulate bf16 slowly; A100, L4 and H100 have it
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)  # what a T4 says too
        assert resolve_dtype("auto", cuda) == expected, capability
    assert resolve_dtype("fp16", cuda) == torch.float16  # an explicit choice stands

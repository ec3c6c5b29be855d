"""Evaluation (paper's Table 1): face similarity on real photos, CLIP/DINO with tiny random models, `hdb eval`."""

import itertools
import json
import shutil
import types

import numpy as np
import pytest
import torch
from helpers import ASSETS, assert_one_line_error, trained_person
from helpers import hdb_cli as hdb
from PIL import Image

from hdb.config import DecoderConfig, PersonalizeConfig
from hdb.errors import HdbError
from hdb.evaluate import Evaluator, _mean_row, find_people, identity_matrix, identity_similarity

OBAMAS = ["obama.jpg", "obama2.jpg", "obama3.jpg"]
OTHERS = ["biden.jpg", "astronaut.png", "grace_hopper.jpg"]


@pytest.fixture(scope="module")
def tiny_metric_models(tmp_path_factory):
    """A tiny random CLIP (real tokenizer files) and a tiny ViT standing in for DINO, saved as the hub has them."""
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        CLIPTokenizer,
        ViTConfig,
        ViTImageProcessor,
        ViTModel,
    )

    from hdb.models import TOKENIZER_DIR

    root = tmp_path_factory.mktemp("metric_models")
    torch.manual_seed(0)
    small = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)
    text = dict(
        vocab_size=49408,
        max_position_embeddings=77,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
        **small,
    )
    CLIPModel(
        CLIPConfig(text_config=text, vision_config=dict(image_size=32, patch_size=8, **small), projection_dim=16)
    ).save_pretrained(root / "clip")
    tokenizer = CLIPTokenizer(str(TOKENIZER_DIR / "vocab.json"), str(TOKENIZER_DIR / "merges.txt"), model_max_length=77)
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(root / "clip")
    ViTModel(ViTConfig(image_size=32, patch_size=8, **small)).save_pretrained(root / "dino")
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(root / "dino")
    return root / "clip", root / "dino"


def test_face_similarity_tells_obama_from_other_people():
    matrix = identity_matrix({name: ASSETS / name for name in OBAMAS + OTHERS})
    assert len(matrix) == 6 * 5 and matrix[("obama.jpg", "biden.jpg")] == matrix[("biden.jpg", "obama.jpg")]
    same = [matrix[pair] for pair in itertools.combinations(OBAMAS, 2)]
    different = [matrix[(a, b)] for a in OBAMAS for b in OTHERS]
    assert min(same) > max(different), (same, different)
    assert identity_similarity(ASSETS / "obama.jpg", ASSETS / "obama2.jpg") == pytest.approx(
        matrix[("obama.jpg", "obama2.jpg")], abs=1e-6
    )


def test_image_without_a_face_scores_none_and_counts_as_not_detected(obama_face):
    assert identity_similarity(obama_face, ASSETS / "landscape.jpg") is None
    evaluator = Evaluator()  # no CLIP / DINO: face similarity only
    reference = evaluator.reference(obama_face)
    samples = [evaluator.score(reference, ASSETS / name, "[V]") for name in ("obama2.jpg", "landscape.jpg")]
    assert set(samples[0]) == {"face_rec"} and samples[0]["face_rec"] > 0.9 and samples[1]["face_rec"] is None
    row = _mean_row("obama", samples)
    assert row["face_detected"] == 0.5 and row["face_rec"] == pytest.approx(samples[0]["face_rec"])
    with pytest.raises(HdbError, match="No face found in landscape.jpg"):  # the reference itself must show a face
        evaluator.reference(ASSETS / "landscape.jpg")


def test_clip_and_dino_scores(tiny_metric_models, obama_face):
    clip, dino = tiny_metric_models
    evaluator = Evaluator(clip=str(clip), dino=str(dino))
    reference = evaluator.reference(obama_face)
    scores = evaluator.score(reference, ASSETS / "astronaut.png", "[V] as an astronaut on the moon")
    assert set(scores) == {"face_rec", "dino", "clip_i", "clip_t"}
    assert all(-1 <= value <= 1 for value in scores.values()), scores
    identical = evaluator.score(reference, obama_face.image, "a portrait of [V]")
    assert identical["clip_i"] == pytest.approx(1.0, abs=1e-4) and identical["dino"] == pytest.approx(1.0, abs=1e-4)
    assert identical["face_rec"] > 0.99


def test_missing_metric_models_are_clear_errors(tmp_path):
    with pytest.raises(HdbError, match="does not exist"):
        Evaluator(clip=str(tmp_path / "no_clip")).load()
    with pytest.raises(HdbError, match="Could not load DINO model 'nobody/no-such-dino'"):  # offline in tests
        Evaluator(dino="nobody/no-such-dino").load()
    (tmp_path / "empty").mkdir()
    with pytest.raises(HdbError, match="Could not load CLIP"):
        Evaluator(clip=str(tmp_path / "empty")).load()


def test_people_directory_pairs_files_with_photos(tmp_path):
    (tmp_path / "ann.safetensors").touch()
    (tmp_path / "ann.png").touch()
    (tmp_path / "bob.safetensors").touch()
    with pytest.raises(HdbError, match="bob.safetensors has no reference photo"):
        find_people(tmp_path)
    (tmp_path / "bob.jpg").touch()
    assert find_people(tmp_path) == {
        name: (tmp_path / f"{name}.{ext}", tmp_path / f"{name}.safetensors")
        for name, ext in (("ann", "png"), ("bob", "jpg"))
    }


def test_cli_eval_end_to_end(tiny_sd15_dir, tiny_metric_models, tmp_path):
    from hdb.lidb import LiDBConfig
    from hdb.models import build_tiny_pipeline
    from hdb.personal_file import PersonalWeights, save_personal

    # Random LiDB weights stand in for personalised people (how they were trained does not matter here).
    # Ranks 4 then 1 (sorted by name): the shared LiDB must also take a lower-rank file after a higher one.
    people, pipe = tmp_path / "people", build_tiny_pipeline("sd15")
    for seed, (name, rank) in enumerate((("biden", 4), ("obama", 1))):
        lidb = trained_person(pipe, seed, LiDBConfig(rank=rank))
        save_personal(PersonalWeights.from_lidb(lidb), people / f"{name}.safetensors")
        lidb.unload()
        shutil.copy(ASSETS / f"{name}.jpg", people / f"{name}.jpg")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# two prompts\n[V] as an astronaut\n\na portrait of [V]\n")
    clip, dino = tiny_metric_models
    out = tmp_path / "out"
    stdout = hdb(
        "eval",
        "--base",
        tiny_sd15_dir,
        "--people",
        people,
        "--prompts",
        prompts,
        "--clip",
        clip,
        "--dino",
        dino,
        "--out",
        out,
        "--steps",
        "2",
        "--device",
        "cpu",
    ).stdout
    print(stdout)
    header = "| Person | Face Rec. | DINO | CLIP-I | CLIP-T | Face detected |"
    assert header in stdout and (out / "table.md").read_text().startswith(header)
    results = json.loads((out / "results.json").read_text())
    assert [row["name"] for row in results["rows"]] == ["biden", "obama", "all"]
    assert len(results["samples"]) == 4 and results["prompts"] == ["[V] as an astronaut", "a portrait of [V]"]
    for row in results["rows"]:  # each row averages its samples (all of them for "all"); the scores are not clamped
        mine = [x for x in results["samples"] if row["name"] in ("all", x["person"])]
        for key in ("clip_i", "clip_t", "dino"):
            assert row[key] == pytest.approx(sum(x[key] for x in mine) / len(mine))
    assert 0 <= results["rows"][-1]["face_detected"] <= 1
    assert Image.open(out / "grid.jpg").size == (3 * 64, 2 * 64)  # reference + 2 prompts, 2 people

    (people / "obama.jpg").unlink()
    assert_one_line_error(
        hdb("eval", "--base", tiny_sd15_dir, "--people", people, check=False), "obama.safetensors", "no reference photo"
    )


def test_cli_eval_runs_the_papers_protocol(tiny_sd15_dir, tiny_metric_models, tmp_path):
    """--photos: each person personalised from one photo by each of the paper's rows, each row scored alike."""
    from hdb.hypernet import HyperNetwork, build_tiny_image_encoder
    from hdb.lidb import LiDB
    from hdb.models import load_pipeline

    pipe = load_pipeline(str(tiny_sd15_dir), "fp32", "cpu")
    with LiDB.attached(pipe) as lidb:
        for folder, iterations in (("hypernet", 4), ("hypernet_k1", 1)):
            decoder = DecoderConfig(width=32, depth=2, heads=4, iterations=iterations)
            net = HyperNetwork.for_lidb(lidb, build_tiny_image_encoder(), "tiny", decoder=decoder)
            net.save_pretrained(tmp_path / folder)
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("biden", "obama"):
        shutil.copy(ASSETS / f"{name}.jpg", photos / f"{name}.jpg")
    (tmp_path / "prompts.txt").write_text("a portrait of [V]\n[V] as an astronaut\n")
    clip, dino = tiny_metric_models
    args = ["eval", "--base", tiny_sd15_dir, "--photos", photos, "--hypernet", tmp_path / "hypernet", "--clip", clip,
            "--dino", dino, "--prompts", tmp_path / "prompts.txt", "--steps", "2", "--device", "cpu"]  # fmt: skip
    out = tmp_path / "out"
    stdout = hdb(*args, "--hypernet-k1", tmp_path / "hypernet_k1", "--dreambooth-steps", "3", "--out", out).stdout
    table = (out / "table.md").read_text().splitlines()
    assert table[0] == "| Method | Face Rec. | DINO | CLIP-I | CLIP-T | Face detected |" and table[0] in stdout
    assert [row.split(" | ")[0] for row in table[2:]] == [
        "| No Hyper (fast finetune from zero, 40 steps)",
        "| Only Hyper (the prediction alone)",
        "| k=1 (hypernetwork trained with s=1 + 40 steps)",
        "| HyperDreamBooth (prediction + 40 steps)",
        "| DreamBooth-LoRA (rank 4 from zero, 3 steps)",
    ]
    for number in range(1, 6):  # each row: one image per person x prompt, scored
        results = json.loads((out / f"method{number}" / "results.json").read_text())
        assert len(results["samples"]) == 4 and [r["name"] for r in results["rows"]] == ["biden", "obama", "all"]
        assert all(s["clip_t"] is not None and s["dino"] is not None for s in results["samples"])
    # without a k=1 hypernetwork and with no DreamBooth row: the three others; without --hypernet: refused
    hdb(*args, "--dreambooth-steps", "0", "--clip", "none", "--dino", "none", "--out", tmp_path / "out2")
    assert len((tmp_path / "out2" / "table.md").read_text().splitlines()) == 2 + 3
    assert "| - | - |" in (tmp_path / "out2" / "table.md").read_text()  # no CLIP, no DINO: their columns empty
    no_hypernet = [a for a in args if a not in ("--hypernet", tmp_path / "hypernet")]
    assert_one_line_error(hdb(*no_hypernet, check=False), "compares a trained hypernetwork: give --hypernet")


def test_each_row_of_the_papers_protocol_starts_where_the_paper_says(tiny_sd15, monkeypatch):
    """No Hyper and DreamBooth-LoRA start from zero, k=1 from its own hypernetwork's prediction, Only Hyper and the
    full method from the main one's, each with its steps and learning rate: rows that all started from the main
    prediction (and so measured nothing but the step count) fail here."""
    from hdb import evaluate
    from hdb.config import STEPS_WITH_HYPERNET
    from hdb.hypernet import HyperNetwork, build_tiny_image_encoder
    from hdb.lidb import LiDB
    from hdb.pipeline import PersonalPipeline

    with LiDB.attached(tiny_sd15) as lidb:
        main, k1 = (
            HyperNetwork.for_lidb(lidb, build_tiny_image_encoder(), "tiny", seed,
                                  DecoderConfig(width=32, depth=2, heads=4, iterations=iterations))
            for seed, iterations in ((0, 4), (1, 1))
        )  # fmt: skip
        for net in (main, k1):
            with torch.no_grad():
                net.head.normal_(0, 0.05, generator=torch.Generator().manual_seed(0))  # predictions apart from 0
    personal = PersonalPipeline(tiny_sd15, main)
    started = {}  # row -> (start as resolved, steps, learning rate)

    def personalize(face, run, start=None):
        resolved = start if start is not None else main.predict(face.image)
        started.setdefault(run.steps, []).append((resolved, run.learning_rate))
        return types.SimpleNamespace(weights=None)

    monkeypatch.setattr(personal, "personalize", personalize)
    monkeypatch.setattr(evaluate, "evaluate", lambda *args, **kwargs: None)
    photo = ASSETS / "obama.jpg"
    results = evaluate.paper_protocol(personal, {"obama": photo}, ["[V]"], None, hypernet_k1=k1, dreambooth_steps=3)
    assert len(results) == 5
    face = personal.faces(photo)[0]
    zero, predicted, predicted_k1 = (
        personal.lidb.own.initial_weights(),
        main.predict(face.image),
        k1.predict(face.image),
    )
    assert not torch.allclose(predicted[0], predicted_k1[0]) and not torch.allclose(predicted[1], zero[1])
    lr = PersonalizeConfig.learning_rate
    expected = {  # steps -> each row's start and learning rate, in the table's order
        STEPS_WITH_HYPERNET: [(zero, lr), (predicted_k1, lr), (predicted, lr)],  # No Hyper, k=1, full
        0: [(predicted, lr)],  # Only Hyper
        3: [(zero, evaluate.DREAMBOOTH_LORA_LR)],  # DreamBooth-LoRA
    }
    assert started.keys() == expected.keys()
    for steps, rows in expected.items():
        for (start, lr_used), (want, want_lr) in zip(started[steps], rows, strict=True):
            assert lr_used == want_lr
            torch.testing.assert_close(start, want)


def test_one_lidb_serves_people_of_any_rank():
    """evaluate reuses one LiDB across people: a rank-1 file after a rank-4 one must give its own image."""
    import torch

    from hdb.generate import generate
    from hdb.lidb import LiDBConfig
    from hdb.models import build_tiny_pipeline
    from hdb.personal_file import PersonalWeights
    from hdb.pipeline import PersonalPipeline

    pipe = build_tiny_pipeline("sd15")
    lidb = trained_person(pipe, 0, LiDBConfig(rank=1))
    rank1 = PersonalWeights.from_lidb(lidb)
    reference = np.asarray(generate(pipe, lidb, "a photo of sks person", steps=2)[0])
    lidb.start_from(lidb.A_train.detach().clone(), lidb.B_train.detach().clone(), 4)
    with torch.no_grad():
        lidb.B_train.normal_(0, 0.3)
    rank4 = PersonalWeights.from_lidb(lidb)
    lidb.unload()
    personal = PersonalPipeline(pipe, lidb_config=LiDBConfig(rank=1))
    lidb = personal.lidb
    personal.use(rank4)
    other = np.asarray(generate(pipe, lidb, "a photo of sks person", steps=2)[0])
    personal.use(rank1)
    again = np.asarray(generate(pipe, lidb, "a photo of sks person", steps=2)[0])
    assert lidb.config.rank == 1
    assert np.array_equal(reference, again) and not np.array_equal(reference, other)

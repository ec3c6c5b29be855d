"""The toy experiment (`python -m hdb toy --quick`): synthetic people, every stage through hdb, held-out losses."""

import json
import shutil
from dataclasses import asdict, replace

import numpy as np
import pytest
import torch
from diffusers import AutoencoderTiny
from helpers import TINY_DECODER

from hdb.cli import build_parser, cmd_toy
from hdb.config import PersonalizeConfig
from hdb.diffusion import encode_images, to_pixels
from hdb.errors import HdbError
from hdb.hypernet import HyperNetwork, build_tiny_image_encoder
from hdb.lidb import LiDB
from hdb.models import build_tiny_pipeline
from hdb.toy.experiment import (
    ToyConfig,
    calibrate_latents,
    crowd_in_context,
    evaluate_methods,
    in_forked_workers,
    method_labels,
    pretrain_base,
    run_toy,
)
from hdb.toy.pictures import CONTEXTS, Recogniser
from hdb.toy.report import summarise_seeds, with_memorisers
from hdb.toy.scores import (
    MEMORISERS,
    bootstrap_interval,
    identification,
    memoriser_rows,
    pixel_distances,
    seed_level_interval,
)
from hdb.toy.world import SIZE, identity_traits, sample_people


def test_people_are_reproducible_and_renders_vary():
    people = sample_people(0, 1, 3, 3, 1, "p")
    again = sample_people(0, 1, 5, 3, 1, "p")  # person i depends on (seed, role, i) only, not on how many are drawn
    assert people[1].identity == again[1].identity
    assert np.array_equal(np.asarray(people[1].photos[0]), np.asarray(again[1].photos[0]))
    photo = people[0].photos[0]
    assert photo.size == (SIZE, SIZE) and photo.mode == "RGB"
    pixels = [np.asarray(p, dtype=np.float32) for p in people[0].photos]
    assert np.abs(pixels[0] - pixels[1]).mean() > 1  # jittered: no two renders of a person are the same
    assert sample_people(1, 1, 1, 1, 0, "p")[0].identity != people[0].identity


def test_a_trained_autoencoder_tiny_serves_as_the_toys_vae():
    """The drawing probe's VAE (scripts/toy_drawing_probe.py): an AutoencoderTiny, which has no posterior, encodes
    through the pipeline (its one encoding times its scaling factor) and calibrates to unit-variance latents; the
    crowd's renders alternate between the two contexts, the black-and-white ones grey."""
    renders, contexts = crowd_in_context(sample_people(0, 0, 3, 2, 0, "crowd"))
    assert contexts.tolist() == [0, 1, 0, 1, 0, 1]
    grey = [np.ptp(np.asarray(r, dtype=np.int16), axis=2).max() for r in renders]  # channel spread per pixel
    assert all(spread == 0 for spread in grey[1::2]) and all(spread > 0 for spread in grey[::2])
    pipe = build_tiny_pipeline("sd15")
    pipe.vae = AutoencoderTiny(
        encoder_block_out_channels=(8,) * 4, decoder_block_out_channels=(8,) * 4, scaling_factor=0.5,
        num_encoder_blocks=(1, 1, 1, 1), num_decoder_blocks=(1, 1, 1, 1),
    )  # fmt: skip
    pixels = to_pixels(renders)
    with torch.no_grad():
        own = pipe.vae.encode(pixels).latents
    assert torch.allclose(encode_images(pipe, pixels), own * 0.5)
    latents, factor = calibrate_latents(pipe, renders)
    assert latents.shape == (6, 4, 8, 8) and latents.std().item() == pytest.approx(1.0, abs=1e-4)
    assert factor == pytest.approx(0.5 / (own * 0.5).std().item(), rel=1e-4)


def test_caption_dropout_shows_the_base_the_empty_prompt():
    """`pretrain_unconditional`: the share of the base's renders shown the empty prompt instead of their context's
    (what classifier-free guidance needs). All of them: the contexts no longer matter; none: they do."""
    latents, contexts = torch.randn(6, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.arange(6) % 2

    def losses(share: float, swapped: bool = False) -> list[float]:
        config = ToyConfig(pretrain_steps=4, pretrain_batch=4, pretrain_unconditional=share)
        return pretrain_base(build_tiny_pipeline("sd15", 0), latents, 1 - contexts if swapped else contexts, config,
                             seed=0, progress=False)  # fmt: skip

    unconditional, conditional = losses(1.0), losses(0.0)
    assert losses(1.0, swapped=True) == unconditional
    assert losses(0.0, swapped=True) != conditional and unconditional != conditional
    assert losses(0.0) == conditional  # reproducible: the comparisons above are the prompts', not chance's


def test_cli_wiring(tmp_path):
    args = build_parser().parse_args(["toy", "--quick", "--out", str(tmp_path), "--seed", "3"])
    assert args.run is cmd_toy and args.quick and args.seed == 3 and args.out == tmp_path
    args = build_parser().parse_args(["toy", "--paper-variants", "--summarise", str(tmp_path)])
    assert args.paper_variants and args.summarise == tmp_path and args.out is None


def test_scoring_in_two_workers_gives_the_same_scores(tiny_sd15):
    # the people shared out among forked processes: every loss, percentage, guard stop and sample as in one process
    with LiDB.attached(tiny_sd15) as lidb:
        hypernets = {"s": HyperNetwork.for_lidb(lidb, build_tiny_image_encoder(), "tiny", decoder=TINY_DECODER)}
    config = ToyConfig(test_identities=3, eval_renders=2, eval_draws=2, finetune_steps=2, long_finetune_steps=2,
                       dreambooth_steps=2, other_people=2, sample_steps=2, upper_bound_renders=0,
                       ablation=False)  # fmt: skip
    test, others = sample_people(0, 2, 3, 1, 2, "t"), sample_people(0, 3, 2, 0, 2, "o")
    recogniser = Recogniser(len(identity_traits(test[0].identity)))  # untrained: the same readings in any process
    alone, shared = (
        evaluate_methods(tiny_sd15, hypernets, None, recogniser, test, others, config, seed=0, progress=False,
                         workers=workers)
        for workers in (1, 2)
    )  # fmt: skip
    assert alone.losses == shared.losses and len(alone.losses["hyper_ft_lora"]) == 3
    assert alone.other_people == shared.other_people and alone.in_context == shared.in_context
    assert alone.stops == shared.stops and alone.pictures == shared.pictures
    assert len(alone.pictures["hyper"]) == 3 and np.array(alone.pictures["hyper"][0].distances).shape == (2, 3)
    pictures, again = ([[np.asarray(image) for image in row] for row in run.samples] for run in (alone, shared))
    # two people, each a row per context: the photo (in colour, then in grey) + SAMPLED_METHODS' first pictures
    assert len(pictures) == 4 and all(len(row) == 1 + 6 for row in pictures)
    assert np.array_equal(np.stack(pictures), np.stack(again))
    assert np.array_equal(pictures[0][1], pictures[2][1])  # the base draws alike for both, not the last model left
    assert not np.array_equal(pictures[0][1], pictures[1][1])  # ... and another picture for the other prompt


def test_a_workers_error_reaches_the_caller():
    def work(i: int) -> int:
        if i == 3:
            raise ValueError("person 3 is broken")
        return i * i

    with pytest.raises(HdbError, match="person 3 is broken"):
        in_forked_workers(work, 5, 2)
    assert in_forked_workers(lambda i: i * i, 5, 2) == [0, 1, 4, 9, 16]


def test_matching_the_photos_pixels_identifies_few():
    # the memorising baseline the toy reports: the renders' light varies so much that it identifies few people
    # (6 of these 48, AUC 0.756; the calibration in docs/TOY.md); the same photos in the previous world: 16
    people = sample_people(0, 2, 48, 1, 4, "t")
    ranks = identification(pixel_distances(people))
    assert (ranks["rank"] == 1).sum() <= 48 / 6 and ranks["auc"].mean() < 0.8


def test_seed_level_intervals_hold_the_seeds_variance():
    people = np.random.default_rng(0).normal(0, 1, (3, 48))
    alike = [people[s] for s in range(3)]  # three seeds of the same mean
    apart = [people[s] + 2 * s for s in range(3)]  # three seeds whose means differ: the training's variance
    width = [high - low for low, high in (seed_level_interval(alike), seed_level_interval(apart))]
    assert width[1] > 3 * width[0]
    pooled = bootstrap_interval(np.concatenate(apart))  # resampling the people alone misses it
    assert width[1] > 3 * (pooled[1] - pooled[0])


def test_a_run_without_the_light_normalised_memoriser_gets_it_from_its_world():
    config = ToyConfig(test_identities=6, eval_renders=3, upper_bound_renders=2)
    people = sample_people(4, 2, config.test_identities, 1, config.eval_renders, "test", config.upper_bound_renders)
    rows = memoriser_rows(people)
    run = {"seed": 4, "config": asdict(config), "held_out": [p.identity.name for p in people],
           "methods": {"pixel_nn": rows["pixel_nn"], "base": {"people": 6}}}  # fmt: skip
    completed = with_memorisers(run)
    assert list(completed["methods"]) == ["pixel_nn", "pixel_nn_standardised", "base"]
    assert completed["methods"]["pixel_nn_standardised"] == rows["pixel_nn_standardised"]
    assert completed["memorisers_recomputed"] and with_memorisers(completed) is completed
    with pytest.raises(ValueError, match="seed 5's world is not the one its results were made in"):
        with_memorisers({**run, "seed": 5})


def test_identification_ranks_and_intervals():
    matrix = np.array([[1.0, 5.0, 2.0], [2.0, 1.0, 0.5], [3.0, 0.0, 1.0]])  # [k, j]: j's renders, k's model
    ranks = identification(matrix)
    assert ranks["rank"].tolist() == [1, 2, 2] and ranks["auc"].tolist() == [1.0, 0.5, 0.5]
    low, high = bootstrap_interval(np.array([0.0, 1.0] * 50))
    assert 0.35 < low < 0.5 < high < 0.65
    assert bootstrap_interval(np.ones(10)) == (1.0, 1.0)


def test_every_row_of_the_table_runs_and_files_are_written(tmp_path):
    # a miniature of the full run with every option (ablation, s=1, beta=0, the paper's variants and recipe, the
    # upper bound)
    config = ToyConfig(
        pretrain_identities=20,
        pretrain_steps=20,
        train_identities=8,
        preopt_steps=5,
        hyper_steps=10,
        test_identities=3,
        eval_renders=2,
        eval_draws=2,
        finetune_steps=3,
        long_finetune_steps=5,
        dreambooth_steps=4,
        other_people=2,
        upper_bound_renders=2,
        sample_steps=2,
        vae_steps=3,
        recogniser_steps=3,
        compare_s1=True,
        compare_beta0=True,
        paper_variants=True,
        paper_recipe=True,
    )
    folder = tmp_path / "seed1"
    results = run_toy(folder, config=config, seed=1, progress=False)
    for name in ("results.json", "results.md", "losses.png", "renders.jpg", "samples.jpg"):
        assert (folder / name).stat().st_size > 0
    methods = results["methods"]
    assert list(methods) == [*MEMORISERS, "photo_copy", *method_labels(config)] and len(methods) == 3 + 21 + 1 + 3 * 2
    assert methods["hyper_k1"]["matrix"] != methods["hyper"]["matrix"]  # the s=4 network read at k=1 is another
    assert all(np.array(m["matrix"]).shape == (3, 3) for m in methods.values() if "matrix" in m)  # model x person
    assert len(results["losses"]["vae"]) == 3  # the VAE was trained (a step a loss)
    for name in ["photo_copy", *method_labels(config)]:  # every model drew its person, judged in both contexts
        pictures = methods[name]["pictures"]
        assert len(pictures["in_context_per_person"]) == 3 and len(pictures["diversity"]) == 2
        identified = [np.array(pictures[c]["matrix"]).shape == (3, 3) for c in CONTEXTS if c in pictures]
        assert identified == ([] if name == "base" else [True, True])  # one model for everyone identifies no one
    assert json.loads((folder / "results.json").read_text())["methods"].keys() == methods.keys()
    table = (folder / "results.md").read_text()
    assert all(m["label"] in table for m in methods.values())
    picture_rows = table[table.index("| method | identified, photo") :].splitlines()
    assert len([row for row in picture_rows if row.startswith("| ") and "---" not in row]) == 2 + len(
        method_labels(config)
    )
    assert all(len(m["other_people_pct"]) == 2 and len(m["in_context_per_person"]) == 3 for m in methods.values()
               if "per_person" in m)  # fmt: skip
    summary = summarise_seeds(tmp_path)
    assert summary == (tmp_path / "summary.md").read_text() and "The toy, seed 1: 3 held-out people in all" in summary
    assert "| relaxation with the hypernetwork: lidb - lora |" in summary
    assert "| the paper's concatenated input - hdb's cross-attention |" in summary
    memorising = next(line for line in summary.splitlines() if line.startswith("| upper bound (8 renders) - the photo"))
    assert memorising.endswith(" | - | - |")  # the pixel baseline has an AUC, no margin or editability


def test_a_stopped_run_resumes_where_it_stopped_with_the_same_results(tmp_path):
    config = ToyConfig(
        pretrain_identities=12, vae_steps=3, pretrain_steps=4, recogniser_steps=3, train_identities=4, preopt_steps=3,
        preopt_group=2, hyper_steps=4, test_identities=3, eval_renders=2, eval_draws=2, finetune_steps=2,
        long_finetune_steps=0, dreambooth_steps=0, other_people=2, upper_bound_renders=0, sample_steps=2,
        ablation=False,
    )  # fmt: skip
    run_toy(tmp_path, config=config, seed=2, progress=False)
    work, whole = tmp_path / "work", json.loads((tmp_path / "results.json").read_text())
    sheet = (tmp_path / "samples.jpg").read_bytes()
    # as if stopped in stage 1 after its first group of 2 people (what follows is redone), ...
    for path in sorted((work / "preopt" / "weights").glob("*.safetensors"))[2:]:
        path.unlink()
    shutil.rmtree(work / "hypernet_s")
    shutil.rmtree(work / "scores")
    run_toy(tmp_path, config=config, seed=2, progress=False, resume=True)
    resumed = json.loads((tmp_path / "results.json").read_text())
    assert resumed["resumed"] and resumed["methods"] == whole["methods"]
    assert resumed["losses"] == whole["losses"]  # the base's, the recogniser's, stage 1's from its log, stage 2's
    # ... and while scoring: person 1 not begun, person 0 half way (no "done"): both made again, person 2 read back
    shutil.rmtree(work / "scores" / "001")
    (work / "scores" / "000" / "done").unlink()
    first, last = (json.loads((work / "scores" / k / "scores.json").read_text()) for k in ("000", "002"))
    last["measured"]["hyper"] = first["measured"]["hyper"]
    (work / "scores" / "002" / "scores.json").write_text(json.dumps(last))
    run_toy(tmp_path, config=config, seed=2, progress=False, resume=True)
    again = json.loads((tmp_path / "results.json").read_text())
    assert [again["methods"]["hyper"]["matrix"][k] for k in (0, 1)] == whole["methods"]["hyper"]["matrix"][:2]
    assert again["methods"]["hyper"]["matrix"][2] == whole["methods"]["hyper"]["matrix"][0]  # the kept file is read
    assert (tmp_path / "samples.jpg").read_bytes() == sheet
    with pytest.raises(HdbError, match="holds a run with another seed"):
        run_toy(tmp_path, config=config, seed=3, progress=False, resume=True)
    with pytest.raises(HdbError, match="another config"):
        run_toy(tmp_path, config=replace(config, hyper_steps=5), seed=2, progress=False, resume=True)


def test_quick_run_learns(tmp_path):
    results = run_toy(tmp_path, quick=True, seed=0, progress=False)
    default = f"hyper_ft_{PersonalizeConfig.relax}"  # the hypernetwork + 40 steps, relaxed the default way
    assert results["methods"][default]["label"] in (tmp_path / "results.md").read_text()

    losses = results["losses"]
    pretrain, weight_term = losses["pretrain"], losses["hypernet_terms"]["weight_loss"]
    assert np.mean(pretrain[-50:]) < 0.5 * np.mean(pretrain[:10])  # the base model learns faces
    # the hypernetwork learns its targets: the normalised weight distance falls (1 = predicting zero)
    assert np.mean(weight_term[-len(weight_term) // 4 :]) < 0.9 * np.mean(weight_term[:10])

    # Personalising through the hypernetwork from ONE render lowers the loss on that person's OTHER renders, more
    # than the same 40 steps from zero init; and the prediction is personal: fed the person's own photo it ranks
    # their model above where another person's photo puts it (the quick run is too small to identify reliably)
    methods = results["methods"]
    people, summary = methods["base"]["people"], results_summary(methods)
    assert methods["hyper"]["beats_base"] > people / 2, summary  # the prediction alone helps
    assert methods[default]["mean"] < methods["zero_ft"]["mean"] < methods["base"]["mean"], summary
    assert methods["hyper"]["auc"] > methods["hyper_wrong"]["auc"] + 0.05, summary
    assert methods["pixel_nn"]["identified"] is not None
    # the light-normalised memoriser undoes the world's per-channel light: it identifies more than the raw one
    assert methods["pixel_nn_standardised"]["auc"] > methods["pixel_nn"]["auc"], summary
    # the recogniser, trained briefly on the quick run's small crowd, tells its 8 held-out people apart by their photos
    # better than chance (0.68 at 9edd2ae; tests/test_toy_pictures.py tests it on more people)
    assert methods["photo_copy"]["pictures"]["photo"]["auc"] > 0.6


def results_summary(methods: dict) -> str:
    return "; ".join(
        f"{k}: {m.get('mean', 0):.5f}, beats base on {m.get('beats_base')}/{m['people']}, auc {m['auc']:.3f}"
        if "auc" in m
        else k
        for k, m in methods.items()
    )

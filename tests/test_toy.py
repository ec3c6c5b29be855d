"""The toy experiment (`python -m hdb toy --quick`): synthetic people, every stage through hdb, held-out losses."""

import json

import numpy as np

from hdb.cli import build_parser, cmd_toy
from hdb.config import PersonalizeConfig
from hdb.toy.experiment import ToyConfig, method_labels, run_toy
from hdb.toy.world import SIZE, sample_people


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


def test_cli_wiring(tmp_path):
    args = build_parser().parse_args(["toy", "--quick", "--out", str(tmp_path), "--seed", "3"])
    assert args.run is cmd_toy and args.quick and args.seed == 3 and args.out == tmp_path


def test_every_row_of_the_table_runs_and_files_are_written(tmp_path):
    # a miniature of the full run (every method, the s=1 hypernetwork, the upper bound): wiring, not learning
    config = ToyConfig(
        pretrain_identities=20,
        pretrain_steps=20,
        train_identities=8,
        preopt_steps=5,
        hyper_steps=10,
        test_identities=2,
        eval_renders=2,
        eval_draws=2,
        finetune_steps=3,
        long_finetune_steps=5,
        upper_bound_renders=2,
        sample_steps=2,
    )
    results = run_toy(tmp_path, config=config, progress=False)
    for name in ("results.json", "results.md", "losses.png", "renders.jpg", "samples.jpg"):
        assert (tmp_path / name).stat().st_size > 0
    assert list(results["methods"]) == list(method_labels(config)) and len(results["methods"]) == 12
    assert all(np.array(m["matrix"]).shape == (2, 2) for m in results["methods"].values())  # every model x person
    assert json.loads((tmp_path / "results.json").read_text())["methods"].keys() == results["methods"].keys()
    table = (tmp_path / "results.md").read_text()
    assert all(m["label"] in table for m in results["methods"].values())
    assert all(len(m["per_person"]) == 2 and np.isfinite(m["mean"]) for m in results["methods"].values())


def test_quick_run_learns(tmp_path):
    results = run_toy(tmp_path, quick=True, seed=0, progress=False)
    default = f"hyper_ft_{PersonalizeConfig.relax}"  # the hypernetwork + 40 steps, relaxed the default way
    assert results["methods"][default]["label"] in (tmp_path / "results.md").read_text()

    losses = results["losses"]
    pretrain, weight_term = losses["pretrain"], losses["hypernet_terms"]["weight_loss"]
    assert np.mean(pretrain[-50:]) < 0.5 * np.mean(pretrain[:10])  # the base model learns faces
    # the hypernetwork learns its targets: the normalised weight distance falls (1 = predicting zero)
    assert np.mean(weight_term[-len(weight_term) // 4 :]) < 0.85 * np.mean(weight_term[:10])

    # The bar: personalising through the hypernetwork from ONE render gives a lower loss on that
    # person's OTHER renders than the same 40 steps from zero init, for most held-out people ...
    methods = results["methods"]
    people, summary = methods["base"]["people"], results_summary(methods)
    assert methods[default]["beats_zero_ft"] > people / 2, summary
    assert methods["hyper"]["beats_base"] > people / 2, summary  # the prediction alone helps
    assert methods[default]["mean"] < methods["zero_ft"]["mean"] < methods["base"]["mean"], summary
    # ... and it identifies them: their own model fits their other renders better than anyone else's does,
    # for most people, at least as often as zero init manages; fed another person's photo, it does not
    assert methods[default]["identified"] > people / 2, summary
    assert methods[default]["identified"] >= methods["zero_ft"]["identified"], summary
    assert methods["hyper_wrong"]["identified"] < methods[default]["identified"] / 2, summary


def results_summary(methods: dict) -> str:
    return "; ".join(
        f"{k}: {m['mean']:.5f}, beats zero init on {m['beats_zero_ft']}/{m['people']}, identified {m['identified']}"
        for k, m in methods.items()
    )

"""Calibrate the toy's world: how well the memorising baseline and the best LiDB identify people, per jitter.

    PYTHONPATH=. python scripts/toy_calibration.py NAME '{"background": 20.0, "shift": 0.02}'

For one seed (0) and the world's JITTER with the given values replaced, it makes the base model as `hdb toy` does
(its VAE trained on the crowd's renders, then the UNet), pre-optimises a LiDB per held-out person on 8 renders (the
toy's upper bound), and scores every person's 4 renders under every person's LiDB with 8 noise/timestep draws each.
It prints one JSON line: the pixel nearest-neighbour baselines' identified count and AUC (raw, and each image
standardised per channel), and the upper bound's, with 2 or 8 draws, and with the loss taken over all latents
("full") or only the central 6x6 or 4x4 of the 8x8 latents (the face), and the seconds it took. A world where the
upper bound does not beat the memorising baselines cannot show that a method captures more than the photo.
About 25 minutes on one core (the VAE's training most of it).
"""

import json
import sys
import tempfile
import time
from pathlib import Path

import torch

import hdb.toy.world as world
from hdb.config import DEFAULT_INSTANCE_PROMPT, LiDBConfig
from hdb.diffusion import encode_prompts, predict_noise
from hdb.identities import load_weights_dataset
from hdb.models import training_scheduler
from hdb.pipeline import PersonalPipeline
from hdb.toy import experiment, scores

DRAWS = 8
REGIONS = {"full": slice(0, 8), "c6": slice(1, 7), "c4": slice(2, 6)}  # of the 8x8 latents


def main(name: str, overrides: dict) -> dict:
    started = time.perf_counter()
    torch.set_num_threads(1)
    world.JITTER.update(overrides)  # this script's own process: the world it calibrates
    config, seed = experiment.ToyConfig(), 0
    crowd = world.sample_people(seed, 0, config.pretrain_identities, config.pretrain_renders, 0, "crowd")
    extra = config.upper_bound_renders
    test = world.sample_people(seed, 2, config.test_identities, 1, config.eval_renders, "test", extra)
    pipe = experiment.pretrained_base(crowd, config, seed, progress=False).pipe
    with tempfile.TemporaryDirectory() as work:
        upper = [world.Person(p.identity, p.extra_renders, [], []) for p in test]
        experiment.preoptimize_people(pipe, upper, Path(work), config, seed, progress=False)
        personal = PersonalPipeline(pipe, lidb_config=LiDBConfig())
        weights = load_weights_dataset(work, personal.lidb, [p.identity.name for p in test])
    draws = experiment.eval_draws(pipe, [p.eval_renders for p in test], DRAWS, seed * 7919)
    scheduler, cond = training_scheduler(pipe), encode_prompts(pipe, [DEFAULT_INSTANCE_PROMPT])

    @torch.no_grad()
    def loss_maps() -> torch.Tensor:  # [people, renders * draws, 8, 8]: the squared error per latent position
        personal.lidb.own.use_shared()
        maps = []
        for chunk in zip(*(t.split(256) for t in (draws.latents, draws.noise, draws.timesteps)), strict=True):
            clean, noise, timesteps = chunk
            noisy = scheduler.add_noise(clean, noise, timesteps)
            maps.append((predict_noise(pipe, noisy, timesteps, cond.expand(len(clean))) - noise).square().mean(dim=1))
        return torch.cat(maps).view(draws.people, -1, 8, 8)

    grid = []
    for person in test:
        personal.use_weights(*weights[person.identity.name])
        grid.append(loss_maps())
    grid = torch.stack(grid)  # [k, j, renders * draws, 8, 8]
    people, renders_each = len(test), config.eval_renders
    result = {"name": name, "jitter": dict(world.JITTER)}
    for baseline, standardised in (("pixel", False), ("pixel_standardised", True)):
        result[baseline] = _scores(scores.identification(scores.pixel_distances(test, standardised)))
    for region, where in REGIONS.items():
        for used in (2, DRAWS):
            part = grid[:, :, :, where, where].reshape(people, people, renders_each, DRAWS, -1)[:, :, :, :used]
            result[f"upper_{region}_{used}draws"] = _scores(scores.identification(part.mean(dim=(2, 3, 4)).numpy()))
    return result | {"seconds": round(time.perf_counter() - started)}


def _scores(ranks: dict) -> dict:
    return {"identified": int((ranks["rank"] == 1).sum()), "auc": round(float(ranks["auc"].mean()), 3)}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], json.loads(sys.argv[2]) if len(sys.argv) > 2 else {})))

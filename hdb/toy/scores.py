"""How the toy scores: identification from an N x N matrix of losses (or distances), its intervals, and the
memorising baselines, which identify people from the photo's pixels alone, no model."""

from __future__ import annotations

import numpy as np

from hdb.toy.world import Person, central_pixels


def bootstrap_interval(values: np.ndarray, resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of the mean of `values` (paired differences, when given differences), resampling the
    people with replacement."""
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), (resamples, len(values)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def seed_level_interval(per_seed: list[np.ndarray], resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of the mean over (seed, person), resampling the seeds with replacement, then the people
    within each drawn seed: each seed trained its own base and hypernetworks, so the seeds vary as well as the people
    (`bootstrap_interval` resamples the people of the pooled seeds alone)."""
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    for draw in range(resamples):
        seeds = rng.integers(0, len(per_seed), len(per_seed))
        people = [per_seed[s][rng.integers(0, len(per_seed[s]), len(per_seed[s]))] for s in seeds]
        means[draw] = np.concatenate(people).mean()
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def identification(matrix: np.ndarray) -> dict[str, np.ndarray]:
    """Per person j, from [k, j] = person j's renders under person k's model (lower: fits better): the rank of
    their own model among all N (1: best), and the AUC (the share of the N-1 other models their own one beats)."""
    own = np.diag(matrix)
    better_others = (matrix < own[None, :]).sum(axis=0)  # the diagonal never counts: it is not below itself
    return {"rank": 1 + better_others, "auc": 1 - better_others / (len(own) - 1)}


def identified(label: str, matrix: np.ndarray) -> dict:
    ranks = identification(matrix)
    return {
        "label": label,
        "people": len(matrix),
        "identified": int((ranks["rank"] == 1).sum()),
        "mean_rank": float(ranks["rank"].mean()),
        "auc": float(ranks["auc"].mean()),
        "auc_interval": bootstrap_interval(ranks["auc"]),
        "auc_per_person": ranks["auc"].tolist(),
        "matrix": matrix.tolist(),
    }


def pixel_distances(people: list[Person], standardised: bool = False) -> np.ndarray:
    """A memorising baseline: [k, j] = mean distance of person j's renders to person k's photo, on the central
    pixels (`central_pixels`, each image `standardised` per channel or not). A toy that this identifies would reward
    remembering the photo."""
    photos = np.stack([central_pixels(p.photos[0], standardised) for p in people])
    renders = [np.stack([central_pixels(r, standardised) for r in p.eval_renders]) for p in people]
    return np.array([[np.linalg.norm(r - photo, axis=1).mean() for r in renders] for photo in photos])


# The memorising baselines, the photo's pixels against the person's other renders: as they are, and with each image
# standardised per channel (the world's light jitter is a per-channel affine change, which that undoes)
MEMORISERS = {
    "pixel_nn": ("pixel nearest neighbour on the photo (memorising baseline)", False),
    "pixel_nn_standardised": ("pixel nearest neighbour, each image standardised per channel (light-normalised)", True),
}


def memoriser_rows(test_people: list[Person]) -> dict[str, dict]:
    """The memorising baselines' rows of the results (`MEMORISERS`): identification from pixels alone, no model."""
    return {
        name: identified(label, pixel_distances(test_people, standardised))
        for name, (label, standardised) in MEMORISERS.items()
    }

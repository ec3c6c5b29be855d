"""The toy's drawing and judging of pictures: its VAE (hdb.toy.drawing) and its recogniser, context detector and
diversity (hdb.toy.pictures)."""

import numpy as np
import pytest
import torch

from hdb.diffusion import to_pixels
from hdb.toy.drawing import colour_weighted_error, colourfulness, train_autoencoder
from hdb.toy.pictures import (
    CONTEXTS,
    GREY_BELOW,
    PICTURES,
    PictureScores,
    Recogniser,
    galleries,
    photo_copy_row,
    picture_summary,
    score_pictures,
    train_recogniser,
)
from hdb.toy.world import HAIR_STYLES, identity_traits, in_black_and_white, sample_people


def test_the_autoencoders_loss_weighs_colour_and_it_learns_the_renders():
    renders = [photo for person in sample_people(0, 0, 8, 2, 0, "c") for photo in person.photos]
    pixels = to_pixels(renders[:2])
    brighter = pixels + 0.1  # an error in brightness alone
    tinted = pixels + torch.tensor([0.1, -0.1, 0.0]).view(1, 3, 1, 1)  # in colour alone: its channel mean is 0
    assert colour_weighted_error(brighter, pixels, 4.0).item() == pytest.approx(0.01 + 0.1, rel=1e-5)
    assert colour_weighted_error(tinted, pixels, 4.0).item() == pytest.approx(4 * (0.02 / 3 + 0.2 / 3), rel=1e-5)

    vae, losses = train_autoencoder(renders, 40, seed=0, progress=False)
    assert len(losses) == 40 and np.mean(losses[-10:]) < 0.7 * np.mean(losses[:5])
    assert not vae.training and not any(p.requires_grad for p in vae.parameters())
    again, _ = train_autoencoder(renders, 2, seed=0, progress=False)
    first, _ = train_autoencoder(renders, 2, seed=0, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(again.parameters(), first.parameters(), strict=True))


def test_grey_pictures_and_colour_renders_fall_either_side_of_the_context_detectors_line():
    renders = [photo for person in sample_people(0, 0, 100, 4, 0, "c") for photo in person.photos]
    colour = colourfulness(to_pixels(renders))
    grey = colourfulness(to_pixels([in_black_and_white(r) for r in renders]))
    assert (grey < GREY_BELOW).all() and (colour < GREY_BELOW).float().mean() < 0.01  # the claim in pictures.py
    assert 0.12 < colour.mean() < 0.25


def test_traits_are_what_makes_a_person():
    people = sample_people(0, 2, 20, 1, 0, "t")
    traits = np.stack([identity_traits(p.identity) for p in people])
    assert traits.shape == (20, 23) and traits.min() >= 0 and traits.max() <= 1
    assert (traits[:, 1:17].sum(axis=1) == 3).all()  # one hair colour, one eye colour, one hair style
    bald = [p.identity.hair_style == "bald" for p in people]
    assert (traits[:, 13 + HAIR_STYLES.index("bald")] == bald).all()
    assert len({tuple(t) for t in traits}) == 20


def test_the_recogniser_tells_held_out_people_apart():
    # trained on a small crowd, it reads held-out people's photos near their other renders, as pictures of them
    crowd, held_out = sample_people(0, 0, 100, 4, 0, "c"), sample_people(0, 2, 12, 1, 3, "t")
    recogniser, losses = train_recogniser(crowd, 400, seed=0, progress=False)
    assert np.mean(losses[-20:]) < 0.7 * np.mean(losses[:10])
    copies = photo_copy_row(recogniser, held_out)["photo_copy"]["pictures"]
    untrained = photo_copy_row(Recogniser(23), held_out)["photo_copy"]["pictures"]
    assert copies["photo"]["auc"] > 0.75 and copies["photo"]["auc"] > untrained["photo"]["auc"] + 0.15
    assert copies["black_and_white"]["auc"] > untrained["black_and_white"]["auc"] + 0.1  # the colour photo, grey people
    assert copies["in_context"] == [1.0, 0.0] and copies["diversity"] == [0.0, 0.0]  # a colour photo, 4 times


def test_pictures_are_scored_against_every_persons_gallery_in_their_context():
    people = sample_people(0, 2, 3, 1, 4, "t")
    recogniser = Recogniser(23)
    gallery = galleries(recogniser, people)
    assert gallery.shape == (2, 3, 23)
    grey_renders = [in_black_and_white(r) for r in people[1].eval_renders]
    scores = score_pictures(recogniser, gallery, [people[1].eval_renders, grey_renders])  # person 1's own renders
    assert np.argmin(scores.distances[0]) == 1 and np.argmin(scores.distances[1]) == 1
    assert scores.grey == [0.0, 1.0] and scores.colourfulness[1] < 1e-6 and min(scores.diversity) > 0

    # picture_summary: model k's pictures of everyone, [k][j]; model 0 draws person 2 best, the others themselves
    def drawn(distances: list[float], grey: float) -> PictureScores:
        return PictureScores([distances, distances], [0.1, 0.0], [0.0, grey], [0.2, 0.3])

    per_model = [drawn([3.0, 2.0, 1.0], 1.0), drawn([2.0, 1.0, 3.0], 0.5), drawn([3.0, 2.0, 1.0], 0.0)]
    summary = picture_summary("m", per_model)
    for context in CONTEXTS:
        assert summary[context]["identified"] == 2 and summary[context]["auc_per_person"] == [0.5, 1.0, 1.0]
    assert summary["in_context"] == pytest.approx([1.0, 0.5]) and summary["diversity"] == pytest.approx([0.2, 0.3])
    assert "photo" not in picture_summary("base", per_model, identify=False)
    assert PICTURES >= 2  # diversity needs two pictures of one prompt

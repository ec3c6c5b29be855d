"""hdb draws random initial weights from the seeds it is given, and never seeds the process-wide RNG."""

import torch
from helpers import TINY_DECODER
from PIL import Image

from hdb.config import HypernetTrainConfig
from hdb.hypernet import HyperNetwork, build_tiny_image_encoder
from hdb.identities import Identity
from hdb.lidb import LiDB, LiDBConfig
from hdb.models import build_tiny_pipeline
from hdb.seeding import initialised_from
from hdb.train_hypernet import train_hypernetwork


def same_weights(one: torch.nn.Module, other: torch.nn.Module) -> bool:
    theirs = other.state_dict()
    return all(torch.equal(value, theirs[key]) for key, value in one.state_dict().items())


def tiny_hypernet(lidb: LiDB, seed: int) -> HyperNetwork:
    return HyperNetwork.for_lidb(lidb, build_tiny_image_encoder(seed), "tiny", seed, decoder=TINY_DECODER)


def test_building_models_leaves_the_process_random_state_as_it_was():
    state = torch.get_rng_state()
    pipe = build_tiny_pipeline("sdxl", seed=1)
    tiny_hypernet(LiDB(pipe, LiDBConfig(a=8, b=4)), seed=1)
    with initialised_from(2):
        torch.nn.Linear(3, 3)
    assert torch.equal(torch.get_rng_state(), state)


def test_the_same_seed_builds_the_same_weights_whatever_the_process_state():
    pipe, other = build_tiny_pipeline("sd15", seed=1), build_tiny_pipeline("sd15", seed=2)
    torch.rand(100)  # the process-wide stream moves on: the next build must not notice
    again = build_tiny_pipeline("sd15", seed=1)
    for name in ("unet", "vae", "text_encoder"):
        assert same_weights(getattr(pipe, name), getattr(again, name))
        assert not same_weights(getattr(pipe, name), getattr(other, name))
    lidb = LiDB(pipe, LiDBConfig(a=8, b=4))
    first, second = tiny_hypernet(lidb, seed=1), tiny_hypernet(lidb, seed=1)
    assert same_weights(first, second) and not same_weights(first, tiny_hypernet(lidb, seed=2))
    assert not torch.equal(first.head, tiny_hypernet(lidb, seed=2).head)  # the layers around the encoder too


def test_training_a_hypernetwork_leaves_the_process_random_state_as_it_was(tmp_path):
    generator = torch.Generator().manual_seed(0)
    photos = [torch.randint(0, 256, (64, 64, 3), generator=generator, dtype=torch.uint8) for _ in range(3)]
    people = [Identity(f"person{k}", [Image.fromarray(photo.numpy())]) for k, photo in enumerate(photos)]
    pipe = build_tiny_pipeline("sd15")
    config = HypernetTrainConfig(
        steps=1,
        batch_size=2,
        beta=0,
        image_encoder="tiny",
        decoder=TINY_DECODER,
        sample_steps=1,
        progress=False,
    )
    state = torch.get_rng_state()
    train_hypernetwork(pipe, people, tmp_path, config=config, device="cpu")
    assert torch.equal(torch.get_rng_state(), state)
    assert (tmp_path / "samples" / "step-000000.png").is_file()  # sampling ran too

"""HyperNetwork: shapes, near-zero start, gradients to every parameter, learning, save/load, compatibility."""

import json

import pytest
import torch
from PIL import Image
from transformers import CLIPConfig, CLIPModel, CLIPVisionModel

from hdb.config import PAIRINGS, DecoderConfig
from hdb.diffusion import diffusion_loss, encode_images, encode_prompts
from hdb.errors import HdbError
from hdb.hypernet import HyperNetwork, build_tiny_image_encoder, load_image_encoder
from hdb.lidb import LiDB, LiDBConfig
from hdb.models import training_scheduler

TINY = dict(width=32, depth=2, heads=4)


def tiny_hypernet(lidb: LiDB, **overrides) -> HyperNetwork:
    torch.manual_seed(0)
    return HyperNetwork.for_lidb(
        lidb, build_tiny_image_encoder(), "tiny-clip-vision", decoder=DecoderConfig(**{**TINY, **overrides})
    )


def pixels(n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def face(seed: int = 0) -> Image.Image:
    rgb = torch.randint(0, 256, (80, 96, 3), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    return Image.fromarray(rgb.numpy())


def test_shapes_and_near_zero_start(tiny_sd15):
    lidb = LiDB(tiny_sd15)
    hypernet = tiny_hypernet(lidb)
    assert hypernet.config.image_size == 64 and hypernet.config.num_layers == len(lidb.layer_names)
    A, B = hypernet(pixels(2))
    assert A.shape == (2, *lidb.A_train.shape) and B.shape == (2, *lidb.B_train.shape)
    # An untrained hypernetwork predicts (almost) "no change": B ~ 0, A ~ the fixed LoRA-style start.
    start_A = hypernet.start[:, : lidb.config.rank * lidb.config.a].reshape(lidb.A_train.shape)
    assert B.abs().max() < 0.05 and (A - start_A).abs().max() < 0.05 and start_A.abs().max() > 0.05
    # ... the same A that training from zero starts from, for every person (one gauge for the weight loss)
    start_A_each, start_B_each = lidb.own.initial_weights(3)
    assert all(torch.equal(a, start_A) for a in start_A_each) and not start_B_each.any()
    A1, B1 = hypernet.predict(face())
    assert A1.shape == lidb.A_train.shape and B1.shape == lidb.B_train.shape and A1.dtype == torch.float32
    lidb.own.load_weights(A1, B1)
    # Any photo size: centre-cropped to a square, resized, normalised with the config's mean and std.
    grey = hypernet.preprocess([face(), Image.new("RGB", (300, 200), (128, 128, 128))])
    assert grey.shape == (2, 3, 64, 64)
    expected = (128 / 255 - torch.tensor(hypernet.config.image_mean)) / torch.tensor(hypernet.config.image_std)
    torch.testing.assert_close(grey[1, :, 5, 7], expected)


PAPER_OPTIONS = {"decoder_input": "concatenated", "refine_from": "zero"}  # the paper's, where hdb chose otherwise


@pytest.mark.parametrize("options", [{}, PAPER_OPTIONS])
def test_gradients_reach_every_parameter(tiny_sd15, options):
    pipe = tiny_sd15
    for model in (pipe.unet, pipe.text_encoder, pipe.vae):
        model.requires_grad_(False)
    lidb = LiDB(pipe)
    hypernet = tiny_hypernet(lidb, **options)
    A, B = hypernet(pixels(2))
    lidb.own.use_per_sample(A, B)
    generator = torch.Generator().manual_seed(0)
    latents = encode_images(pipe, torch.rand(2, 3, 64, 64, generator=generator) * 2 - 1)
    noise = torch.randn(latents.shape, generator=generator)
    cond = encode_prompts(pipe, ["a photo of sks person"] * 2)
    loss = diffusion_loss(pipe, training_scheduler(pipe), latents, cond, noise, torch.tensor([100, 600])).mean()
    loss.backward()
    # The encoder's pooling layers would get no gradient from last_hidden_state alone: the hypernetwork
    # uses the pooled output as an extra image token, so they are part of the model, not excluded here.
    # Attention key biases get only rounding noise (~1e-14): the model freezes them. The smallest real
    # gradients here are ~1e-7 (the heads start near zero and so does B), hence the 1e-10 floor.
    trainable = [(name, p) for name, p in hypernet.named_parameters() if p.requires_grad]
    dead = [name for name, p in trainable if p.grad is None or not p.grad.abs().max() > 1e-10]
    assert not dead, f"no gradient reaches {dead}"
    assert sum(name.startswith("image_encoder.") for name, _ in trainable) > 30  # the encoder is trained too


def test_learns_target_weights(tiny_sd15):
    lidb = LiDB(tiny_sd15)
    hypernet = tiny_hypernet(lidb)
    generator = torch.Generator().manual_seed(1)
    target_A = torch.randn(2, *lidb.A_train.shape, generator=generator) * 0.1
    target_B = torch.randn(2, *lidb.B_train.shape, generator=generator) * 0.1
    images = pixels(2)
    optimizer = torch.optim.Adam(hypernet.parameters(), lr=1e-3)
    losses = []
    for _ in range(15):
        A, B = hypernet(images)
        loss = ((A - target_A) ** 2).sum() + ((B - target_B) ** 2).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    with torch.no_grad():
        for iterations in (1, 4):
            A, B = hypernet(images, iterations=iterations)
            assert A.shape == (2, *lidb.A_train.shape) and torch.isfinite(A).all() and torch.isfinite(B).all()


def test_s_iterations_are_s_residual_refinements_of_the_start(tiny_sd15):
    """The paper's iterative refinement: s = k runs the same decoder k times, each adding its correction to
    the weights so far, from the start (A random, B zero); a hypernetwork that ignored s would fail here."""
    hypernet = tiny_hypernet(LiDB(tiny_sd15), iterations=3)
    with torch.no_grad():
        hypernet.head.normal_(0, 0.05)  # corrections large enough to tell iterations apart
        images = pixels(2)
        tokens = hypernet.encode_image(images)
        weights = hypernet.start.expand(2, -1, -1)
        by_hand = []
        for _ in range(3):
            correction = hypernet.refine(weights, tokens) - weights
            assert correction.abs().max() > 1e-3  # each iteration changes the weights
            weights = weights + correction
            by_hand.append(weights)
        for k in (1, 2, 3):
            A, B = hypernet(images, iterations=k)
            torch.testing.assert_close(torch.cat([A.flatten(2), B.flatten(2)], dim=2), by_hand[k - 1])
        default = torch.cat([t.flatten(2) for t in hypernet(images)], dim=2)
        torch.testing.assert_close(default, by_hand[-1])  # the config's s = 3
        assert not torch.allclose(by_hand[0], by_hand[-1])
    # `predict`, what personalisation starts from, runs all s of them too
    photo = face()
    A, B = hypernet.predict(photo)
    with torch.no_grad():
        expected = [t[0] for t in hypernet(hypernet.preprocess([photo]))]
        one = [t[0] for t in hypernet(hypernet.preprocess([photo]), iterations=1)]
    torch.testing.assert_close([A, B], expected)
    assert not torch.allclose(torch.cat([A.flatten(), B.flatten()]), torch.cat([t.flatten() for t in one]))


def test_the_papers_zero_start_and_concatenated_input_are_what_they_say(tiny_sd15, tmp_path):
    lidb = LiDB(tiny_sd15)
    ours, papers = tiny_hypernet(lidb), tiny_hypernet(lidb, **PAPER_OPTIONS)
    A, B = papers(pixels(), iterations=0)  # before any refinement: the paper's start is all zero; ours is LoRA's
    assert not A.any() and not B.any()
    A, B = ours(pixels(), iterations=0)
    assert torch.equal(A[0], lidb.own.initial_weights()[0]) and not B.any()
    assert isinstance(papers.decoder, torch.nn.TransformerEncoder)  # one sequence, self-attention only
    assert isinstance(ours.decoder, torch.nn.TransformerDecoder)
    with torch.no_grad():  # image tokens reach the weight tokens through the shared sequence
        changed = papers(pixels(seed=1))[0] - papers(pixels(seed=2))[0]
    assert changed.abs().max() > 0
    with pytest.raises(HdbError, match="`decoder_input` must be one of cross, concatenated, not 'sideways'"):
        tiny_hypernet(lidb, decoder_input="sideways")


@pytest.mark.parametrize("options", [{}, PAPER_OPTIONS])
def test_save_load_roundtrip_and_compatibility(tiny_sd15, tiny_sdxl, tmp_path, options):
    lidb = LiDB(tiny_sd15)
    hypernet = tiny_hypernet(lidb, **options)
    with torch.no_grad():  # make the weights non-trivial, so a lost tensor would show
        hypernet.head.normal_(0, 0.05)
    hypernet.save_pretrained(tmp_path / "hn")
    loaded = HyperNetwork.from_pretrained(tmp_path / "hn", lidb=lidb)
    assert loaded.lidb_config == lidb.config
    assert all(getattr(loaded.config.decoder, key) == value for key, value in options.items())
    for before, after in zip(hypernet.predict(face()), loaded.predict(face()), strict=True):
        assert torch.equal(before, after)
    saved = json.loads((tmp_path / "hn" / "config.json").read_text())  # hdb 0.x kept the decoder's settings flat
    (tmp_path / "hn" / "config.json").write_text(json.dumps({**saved.pop("decoder"), **saved}))
    flat = HyperNetwork.from_pretrained(tmp_path / "hn", lidb=lidb)
    assert flat.config == loaded.config and torch.equal(flat.predict(face())[1], loaded.predict(face())[1])

    with pytest.raises(HdbError, match="LiDB layers.*fingerprint"):
        HyperNetwork.from_pretrained(tmp_path / "hn", lidb=LiDB(tiny_sdxl))
    lidb.unload()
    other = LiDB(tiny_sd15, LiDBConfig(seed=1))
    with pytest.raises(HdbError, match="aux seed 0; this LiDB uses a=100, b=50, aux seed 1"):
        HyperNetwork.from_pretrained(tmp_path / "hn", lidb=other)
    other.unload()
    with pytest.raises(HdbError, match="a=100, b=50, aux seed 0; this LiDB uses a=64, b=50"):
        loaded.check_compatible(LiDB(tiny_sd15, LiDBConfig(a=64)))


def test_bad_files_raise_hdb_error(tiny_sd15, tmp_path):
    hypernet = tiny_hypernet(LiDB(tiny_sd15))
    with pytest.raises(HdbError, match="Hypernetwork directory .*missing does not exist"):
        HyperNetwork.from_pretrained(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(HdbError, match="not a saved hypernetwork .no config.json"):
        HyperNetwork.from_pretrained(tmp_path / "empty")

    hypernet.save_pretrained(tmp_path / "corrupt")
    (tmp_path / "corrupt" / "hypernet.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(HdbError, match="Could not read"):
        HyperNetwork.from_pretrained(tmp_path / "corrupt")

    hypernet.save_pretrained(tmp_path / "resized")  # config says one width, the weights have another
    config = json.loads((tmp_path / "resized" / "config.json").read_text())
    config["decoder"]["width"] = 48
    (tmp_path / "resized" / "config.json").write_text(json.dumps(config))
    with pytest.raises(HdbError, match="does not match its config"):
        HyperNetwork.from_pretrained(tmp_path / "resized")


def test_load_image_encoder(tmp_path):
    build_tiny_image_encoder().save_pretrained(tmp_path / "enc")
    encoder = load_image_encoder(str(tmp_path / "enc"))
    assert encoder(pixel_values=pixels(1)).last_hidden_state.shape == (1, 17, 32)
    # A full CLIP model (image + text towers) gives its vision tower, which can be saved on its own.
    vision = build_tiny_image_encoder().config.to_dict()
    text = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=37, vocab_size=99)
    CLIPModel(CLIPConfig(vision_config=vision, text_config=text)).save_pretrained(tmp_path / "clip")
    tower = load_image_encoder(str(tmp_path / "clip"))
    assert isinstance(tower, CLIPVisionModel) and tower(pixel_values=pixels(1)).last_hidden_state.shape == (1, 17, 32)
    with pytest.raises(HdbError, match="local directory"):  # tests run with HF_HUB_OFFLINE=1
        load_image_encoder("laion/CLIP-ViT-H-14-laion2B-s32B-b79K")


def test_the_input_photo_and_the_target_view_pair_as_chosen():
    from hdb.train_hypernet import pair_photo_and_view

    photos, views = 3, 12  # 4 augmented views per photo, photo by photo
    pairs = {
        name: [pair_photo_and_view(seed, photos, views, name) for seed in range(0, 40_000, 97)] for name in PAIRINGS
    }
    assert all(view // 4 == photo for photo, view in pairs["same"])  # a view of the very photo the network sees
    assert any(view // 4 != photo for photo, view in pairs["independent"])  # any photo's view: predict the person
    for chosen in pairs.values():  # every photo and every view gets drawn
        assert {p for p, _ in chosen} == set(range(photos)) and {v for _, v in chosen} == set(range(views))
    assert pair_photo_and_view(5, 1, 4, "same") == pair_photo_and_view(5, 1, 4, "independent")  # one photo: agree
    with pytest.raises(HdbError, match="Unknown pairing"):
        pair_photo_and_view(0, 1, 4, "nearest")

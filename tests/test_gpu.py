"""What only runs on a CUDA GPU: late loss reads, fp16 loss scaling, fused AdamW, compiled and
channels-last UNets, merged generation in half precision.

Marked `gpu` and deselected by default (pyproject.toml), so CI and `python -m pytest` never collect
them as skips. Run them with `python -m pytest -m gpu -n 0` (scripts/gpu_check.sh does, plus the
bench). Selected on a machine without CUDA they fail, saying so: a GPU check that did not run must
not read as passed.
"""

import numpy as np
import pytest
import torch
from PIL import Image

from hdb.config import PersonalizeConfig
from hdb.faces import AlignedFace, crop_size
from hdb.generate import generate
from hdb.lidb import LiDB
from hdb.models import build_tiny_pipeline, native_resolution
from hdb.pipeline import PersonalPipeline
from hdb.training import TrainConfig, _StepOnItsWay, make_optimizer, train

pytestmark = pytest.mark.gpu

CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def cuda_required():
    if not torch.cuda.is_available():
        pytest.fail("the gpu tests need a CUDA GPU, and torch.cuda.is_available() is False on this machine")


def tiny_pipe_on_cuda(dtype: torch.dtype = torch.float32):
    pipe = build_tiny_pipeline("sd15", seed=0).to(CUDA, dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def random_face(pipe) -> AlignedFace:
    """An already aligned stand-in crop: these tests compare paths, not pictures of a person."""
    size = crop_size(native_resolution(pipe))
    pixels = torch.rand(size, size, 3, generator=torch.Generator().manual_seed(0)) * 255
    return AlignedFace.from_crop(Image.fromarray(pixels.to(torch.uint8).numpy()))


def attach_random_person(pipe, strength: float = 1.0) -> LiDB:
    """A LiDB holding random weights large enough to change the pictures visibly."""
    lidb = LiDB(pipe)
    generator = torch.Generator().manual_seed(1)
    A, B = (0.5 * torch.randn(weights.shape, generator=generator) for weights in (lidb.A_train, lidb.B_train))
    lidb.own.load_weights(A, B)
    lidb.set_scale(strength)
    return lidb


def quadratic_problem(seed: int = 0) -> tuple[list[torch.nn.Parameter], torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    weights = torch.nn.Parameter(torch.randn(256, generator=generator).to(CUDA))
    target = torch.randn(256, generator=generator).to(CUDA)
    return [weights], target


def losses_of(config: TrainConfig, seed: int = 0) -> list[float]:
    parameters, target = quadratic_problem(seed)
    seen: list[float] = []
    train(parameters, lambda step: ((parameters[0] - target) ** 2).mean(), config, on_step=lambda s, v: seen.append(v))
    return seen


# ----------------------------------------------------------------------------- the training loop on a GPU


def test_a_late_read_gives_the_numbers_of_its_step():
    numbers = torch.tensor([1.5, 2.5], device=CUDA)
    waiting = _StepOnItsWay(3, numbers)
    numbers.mul_(10)  # queued after the copy: the late read must not see it
    torch.randn(2048, 2048, device=CUDA) @ torch.randn(2048, 2048, device=CUDA)  # keep the GPU busy meanwhile
    assert waiting.read() == [1.5, 2.5]
    assert waiting.numbers.is_pinned()


def test_late_reads_give_the_losses_a_synchronous_read_gives():
    every_step_read_at_once = losses_of(TrainConfig(steps=30, learning_rate=0.05, snapshot_every=1, progress=False))
    mostly_late = losses_of(TrainConfig(steps=30, learning_rate=0.05, snapshot_every=1000, progress=False))
    assert len(mostly_late) == 30 and mostly_late == every_step_read_at_once
    assert mostly_late[-1] < mostly_late[0] / 2  # it trained


def test_an_fp16_overflow_step_is_skipped_by_the_scaler_not_called_divergence():
    parameters, target = quadratic_problem()
    overflow_step = 5

    def loss_fn(step: int) -> torch.Tensor:
        loss = ((parameters[0] - target) ** 2).mean()
        if step == overflow_step:
            # zero in value, but a gradient of 1e4 through an fp16 cast: times the scaler's 65,536 it is inf
            half = parameters[0].half().float().sum()
            loss = loss + 1e4 * (half - half.detach())
        return loss

    config = TrainConfig(steps=20, learning_rate=0.05, fp16_loss_scaling=True, progress=False)
    result = train(parameters, loss_fn, config)
    assert result.skipped_steps == [overflow_step]  # skipped and counted
    assert torch.isfinite(parameters[0]).all()
    assert result.losses[-1] < result.losses[0]  # it went on training after the skipped step


def test_adamw_is_fused_on_cuda_and_agrees_with_the_unfused_one():
    fused_parameters, target = quadratic_problem()
    plain_parameters = [torch.nn.Parameter(fused_parameters[0].detach().clone())]
    fused = make_optimizer(fused_parameters, "adamw", 0.01)
    assert fused.defaults["fused"] is True
    plain = torch.optim.AdamW(plain_parameters, lr=0.01, fused=False, foreach=False)
    for _ in range(50):
        for optimizer, parameters in ((fused, fused_parameters), (plain, plain_parameters)):
            ((parameters[0] - target) ** 2).mean().backward()
            optimizer.step()
            optimizer.zero_grad()
    assert not torch.equal(fused_parameters[0], quadratic_problem()[0][0])  # it moved
    torch.testing.assert_close(fused_parameters[0], plain_parameters[0], rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- compiled and channels-last UNets


def test_a_compiled_unet_personalises_like_the_eager_one():
    from torch._dynamo.utils import counters

    config = PersonalizeConfig(steps=4, progress=False)
    eager_pipe = tiny_pipe_on_cuda()
    eager = PersonalPipeline(eager_pipe).personalize(random_face(eager_pipe), config)
    compiled_pipe = tiny_pipe_on_cuda()
    compiled_pipe.unet.compile()
    graphs_before = counters["stats"]["unique_graphs"]
    compiled = PersonalPipeline(compiled_pipe).personalize(random_face(compiled_pipe), config)
    assert counters["stats"]["unique_graphs"] > graphs_before  # the compiled forward really ran
    torch.testing.assert_close(compiled.losses, eager.losses, rtol=1e-2, atol=1e-4)
    # B starts at zero: what it holds now is what the 4 steps learnt. Adam turns near-zero gradients into
    # whole steps, so a few elements may differ by rounding; on the whole the two must agree.
    learnt, difference = eager.weights.B.abs().mean(), (compiled.weights.B - eager.weights.B).abs().mean()
    assert learnt > 0 and difference <= 0.05 * learnt


@pytest.mark.parametrize("mode", ["full", "regional"])
def test_compiled_models_give_the_eager_gradients(mode):
    """One training pass, eager then compiled: the same LiDB gradients. Guards against silently wrong compiled
    backward passes: on a CPU, torch 2.13's inductor gets the whole tiny UNet's backward wrong (docs/BENCHMARKS.md)."""
    from hdb.diffusion import encode_prompts, predict_noise
    from hdb.models import compile_pipeline
    from hdb.stage import training_stage

    pipe = tiny_pipe_on_cuda()
    lidb = attach_random_person(pipe)
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=generator).to(CUDA)
    timesteps = torch.tensor([10, 700], device=CUDA)

    def gradients() -> list[torch.Tensor]:
        with training_stage(pipe, lidb, "testing", "nothing"):
            cond = encode_prompts(pipe, ["a sks face", "a painting"])
            predict_noise(pipe, latents, timesteps, cond).square().mean().backward()
            return [lidb.A_train.grad.clone(), lidb.B_train.grad.clone()]

    eager = gradients()
    compile_pipeline(pipe, mode)
    compiled = gradients()
    for got, expected in zip(compiled, eager, strict=True):
        assert expected.abs().max() > 0
        assert (got - expected).abs().max() <= 1e-3 * expected.abs().max()


def test_a_channels_last_unet_gives_the_same_output():
    pipe = tiny_pipe_on_cuda()
    attach_random_person(pipe)
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=generator).to(CUDA)
    text = torch.randn(2, 77, pipe.unet.config.cross_attention_dim, generator=generator).to(CUDA)
    timestep = torch.tensor([10, 500], device=CUDA)
    with torch.no_grad():
        expected = pipe.unet(latents, timestep, text).sample
        pipe.unet.to(memory_format=torch.channels_last)
        assert pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
        got = pipe.unet(latents.contiguous(memory_format=torch.channels_last), timestep, text).sample
    # cuDNN may pick other (TF32) algorithms for the other layout: equal to their rounding
    assert (got - expected).abs().max() <= 1e-2 * expected.abs().max()


# ----------------------------------------------------------------------------- merged generation


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, 1.0), (torch.float16, 2.0)], ids=["fp32", "fp16"])
def test_merged_and_unmerged_pictures_agree(dtype, tolerance):
    pipe = tiny_pipe_on_cuda(dtype)
    lidb = attach_random_person(pipe)

    def picture(strength: float, merge: bool) -> np.ndarray:
        images = generate(pipe, lidb, "a photo of sks person", steps=4, identity_strength=strength, merge=merge)
        return np.asarray(images[0], dtype=np.float32)

    merged, unmerged, base = picture(1.0, True), picture(1.0, False), picture(0.0, False)
    assert np.abs(merged - unmerged).mean() <= tolerance  # in 8-bit levels
    assert np.abs(unmerged - base).mean() > 5 * tolerance  # the person changes the picture: the test can fail
    assert not lidb.merged


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_a_thousand_merges_leave_the_base_weights_bit_identical(dtype):
    pipe = tiny_pipe_on_cuda(dtype)
    lidb = attach_random_person(pipe)
    originals = {name: layer.base.weight.detach().clone() for name, layer in lidb.layers.items()}
    lidb.merge()
    assert any(not torch.equal(layer.base.weight, originals[name]) for name, layer in lidb.layers.items())
    lidb.unmerge()
    for _ in range(1000):
        lidb.merge()
        lidb.unmerge()
    for name, layer in lidb.layers.items():
        assert torch.equal(layer.base.weight, originals[name]), name


def test_building_on_the_gpu_follows_the_seed_and_leaves_the_random_state_alone():
    cpu, cuda = torch.get_rng_state(), torch.cuda.get_rng_state()
    with torch.device(CUDA):  # the constructors draw on the GPU: hdb.seeding forks and seeds its generator
        one, again, other = (build_tiny_pipeline("sd15", seed=seed) for seed in (1, 1, 2))
    assert torch.equal(torch.get_rng_state(), cpu) and torch.equal(torch.cuda.get_rng_state(), cuda)
    weight = one.unet.conv_in.weight
    assert weight.is_cuda and torch.equal(weight, again.unet.conv_in.weight)
    assert not torch.equal(weight, other.unet.conv_in.weight)


@pytest.mark.parametrize("quantize", ["nf4", "int8"])
def test_a_base_loaded_in_4_or_8_bits_personalises_and_draws_unmerged(tmp_path, quantize):
    """diffusers' bitsandbytes quantisation of a tiny FLUX.1's transformer and T5 (`--quantize`), LiDB on top."""
    import bitsandbytes as bnb

    from hdb.models import save_tiny_pipeline

    base = save_tiny_pipeline(tmp_path / "flux", "flux")
    personal = PersonalPipeline.load(str(base), device="cuda", dtype="bf16", quantize=quantize)
    quantised = (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
    assert isinstance(personal.lidb.layers["transformer.transformer_blocks.0.attn.to_q"].base, quantised)
    assert not personal.lidb.mergeable
    result = personal.personalize(random_face(personal.pipe), PersonalizeConfig(steps=3, progress=False))
    assert all(np.isfinite(result.losses))
    image = np.asarray(personal.generate("a photo of [V]", steps=2)[0])
    assert image.std() > 0

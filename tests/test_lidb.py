"""LiDB: rank, aux bases, zero init, per-sample batches, merge, gradient checkpointing."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import PROMPTS, forward

from hdb.diffusion import encode_prompts, predict_noise
from hdb.errors import HdbError
from hdb.lidb import LiDB, LiDBConfig, arch_fingerprint, aux_bases, aux_fingerprint, weight_distance
from hdb.stage import training_stage


def randomize(lidb: LiDB, scale: float = 0.3, seed: int = 0) -> None:
    """Random non-zero B, the same for the same seed (hdb seeds no process-wide generator, so neither do tests)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        lidb.B_train.copy_(torch.randn(lidb.B_train.shape, generator=generator) * scale)


@pytest.mark.parametrize("rank", [1, 3])
def test_delta_has_exact_rank(tiny_sd15, rank):
    lidb = LiDB(tiny_sd15, LiDBConfig(rank=rank))
    randomize(lidb)
    for layer in list(lidb.layers.values())[:6]:
        assert torch.linalg.matrix_rank(layer.delta_weight().detach(), rtol=1e-4) == rank  # fp32 noise floor


def test_aux_bases_are_orthonormal():
    # rows of A_aux and columns of B_aux are orthonormal where the shape allows (a <= in, b <= out) ...
    A_aux, B_aux = aux_bases(0, "unet.x.to_q", 320, 640, 100, 50)
    assert A_aux.shape == (100, 320) and B_aux.shape == (640, 50)
    torch.testing.assert_close(A_aux @ A_aux.T, torch.eye(100), atol=1e-5, rtol=0)
    torch.testing.assert_close(B_aux.T @ B_aux, torch.eye(50), atol=1e-5, rtol=0)
    # ... and columns of A_aux when a layer is narrower than a (tiny models): still semi-orthogonal.
    A_aux, _ = aux_bases(0, "tiny", 32, 32, 100, 50)
    torch.testing.assert_close(A_aux.T @ A_aux, torch.eye(32), atol=1e-5, rtol=0)
    # Different layer names or seeds give different bases.
    assert not torch.allclose(aux_bases(0, "a", 320, 320, 100, 50)[0], aux_bases(0, "b", 320, 320, 100, 50)[0])
    assert not torch.allclose(aux_bases(0, "a", 320, 320, 100, 50)[0], aux_bases(1, "a", 320, 320, 100, 50)[0])


def test_aux_bases_identical_across_processes():
    code = (
        "from hdb.lidb import aux_bases\n"
        "import hashlib\n"
        "A, B = aux_bases(7, 'unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k', 768, 1280, 100, 50)\n"
        "print(hashlib.sha256(A.numpy().tobytes() + B.numpy().tobytes()).hexdigest())\n"
    )
    runs = [
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        for _ in range(2)
    ]
    A, B = aux_bases(7, "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k", 768, 1280, 100, 50)
    import hashlib

    here = hashlib.sha256(A.numpy().tobytes() + B.numpy().tobytes()).hexdigest()
    assert runs[0].strip() == runs[1].strip() == here


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_targets_are_every_attention_projection(arch, request):
    pipe = request.getfixturevalue(f"tiny_{arch}")
    lidb = LiDB(pipe)
    unet_attention = [m for m in pipe.unet.modules() if hasattr(m, "to_q")]
    text_layers = sum(
        e.config.num_hidden_layers for e in [pipe.text_encoder, getattr(pipe, "text_encoder_2", None)] if e is not None
    )
    assert len(lidb.layers) == 4 * len(unet_attention) + 4 * text_layers
    names = lidb.layer_names
    assert any(".attn1.to_q" in n for n in names) and any(".attn2.to_out.0" in n for n in names)
    assert any(n.startswith("text_encoder.") and n.endswith("self_attn.out_proj") for n in names)
    assert (arch == "sdxl") == any(n.startswith("text_encoder_2.") for n in names)
    with pytest.raises(HdbError, match="already attached"):
        LiDB(pipe)


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_zero_weights_leave_the_model_unchanged(arch, request):
    pipe = request.getfixturevalue(f"tiny_{arch}")
    with torch.no_grad():
        cond_before, noise_before = forward(pipe)
        LiDB(pipe)  # fresh LiDB: B_train = 0
        cond_after, noise_after = forward(pipe)
    assert torch.equal(cond_before.embeds, cond_after.embeds)
    assert torch.equal(noise_before, noise_after)


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_prompts_encode_as_the_pipeline_encodes_them(arch, request):
    # training tokenises once and encodes every step; the embeddings must be the pipeline's own
    pipe = request.getfixturevalue(f"tiny_{arch}")
    randomize(LiDB(pipe))  # LiDB layers in the text encoders take part
    with torch.no_grad():
        ours = encode_prompts(pipe, PROMPTS)
        if arch == "sdxl":
            embeds, _, pooled, _ = pipe.encode_prompt(
                PROMPTS, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False
            )
            torch.testing.assert_close(ours.pooled, pooled, atol=0, rtol=0)
        else:
            embeds, _ = pipe.encode_prompt(PROMPTS, "cpu", 1, False)
            assert ours.pooled is None
    torch.testing.assert_close(ours.embeds, embeds, atol=0, rtol=0)
    assert not torch.equal(ours.embeds[0], ours.embeds[1])


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_per_sample_batch_equals_one_sample_at_a_time(arch, request):
    pipe = request.getfixturevalue(f"tiny_{arch}")
    lidb = LiDB(pipe)
    generator = torch.Generator().manual_seed(1)
    A = torch.randn(2, *lidb.A_train.shape, generator=generator) * 0.1
    B = torch.randn(2, *lidb.B_train.shape, generator=generator) * 0.3
    with torch.no_grad():
        lidb.own.use_per_sample(A, B)
        cond, batched = forward(pipe)
        for sample in range(2):
            # the same person as shared weights, one prompt at a time
            lidb.own.use_shared()
            lidb.own.load_weights(A[sample], B[sample])
            generator = torch.Generator().manual_seed(0)
            latents = torch.randn(2, 4, 8, 8, generator=generator)[sample : sample + 1]
            single_cond = encode_prompts(pipe, PROMPTS[sample : sample + 1])
            single = predict_noise(pipe, latents, torch.tensor([10, 700])[sample : sample + 1], single_cond)
            torch.testing.assert_close(single_cond.embeds[0], cond.embeds[sample], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(single[0], batched[sample], atol=1e-5, rtol=1e-5)
    # the per-sample path changes outputs (it is not silently ignored)
    lidb.own.use_shared()
    lidb.own.load_weights(torch.zeros_like(lidb.A_train), torch.zeros_like(lidb.B_train))
    with torch.no_grad():
        assert not torch.allclose(forward(pipe)[1], batched, atol=1e-3)


def test_merge_unmerge_and_scale(tiny_sd15):
    lidb = LiDB(tiny_sd15)
    randomize(lidb)
    with torch.no_grad():
        _, unmerged = forward(tiny_sd15)
        lidb.merge()
        _, merged = forward(tiny_sd15)
        lidb.unmerge()
        _, again = forward(tiny_sd15)
        lidb.set_scale(0.0)
        _, scale_zero = forward(tiny_sd15)
        lidb.unload()
        _, base = forward(tiny_sd15)
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(again, unmerged, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(scale_zero, base, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(unmerged, base, atol=1e-3)
    torch.testing.assert_close(again, unmerged, atol=0, rtol=0)  # unmerging puts the very same weights back


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_thousand_merge_cycles_leave_the_base_weights_bit_identical(dtype):
    from hdb.models import build_tiny_pipeline

    pipe = build_tiny_pipeline("sd15").to(dtype=dtype)
    lidb = LiDB(pipe)
    randomize(lidb)
    original = {name: layer.base.weight.detach().clone() for name, layer in lidb.layers.items()}
    for cycle in range(1000):
        lidb.set_scale(0.5 + (cycle % 3) / 2)  # strengths change between cycles, as visitors' do
        lidb.merge()
        if cycle == 0:
            assert any(not torch.equal(layer.base.weight, original[n]) for n, layer in lidb.layers.items())
        lidb.unmerge()
    assert all(torch.equal(layer.base.weight, original[name]) for name, layer in lidb.layers.items())
    assert lidb.merged_bytes() == sum(w.numel() * w.element_size() for w in original.values())


def test_generation_merges_the_person_and_leaves_the_base_exactly_as_it_was(tiny_sd15):
    from hdb.generate import generate

    def picture(lidb, **options):
        return np.asarray(generate(tiny_sd15, lidb, "a photo of sks person", steps=3, seed=1, **options)[0], np.int16)

    base = picture(None)
    weights = {name: p.detach().clone() for name, p in tiny_sd15.unet.named_parameters()}
    lidb = LiDB(tiny_sd15)
    randomize(lidb)
    merged, unmerged = picture(lidb), picture(lidb, merge=False)
    assert np.abs(merged - unmerged).max() <= 2  # the same function, summed in another order
    assert np.abs(merged - base).max() > 10  # the person changes the picture
    assert np.array_equal(picture(lidb, identity_strength=0.0), base)  # strength 0 is the base model
    half = picture(lidb, identity_strength=0.5)
    assert not np.array_equal(half, merged) and not np.array_equal(half, base)
    for _ in range(10):  # visitors taking turns
        randomize(lidb)
        picture(lidb)
    assert not lidb.merged
    lidb.unload()
    assert np.array_equal(picture(None), base)
    current = dict(tiny_sd15.unet.named_parameters())
    assert all(torch.equal(current[name], value) for name, value in weights.items())
    lidb = LiDB(tiny_sd15)
    lidb.merge()
    with (
        pytest.raises(HdbError, match="unmerge it before training"),
        training_stage(tiny_sd15, lidb, "finetuning", "-"),
    ):
        pass


def test_relax_rank_keeps_the_function(tiny_sd15):
    lidb = LiDB(tiny_sd15)
    randomize(lidb)
    with torch.no_grad():
        _, before = forward(tiny_sd15)
        lidb.start_from(lidb.A_train.detach().clone(), lidb.B_train.detach().clone(), 4)
        _, after = forward(tiny_sd15)
    assert lidb.A_train.shape[1] == 4 and lidb.B_train.shape[2] == 4
    torch.testing.assert_close(after, before, atol=1e-6, rtol=1e-6)


def test_a_plain_lora_on_top_starts_as_a_no_op_then_merges_and_goes_away(tiny_sd15):
    lidb = LiDB(tiny_sd15)
    randomize(lidb)
    with torch.no_grad():
        _, lidb_only = forward(tiny_sd15)
        lidb.add_lora(3, torch.Generator().manual_seed(0))
        _, fresh_lora = forward(tiny_sd15)  # up = 0: the function is unchanged, as when LoRA training starts
        assert lidb.trainable_parameters() == [*lidb.plain_lora().downs, *lidb.plain_lora().ups]
        assert not lidb.A_train.requires_grad  # the prediction stays as it is
        for up in lidb.plain_lora().ups:
            up.normal_(0, 0.05)
        _, with_lora = forward(tiny_sd15)
        lidb.merge()
        _, merged = forward(tiny_sd15)
        lidb.unmerge()
        lidb.start_from(lidb.A_train.clone(), lidb.B_train.clone())  # loading weights takes the LoRA off
        _, again = forward(tiny_sd15)
    torch.testing.assert_close(fresh_lora, lidb_only, atol=0, rtol=0)
    assert (with_lora - lidb_only).abs().max() > 1e-3
    torch.testing.assert_close(merged, with_lora, atol=1e-5, rtol=1e-5)  # merging includes the LoRA
    torch.testing.assert_close(again, lidb_only, atol=0, rtol=0)
    assert lidb.lora_rank == 0 and lidb.trainable_parameters() == [lidb.A_train, lidb.B_train]
    assert lidb.A_train.requires_grad


def test_a_merged_prediction_trains_its_plain_lora_as_the_unmerged_one_does(tiny_sd15):
    lidb = LiDB(tiny_sd15)
    randomize(lidb)
    lidb.add_lora(2, torch.Generator().manual_seed(0))
    for up in lidb.plain_lora().ups:
        up.data.normal_(0, 0.05)

    def lora_gradients():
        _, prediction = forward(tiny_sd15)
        grads = torch.autograd.grad(prediction.square().mean(), lidb.trainable_parameters())
        return prediction.detach(), torch.cat([g.flatten() for g in grads])

    unmerged, grads = lora_gradients()
    lidb.merge([lidb.own])  # the LiDB in the weights, the LoRA live: how the paper-style finetune runs
    merged, merged_grads = lora_gradients()
    lidb.merge()  # already merged: nothing changes
    lidb.unmerge()
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(merged_grads, grads, atol=1e-5, rtol=1e-4)
    assert not lidb.merged and lidb.lora_rank == 2


def test_the_weight_distance_compares_updates_not_factors(tiny_sd15):
    lidb = LiDB(tiny_sd15, LiDBConfig(rank=2, a=8, b=4))  # a <= in and b <= out, as in every SD layer
    generator = torch.Generator().manual_seed(0)
    A, B = (
        torch.randn(3, *lidb.A_train.shape, generator=generator),
        torch.randn(3, *lidb.B_train.shape, generator=generator),
    )
    mix = torch.tensor([[2.0, 1.0], [0.5, 3.0]])  # any invertible r x r change of factors: the same update
    assert weight_distance(mix @ A, B @ torch.linalg.inv(mix), A, B).max() < 1e-9
    torch.testing.assert_close(weight_distance(0 * A, B, A, B), torch.ones(3))  # "predict nothing" scores 1
    # equal to the distance between the dense dW matrices, as the aux bases are orthonormal
    layer = lidb.layers[lidb.layer_names[5]]
    other = torch.randn(A.shape, generator=generator)
    dense = [layer.B_aux @ (b[5] @ a[5]) @ layer.A_aux for a, b in ((A[0], B[0]), (other[0], B[0]))]
    one_layer = weight_distance(A[:1, 5:6], B[:1, 5:6], other[:1, 5:6], B[:1, 5:6])
    torch.testing.assert_close(
        one_layer[0], (dense[0] - dense[1]).square().sum() / dense[1].square().sum(), rtol=1e-4, atol=0
    )


def lidb_gradients(pipe, checkpointing: bool, per_sample: bool):
    lidb = LiDB(pipe)
    randomize(lidb)
    if checkpointing:
        pipe.unet.enable_gradient_checkpointing()
        pipe.text_encoder.gradient_checkpointing_enable()
    pipe.unet.train()
    pipe.text_encoder.train()
    weights = [lidb.A_train, lidb.B_train]
    if per_sample:
        weights = [
            lidb.A_train.detach().repeat(2, 1, 1, 1).requires_grad_(),
            lidb.B_train.detach().repeat(2, 1, 1, 1).requires_grad_(),
        ]
        lidb.own.use_per_sample(*weights)
    _, noise = forward(pipe)
    noise.square().mean().backward()
    return [w.grad.clone() for w in weights]


@pytest.mark.parametrize("per_sample", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients(per_sample):
    from hdb.models import build_tiny_pipeline

    plain = lidb_gradients(build_tiny_pipeline("sd15"), checkpointing=False, per_sample=per_sample)
    checkpointed = lidb_gradients(build_tiny_pipeline("sd15"), checkpointing=True, per_sample=per_sample)
    for g_plain, g_checkpointed in zip(plain, checkpointed, strict=True):
        assert g_plain.abs().sum() > 0
        torch.testing.assert_close(g_checkpointed, g_plain, atol=1e-6, rtol=1e-5)


def outputs_and_gradients(pipe, lidb, per_sample: bool, passes: int = 1):
    """Text embeddings, noise prediction and the LiDB weights' gradients after `passes` forward+backward passes."""
    weights = [lidb.A_train, lidb.B_train]
    if per_sample:
        weights = [w.detach().repeat(2, 1, 1, 1).requires_grad_() for w in weights]
        lidb.own.use_per_sample(*weights)
    for _ in range(passes):  # as gradient accumulation runs them: each backward before the next forward
        cond, noise = forward(pipe)
        noise.square().mean().backward()
    return [cond.embeds.detach(), noise.detach(), *(w.grad.clone() for w in weights)]


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
@pytest.mark.parametrize("per_sample", [False, True])
def test_factors_built_per_component_equal_each_layer_building_its_own(arch, per_sample, request):
    pipe = request.getfixturevalue(f"tiny_{arch}")
    lidb = LiDB(pipe, LiDBConfig(rank=2))
    randomize(lidb)
    with training_stage(pipe, lidb, "testing", "nothing"):
        batched = outputs_and_gradients(pipe, lidb, per_sample)
        assert all(factors is not None for factors in lidb.own.built)
    lidb.own.batch_factors = False  # every layer builds its own
    with training_stage(pipe, lidb, "testing", "nothing"):
        each_layer = outputs_and_gradients(pipe, lidb, per_sample)
        assert all(factors is None for factors in lidb.own.built)
    assert batched[3].abs().sum() > 0  # B gets gradients
    for ours, reference in zip(batched, each_layer, strict=True):
        torch.testing.assert_close(ours, reference, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("per_sample", [False, True])
def test_accumulated_passes_with_checkpointing_rebuild_their_factors(tiny_sd15, per_sample):
    lidb = LiDB(tiny_sd15)
    randomize(lidb)
    with training_stage(tiny_sd15, lidb, "testing", "nothing", gradient_checkpointing=True):
        once = outputs_and_gradients(tiny_sd15, lidb, per_sample)
    with training_stage(tiny_sd15, lidb, "testing", "nothing", gradient_checkpointing=True):
        twice = outputs_and_gradients(tiny_sd15, lidb, per_sample, passes=2)
    for ours, reference in zip(twice[2:], once[2:], strict=True):
        torch.testing.assert_close(ours, 2 * reference, atol=1e-6, rtol=1e-5)


def test_building_factors_per_component_saves_operations(tiny_sd15):
    """Fewer ATen operations (about kernel launches on a GPU) for a training forward+backward, per layer."""
    from hdb.bench import OperationCounter

    lidb = LiDB(tiny_sd15, LiDBConfig(rank=4))
    randomize(lidb)

    def operations() -> int:
        with training_stage(tiny_sd15, lidb, "testing", "nothing"), OperationCounter() as counter:
            outputs_and_gradients(tiny_sd15, lidb, per_sample=False)
        return counter.count

    batched = operations()
    lidb.own.batch_factors = False
    each_layer = operations()
    groups = sum(len(layers.groups) for layers in lidb.own.components.values())
    assert groups < len(lidb.layers) / 4  # 40 layers of 4 shapes
    # each layer's own build: 2 matmuls forward, 4 in backward, and their gradients' gathering
    assert each_layer - batched >= 5 * len(lidb.layers), (each_layer, batched)


def test_factors_follow_every_change_of_the_weights(tiny_sd15):
    """Built factors are dropped whenever the weights change outside a step: a layer never computes stale ones."""
    lidb = LiDB(tiny_sd15)
    randomize(lidb)
    layer = lidb.layers[lidb.layer_names[-1]]  # a text encoder layer, called on its own
    x = torch.randn(3, layer.base.in_features)
    with torch.no_grad():
        forward(tiny_sd15)
        assert lidb.own.built[layer.index] is not None
        before = layer(x)
        other = lidb.A_train * 2, lidb.B_train * 3
        lidb.own.load_weights(*other)
        assert lidb.own.built[layer.index] is None
        fresh = layer.base(x) + x @ (layer.delta_weight().T)
        torch.testing.assert_close(layer(x), fresh, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(layer(x), before)
        for change in (lambda: lidb.set_scale(0.5), lidb.merge, lidb.own.use_shared):
            if lidb.merged:
                lidb.unmerge()
            forward(tiny_sd15)
            assert lidb.own.built[layer.index] is not None
            change()
            assert all(factors is None for factors in lidb.own.built)
    lidb.unload()  # the pre-hooks go with the layers
    lidb.own.build = lambda component: pytest.fail("a detached LiDB built factors")
    with torch.no_grad():
        forward(tiny_sd15)


def test_per_sample_weights_must_match_the_batch(tiny_sd15):
    lidb = LiDB(tiny_sd15)
    lidb.own.use_per_sample(torch.zeros(3, *lidb.A_train.shape), torch.zeros(3, *lidb.B_train.shape))
    with pytest.raises(HdbError, match="3 samples but a batch of 2"), torch.no_grad():
        forward(tiny_sd15)
    with pytest.raises(HdbError, match="per-sample"):
        lidb.own.use_per_sample(torch.zeros(*lidb.A_train.shape), torch.zeros(*lidb.B_train.shape))


def test_aux_fingerprint_tracks_seed(tiny_sd15):
    from hdb.models import build_tiny_pipeline

    other = LiDB(build_tiny_pipeline("sd15"), LiDBConfig(seed=1))
    lidb = LiDB(tiny_sd15)
    assert lidb.aux_fingerprint() != other.aux_fingerprint()
    assert arch_fingerprint(lidb.layer_shapes) == arch_fingerprint(other.layer_shapes)
    assert aux_fingerprint([torch.ones(2, 2)]) == aux_fingerprint([torch.ones(2, 2) + 1e-7])  # rounding-stable


def test_terms_on_top_are_summed_merged_and_trained_whatever_they_are(tiny_sd15):
    """A layer's low-rank terms are a list: two plain LoRAs on top (standing in for a new relaxation's state) are
    both drawn, both merged and both trained, with no change to the layer."""
    from hdb.lidb import LoRATerm

    lidb = LiDB(tiny_sd15)
    randomize(lidb)
    shapes, generator = list(lidb.layer_shapes.values()), torch.Generator().manual_seed(0)
    first, second = (LoRATerm.starting(rank, shapes, lidb.A_train.device, generator) for rank in (1, 3))
    with torch.no_grad():
        for up in first.ups + second.ups:
            up.normal_(0, 0.05, generator=generator)
        _, lidb_only = forward(tiny_sd15)
        lidb.put_on_top(first)
        _, with_first = forward(tiny_sd15)
        lidb.put_on_top(first, second)
        _, with_both = forward(tiny_sd15)
        layer = next(iter(lidb.layers.values()))
        x = torch.randn(2, layer.base.in_features, generator=generator)
        expected = layer.base(x) + x @ (layer.delta_weight(lidb.terms.terms).T)
        torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
        with lidb.merged_into_weights():
            _, merged = forward(tiny_sd15)
    assert (with_first - lidb_only).abs().max() > 1e-3 and (with_both - with_first).abs().max() > 1e-3
    torch.testing.assert_close(merged, with_both, atol=1e-5, rtol=1e-5)
    assert lidb.trainable_parameters() == [*first.parameters(), *second.parameters()]  # the LiDB weights stay
    with lidb.merged_while_training():  # the fixed LiDB in the weights, both terms live
        assert lidb.terms.merged == (lidb.own,)
        _, training = forward(tiny_sd15)
    torch.testing.assert_close(training, with_both, atol=1e-5, rtol=1e-5)

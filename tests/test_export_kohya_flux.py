"""A FLUX person as a kohya LoRA: the modules kohya's sd-scripts name (networks/lora_flux.py), which ComfyUI and Forge
load, each one's LoRA exactly the person's, read back here by sd-scripts' convention and by diffusers' own converter.

diffusers' `FluxPipeline.load_lora_weights` cannot load a tiny model's kohya file: its converter splits linear1 by
FLUX.1's widths, written into it (3072 x 3 + 12288 rows), and fails on any other. So the tiny file is read back by
the test's own reading of the convention, and diffusers' converter reads a file of a person at FLUX.1's real widths.
"""

from dataclasses import replace

import pytest
import torch
from diffusers import FluxPipeline
from helpers import trained_person
from safetensors import safe_open
from safetensors.torch import load_file

from hdb.export import export_lora, personal_lora_factors
from hdb.lidb import LiDBConfig, aux_bases, aux_fingerprint
from hdb.models import build_tiny_pipeline
from hdb.personal_file import PersonalWeights, load_personal, save_personal

MADE = "2024-01-02T03:04:05+00:00"
# The tiny FLUX's modules as sd-scripts name them: 1 double block, 1 single block, a 2-layer CLIP
TINY_MODULES = [
    "lora_unet_double_blocks_0_img_attn_qkv",
    "lora_unet_double_blocks_0_img_attn_proj",
    "lora_unet_double_blocks_0_txt_attn_qkv",
    "lora_unet_double_blocks_0_txt_attn_proj",
    "lora_unet_single_blocks_0_linear1",
    *(
        f"lora_te1_text_model_encoder_layers_{layer}_self_attn_{projection}"
        for layer in (0, 1)
        for projection in ("q_proj", "k_proj", "v_proj", "out_proj")
    ),
]
# What each kohya module of a block is in diffusers' FluxTransformer2DModel: BFL's fused linears stack these layers'
# outputs, in this order (BFL's flux/modules/layers.py: qkv is "(K H D)" with K = q, k, v; linear1 is qkv, then mlp)
KOHYA_TO_DIFFUSERS = {
    "double_blocks": (
        "transformer_blocks",
        {
            "img_attn_qkv": ["attn.to_q", "attn.to_k", "attn.to_v"],
            "img_attn_proj": ["attn.to_out.0"],
            "txt_attn_qkv": ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"],
            "txt_attn_proj": ["attn.to_add_out"],
        },
    ),
    "single_blocks": ("single_transformer_blocks", {"linear1": ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"]}),
}


def classic(layer: str) -> str:
    """A CLIP layer by its transformers-4 path, as LoRA files name it (transformers 5 dropped `text_model`)."""
    if layer.startswith("text_encoder.") and not layer.startswith("text_encoder.text_model."):
        return layer.replace("text_encoder.", "text_encoder.text_model.", 1)
    return layer


def kohya_modules(state: dict[str, torch.Tensor]) -> set[str]:
    return {key.split(".", 1)[0] for key in state}


def diffusers_layers(module: str) -> tuple[str, list[str]]:
    """ "lora_unet_double_blocks_0_img_attn_qkv" -> ("transformer.transformer_blocks.0.", ["attn.to_q", ...])."""
    kind, rest = module.removeprefix("lora_unet_").split("_blocks_")
    index, name = rest.split("_", 1)
    block, modules = KOHYA_TO_DIFFUSERS[f"{kind}_blocks"]
    return f"transformer.{block}.{index}.", modules[name]


def deltas_read_as_sd_scripts_does(state: dict[str, torch.Tensor], rows: dict[str, int]) -> dict[str, torch.Tensor]:
    """Each hdb layer's weight delta from a kohya FLUX file, as sd-scripts merges one (networks/lora_flux.py): a
    module adds up @ down * alpha / rank to its linear, rank = down's rows; a fused linear's output rows are its
    parts' in order. `rows`: each diffusers layer's output width. CLIP's modules are its paths, "_" for "."."""
    deltas = {}
    for module in sorted(kohya_modules(state)):
        down, up = state[f"{module}.lora_down.weight"].double(), state[f"{module}.lora_up.weight"].double()
        delta = up @ down * (state[f"{module}.alpha"].item() / down.shape[0])
        if module.startswith("lora_te1_text_model_"):
            path = module.removeprefix("lora_te1_text_model_")
            layer, projection = path.split("_self_attn_")
            deltas[f"text_encoder.text_model.{layer.replace('_', '.')}.self_attn.{projection}"] = delta
            continue
        block, parts = diffusers_layers(module)
        widths = [rows[block + part] for part in parts]
        assert delta.shape[0] == sum(widths), module
        for part, part_rows in zip(parts, delta.split(widths), strict=True):
            deltas[block + part] = part_rows
    return deltas


def personal_deltas(weights: PersonalWeights) -> dict[str, torch.Tensor]:
    """Each layer's delta lora_B @ lora_A, from the personal file (CLIP's layers by their classic path)."""
    return {classic(name): up.double() @ down.double() for name, (down, up) in personal_lora_factors(weights).items()}


@pytest.fixture(scope="module")
def tiny_flux_person(tmp_path_factory):
    """A tiny FLUX person (LiDB rank 1 and a plain rank-2 LoRA: R = 3), saved, and the tiny pipeline it was made on."""
    pipe = build_tiny_pipeline("flux")
    weights = replace(PersonalWeights.from_lidb(trained_person(pipe, lora_rank=2)), created=MADE)
    person = save_personal(weights, tmp_path_factory.mktemp("flux") / "person.safetensors")
    return pipe, person


def test_the_modules_are_named_and_shaped_as_sd_scripts_names_them(tiny_flux_person, tmp_path):
    pipe, person = tiny_flux_person
    lora = export_lora(load_personal(person), tmp_path / "me.safetensors", "kohya")
    state = load_file(str(lora))
    assert kohya_modules(state) == set(TINY_MODULES)
    assert {key.split(".", 1)[1] for key in state} == {"lora_down.weight", "lora_up.weight", "alpha"}
    rank = 3
    width = pipe.transformer.config.num_attention_heads * pipe.transformer.config.attention_head_dim  # 32
    mlp = pipe.transformer.single_transformer_blocks[0].proj_mlp.out_features  # 4 x the width
    clip = pipe.text_encoder.config.hidden_size
    shapes = {
        "lora_unet_double_blocks_0_img_attn_qkv": ((3 * rank, width), (3 * width, 3 * rank)),
        "lora_unet_double_blocks_0_img_attn_proj": ((rank, width), (width, rank)),
        "lora_unet_double_blocks_0_txt_attn_qkv": ((3 * rank, width), (3 * width, 3 * rank)),
        "lora_unet_double_blocks_0_txt_attn_proj": ((rank, width), (width, rank)),
        "lora_unet_single_blocks_0_linear1": ((3 * rank, width), (3 * width + mlp, 3 * rank)),  # q, k, v, then MLP
    }
    for module in TINY_MODULES:
        down, up = shapes.get(module, ((rank, clip), (clip, rank)))
        assert state[f"{module}.lora_down.weight"].shape == down, module
        assert state[f"{module}.lora_up.weight"].shape == up, module
        assert state[f"{module}.alpha"].item() == down[0], module  # alpha = the module's rank: scale 1


def test_each_layer_reads_back_as_the_persons_own_delta(tiny_flux_person, tmp_path):
    _, person = tiny_flux_person
    weights = load_personal(person)
    state = load_file(str(export_lora(weights, tmp_path / "me.safetensors", "kohya")))
    clean = build_tiny_pipeline("flux").transformer  # the widths of the model's own layers (the fixture's hold LiDB)
    rows = {f"transformer.{name}": module.out_features for name, module in clean.named_modules()
            if isinstance(module, torch.nn.Linear)}  # fmt: skip
    read = deltas_read_as_sd_scripts_does(state, rows)
    expected = personal_deltas(weights)
    mlp = "transformer.single_transformer_blocks.0.proj_mlp"
    assert set(read) == set(expected) | {mlp}
    assert not read[mlp].any()  # the MLP's rows of linear1: hdb leaves the MLP alone
    for layer, delta in expected.items():
        torch.testing.assert_close(read[layer], delta, atol=1e-6, rtol=0, msg=layer)
        assert delta.abs().max() > 1e-3, layer  # a real delta, not two zeros agreeing


def test_a_flux_person_exports_to_the_same_bytes_every_time(tiny_flux_person, tmp_path):
    _, person = tiny_flux_person
    first, second = (export_lora(load_personal(person), tmp_path / f"{n}" / "me.safetensors", "kohya") for n in (1, 2))
    assert first.read_bytes() == second.read_bytes()


def test_the_metadata_names_flux_as_sd_scripts_write_it(tiny_flux_person, tmp_path):
    """ss_base_model_version is sd-scripts' MODEL_VERSION_FLUX_V1 (library/flux_utils.py); ModelSpec's entries are
    library/sai_model_spec.py's for FLUX.1 [dev], which writes no prediction type for FLUX."""
    _, person = tiny_flux_person
    with safe_open(str(export_lora(load_personal(person), tmp_path / "me.safetensors", "kohya")), "pt") as file:
        metadata = file.metadata()
    assert metadata == {
        "ss_network_module": "networks.lora_flux",
        "ss_network_dim": "3",
        "ss_network_alpha": "3",
        "ss_base_model_version": "flux1",
        "ss_v2": "False",
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": "flux-1-dev/lora",
        "modelspec.implementation": "https://github.com/black-forest-labs/flux",
        "modelspec.resolution": "1024x1024",
        "modelspec.title": "me",
        "modelspec.trigger_phrase": "a sks face",
        "modelspec.date": MADE,
    }


def full_width_flux_person() -> PersonalWeights:
    """A person on FLUX.1's real layer widths (3072; CLIP-L 768) in its last blocks, with random weights."""
    layer_shapes = {}
    for part in ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"):
        layer_shapes[f"transformer.transformer_blocks.18.attn.{part}"] = (3072, 3072)
    for part in ("to_q", "to_k", "to_v"):
        layer_shapes[f"transformer.single_transformer_blocks.37.attn.{part}"] = (3072, 3072)
    for part in ("q_proj", "k_proj", "v_proj", "out_proj"):
        layer_shapes[f"text_encoder.encoder.layers.11.self_attn.{part}"] = (768, 768)
    config = LiDBConfig(rank=1)
    bases = [aux_bases(config.seed, name, i, o, config.a, config.b) for name, (i, o) in layer_shapes.items()]
    generator = torch.Generator().manual_seed(0)
    count = len(layer_shapes)
    return PersonalWeights(
        A=torch.randn(count, config.rank, config.a, generator=generator),
        B=torch.randn(count, config.b, config.rank, generator=generator),
        config=config,
        layer_shapes=layer_shapes,
        arch_fingerprint="",
        aux_fingerprint=aux_fingerprint(basis for pair in bases for basis in pair),
        instance_prompt="a sks face",
        base_model="black-forest-labs/FLUX.1-dev",
        base_family="flux",
        prediction_type="flow",
        lora_down=[torch.randn(2, i, generator=generator) for i, _ in layer_shapes.values()],
        lora_up=[torch.randn(o, 2, generator=generator) for _, o in layer_shapes.values()],
        created=MADE,
    )


# The converter names CLIP's layers in diffusers' older attention-processor style, which `load_lora_weights` renames
CLIP_PROCESSOR_NAMES = {"to_q_lora": "q_proj", "to_k_lora": "k_proj", "to_v_lora": "v_proj", "to_out_lora": "out_proj"}


def diffusers_factors(converted: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """layer -> (lora_A, lora_B) from diffusers' converted state dict."""
    factors = {}
    for key, down in converted.items():
        if key.endswith(".lora_A.weight"):
            factors[key.removesuffix(".lora_A.weight")] = (down, converted[key.replace(".lora_A.", ".lora_B.")])
        elif key.endswith("_lora.down.weight"):
            module, processor = key.removesuffix(".down.weight").rsplit(".", 1)
            layer = f"{module}.{CLIP_PROCESSOR_NAMES[processor]}"
            factors[layer] = (down, converted[key.replace(".down.", ".up.")])
    return factors


def test_diffusers_own_kohya_converter_reads_each_layer_of_a_full_width_person(tmp_path):
    """`FluxPipeline.lora_state_dict` converts a kohya file to diffusers' layers as `load_lora_weights` loads it."""
    weights = full_width_flux_person()
    state = load_file(str(export_lora(weights, tmp_path / "me.safetensors", "kohya")))
    assert state["lora_unet_single_blocks_37_linear1.lora_up.weight"].shape == (3 * 3072 + 12288, 9)
    read = diffusers_factors(FluxPipeline.lora_state_dict(str(tmp_path / "me.safetensors")))
    expected = personal_deltas(weights)
    mlp = "transformer.single_transformer_blocks.37.proj_mlp"
    assert set(read) == set(expected) | {mlp}
    assert not read[mlp][1].any()  # lora_B zero: the MLP is left alone
    for layer, delta in expected.items():
        down, up = read[layer]
        assert (up.double() @ down.double() - delta).abs().max() <= 1e-6, layer  # (assert_close: seconds a layer)

"""`python -m hdb bench`: what personalisation costs, beside what a user would pick instead.

Measured in one run on one machine: hypernetwork forward, seconds per fast-finetune step, a whole
personalisation (prediction + 40 steps), peak memory and the personal file's size; what a user waits
for, end to end (photo -> aligned face -> personalised -> the first 4 pictures), and generation with
and without a person; then the baselines, DreamBooth (full UNet finetune) and DreamBooth-LoRA (peft,
r=4), per step, extrapolated to their usual step counts. Optionally, eager steps with a channels-last
UNet, and the cold start: the first personalisation of a fresh process, with an empty and with a warm
compile cache (two child processes: `python -m hdb.bench OPTIONS_JSON`). `--count-operations` instead
counts the operations (about the GPU kernel launches) of a training step of each method: quick at any
size, on any device. Full-size runs use SD1.5-shaped models with random weights: the arithmetic, and
so the time and memory, are the real model's.
"""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode

from hdb.config import DEFAULT_INSTANCE_PROMPT, DecoderConfig, PersonalizeConfig
from hdb.devices import resolve_device, resolve_dtype
from hdb.diffusion import (
    Conditioning,
    augmented_views,
    encode_images,
    encode_prompts,
    sample_seed,
    step_loss,
    tokenize_prompts,
)
from hdb.errors import HdbError
from hdb.faces import AlignedFace, crop_size
from hdb.families import denoiser
from hdb.lidb import LiDB
from hdb.models import (
    Pipeline,
    build_full_size_sd15,
    build_tiny_pipeline,
    compile_pipeline,
    native_resolution,
    training_scheduler,
)
from hdb.options import DREAMBOOTH_LORA_STEPS, BenchOptions
from hdb.personal_file import save_personal
from hdb.pipeline import PersonalPipeline
from hdb.relaxations import relax
from hdb.seeding import initialised_from
from hdb.stage import training_stage
from hdb.styles import PERSON
from hdb.training import TrainConfig, make_optimizer, train

if TYPE_CHECKING:
    pass

DREAMBOOTH_STEPS = 1200  # the paper's DreamBooth: 1,000-1,200 steps (~5 min)


def _finetune_config(options: BenchOptions) -> PersonalizeConfig:
    return PersonalizeConfig(steps=options.steps, relax=options.relax, progress=False)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def _peak_memory(device: torch.device, record: dict, key: str):
    """Peak GPU memory (allocated) of the block; on CPU, the process's peak RSS so far (cumulative)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    yield
    if device.type == "cuda":
        record[key] = torch.cuda.max_memory_allocated(device) / 2**30
    else:
        record[key] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def time_call(fn: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


class OperationCounter(TorchDispatchMode):
    """Counts the ATen operations that do work (views, which launch nothing, excluded): on a GPU, about one
    kernel launch each. Backward counts too: autograd runs it under the same mode."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 (torch's signature)
        self.count += not func.is_view
        return func(*args, **(kwargs or {}))


def optimizer_operations(parameters: list[torch.nn.Parameter], name: str) -> int:
    """Operations one optimizer step over `parameters` dispatches (stepped on copies; the parameters stay put).

    Part of a step's count, set apart because it depends on the device more than the rest: on a GPU AdamW is
    fused (a few kernels for all tensors), on a CPU it runs ~10 operations per tensor.
    """
    copies = [torch.nn.Parameter(p.detach().clone()) for p in parameters]
    for copy in copies:
        copy.grad = torch.zeros_like(copy)
    optimizer = make_optimizer(copies, name, learning_rate=1e-6)
    optimizer.step()  # the first step also creates the state
    with OperationCounter() as counter:
        optimizer.step()
    return counter.count


def bench_pipeline(options: BenchOptions, device: torch.device) -> Pipeline:
    """The benchmarked pipeline (tiny, or SD1.5-shaped), random weights, built on the device in its dtype."""
    with torch.device(device):
        pipe = build_tiny_pipeline("sd15") if options.tiny else build_full_size_sd15(device=device)
    pipe.to(device, resolve_dtype(options.dtype, device))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _build(options: BenchOptions, device: torch.device) -> PersonalPipeline:
    """Pipeline and hypernetwork of the benchmarked size, random weights, built on the device."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from hdb.hypernet import HyperNetwork, build_tiny_image_encoder

    pipe = bench_pipeline(options, device)
    with torch.device(device):
        if options.tiny:
            encoder, encoder_name = build_tiny_image_encoder(), "tiny CLIP vision"
            decoder = DecoderConfig(width=64, depth=2, heads=4)
        else:
            vit_h = CLIPVisionConfig(
                hidden_size=1280,
                intermediate_size=5120,
                num_hidden_layers=32,
                num_attention_heads=16,
                image_size=224,
                patch_size=14,
            )
            with initialised_from(0):
                encoder = CLIPVisionModel(vit_h)
            encoder_name, decoder = "ViT-H/14-shaped CLIP vision (random)", DecoderConfig()
    with LiDB.attached(pipe) as lidb:  # the hypernetwork's shapes and aux bases: those of the pipeline's LiDB
        hypernet = HyperNetwork.for_lidb(lidb, encoder, encoder_name, decoder=decoder).to(device)
    hypernet.image_encoder.to(denoiser(pipe).dtype)
    return PersonalPipeline(pipe, hypernet)


def _photo(size: int) -> Image.Image:
    """A stand-in aligned face crop (timing does not depend on the pixels)."""
    generator = torch.Generator().manual_seed(0)
    pixels = (torch.rand(size, size, 3, generator=generator) * 255).to(torch.uint8).numpy()
    return Image.fromarray(pixels)


def _stand_in_face(pipe: Pipeline) -> AlignedFace:
    return AlignedFace.from_crop(_photo(crop_size(native_resolution(pipe))))


def bench_hdb(options: BenchOptions, personal: PersonalPipeline, device: torch.device) -> dict:
    record: dict = {}
    pipe, lidb, hypernet = personal.pipe, personal.lidb, personal.hypernet
    face = _stand_in_face(pipe)
    for _ in range(3):  # warm up the encoder kernels
        hypernet.predict(face.image)
    record["hypernet_forward_s"] = min(time_call(lambda: hypernet.predict(face.image), device) for _ in range(5))
    record.update(bench_generation(options, pipe, lidb, device))  # eager, before anything is compiled
    if options.channels_last:  # eager too, before anything is compiled
        record.update(bench_channels_last(options, personal, face, device))
    config = _finetune_config(options)
    compile_pipeline(pipe, options.compile)
    # first run compiles (when asked) and warms up; then the best of `repeats` warm runs
    record["first_personalization_s"] = time_call(lambda: personal.personalize(face, config), device)
    with _peak_memory(device, record, "peak_memory_gib"):
        record["personalization_s"], record["finetune_step_s"] = _warm_personalizations(options, personal, face, device)
    with tempfile.TemporaryDirectory() as folder:
        result_weights = personal.person
        record["file_bytes_relaxed_fp32"] = save_personal(result_weights, Path(folder) / "p.safetensors").stat().st_size
        record["file_bytes_relaxed_fp16"] = (
            save_personal(result_weights, Path(folder) / "p16.safetensors", torch.float16).stat().st_size
        )
        rank1 = replace(
            result_weights, A=result_weights.A[:, :1].contiguous(), B=result_weights.B[:, :, :1].contiguous()
        )
        record["file_bytes_r1_fp32"] = save_personal(rank1, Path(folder) / "r1.safetensors").stat().st_size
    record["personal_numbers_r1"] = len(lidb.layers) * (lidb.config.a + lidb.config.b)
    record.update(bench_first_images(options, personal, device))
    return record


def _warm_personalizations(
    options: BenchOptions, personal: PersonalPipeline, face: AlignedFace, device: torch.device
) -> tuple[float, float]:
    """The best of `repeats` personalisations: seconds for the whole, and the median seconds of a step in it."""
    config = _finetune_config(options)
    totals, step_medians = [], []
    step_times: list[float] = []  # when each step's loss was read

    def on_step(step: int, loss: float) -> None:
        step_times.append(time.perf_counter())

    for _ in range(options.repeats):
        step_times.clear()
        totals.append(time_call(lambda: personal.personalize(face, config, on_step), device))
        between = [b - a for a, b in zip(step_times, step_times[1:], strict=False)]
        step_medians.append(statistics.median_high(between))
    return min(totals), min(step_medians)


def bench_channels_last(
    options: BenchOptions, personal: PersonalPipeline, face: AlignedFace, device: torch.device
) -> dict:
    """Eager personalisation with the UNet in channels-last layout (cuDNN's preferred one), then back."""
    denoiser(personal.pipe).to(memory_format=torch.channels_last)
    try:
        personal.personalize(face, _finetune_config(options))  # warm-up: cuDNN picks its algorithms
        total, step = _warm_personalizations(options, personal, face, device)
    finally:
        denoiser(personal.pipe).to(memory_format=torch.contiguous_format)
    return {"personalization_channels_last_s": total, "finetune_step_channels_last_s": step}


def bench_first_images(options: BenchOptions, personal: PersonalPipeline, device: torch.device) -> dict:
    """What a user waits for, warm: photo -> aligned face -> personalised -> the first grid of pictures.

    Face alignment runs on the CPU with dlib; where dlib (or the photo) is missing, the timing starts
    from an already aligned crop and says so.
    """
    photo = Path(options.photo)
    can_align = photo.is_file() and importlib.util.find_spec("dlib") is not None
    stand_in = _stand_in_face(personal.pipe)
    config = _finetune_config(options)

    def first_images() -> dict:
        started = time.perf_counter()
        face = personal.faces(photo)[0] if can_align else stand_in
        aligned = time.perf_counter()
        personal.personalize(face, config)
        _sync(device)
        personalised = time.perf_counter()
        personal.generate(f"a {PERSON}", steps=options.generate_steps, num_images=options.first_images)
        _sync(device)
        done = time.perf_counter()
        return {
            "time_to_first_images_s": done - started,
            "first_images_align_s": aligned - started,
            "first_images_personalize_s": personalised - aligned,
            "first_images_generate_s": done - personalised,
        }

    first_images()  # warm-up (and, compiled, the generation graphs)
    best = min((first_images() for _ in range(options.repeats)), key=lambda parts: parts["time_to_first_images_s"])
    start = f"the photo {photo.name}, aligned with dlib" if can_align else "an aligned crop (no dlib or photo)"
    return {**best, "first_images": options.first_images, "first_images_from": start}


def bench_generation(options: BenchOptions, pipe: Pipeline, lidb: LiDB, device: torch.device) -> dict:
    """`generate_steps` sampling steps, 1 image and a first grid: the base model, the person merged, unmerged."""
    from hdb.generate import generate

    def seconds(strength: float, merge: bool, images: int) -> float:
        def run() -> None:
            generate(
                pipe,
                lidb,
                DEFAULT_INSTANCE_PROMPT,
                steps=options.generate_steps,
                num_images=images,
                identity_strength=strength,
                merge=merge,
            )

        run()  # warm-up
        return min(time_call(run, device) for _ in range(options.repeats))

    record = {"generate_steps": options.generate_steps}
    for images, suffix in ((1, ""), (options.first_images, f"_x{options.first_images}")):
        record[f"generate_base{suffix}_s"] = seconds(0.0, False, images)  # scale 0: LiDB layers pass through
        record[f"generate_person_merged{suffix}_s"] = seconds(1.0, True, images)
        record[f"generate_person_unmerged{suffix}_s"] = seconds(1.0, False, images)
    record["merge_memory_gib"] = lidb.merged_bytes() / 2**30
    return record


def _baseline_steps(
    pipe: Pipeline, parameters: list[torch.nn.Parameter], steps: int, device: torch.device, autocast: bool
) -> float:
    """Median seconds per step of the diffusion loss on one image, training `parameters`."""
    resolution = native_resolution(pipe)
    latents = encode_images(pipe, augmented_views(_photo(resolution), resolution, count=1)).float()
    scheduler = training_scheduler(pipe)
    with torch.no_grad():  # the baselines' text encoder is frozen: its embeddings are the same every step
        cond = encode_prompts(pipe, [DEFAULT_INSTANCE_PROMPT])
    cond.embeds = cond.embeds.to(
        denoiser(pipe).dtype
    )  # DreamBooth trains an fp32 UNet beside a half-precision text encoder
    times: list[float] = []

    def loss_fn(step: int) -> torch.Tensor:
        times.append(time.perf_counter())
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            return step_loss(pipe, scheduler, latents, cond, [sample_seed(0, step)]).mean()

    config = TrainConfig(steps=steps + 3, learning_rate=1e-6, progress=False, max_grad_norm=None)
    with training_stage(pipe, None, "timing a baseline", "fewer --baseline-steps, or --no-baselines"):
        for parameter in parameters:
            parameter.requires_grad_(True)
        train(parameters, loss_fn, config)
    _sync(device)
    times.append(time.perf_counter())
    per_step = [b - a for a, b in zip(times[3:], times[4:], strict=False)]  # skip 3 warm-up steps
    return statistics.median_high(per_step)


def _add_peft_lora(pipe: Pipeline) -> list[torch.nn.Parameter]:
    """DreamBooth-LoRA: peft's rank-4 LoRA on the UNet's attention projections (LiDB's UNet layers), fp32."""
    from peft import LoraConfig

    denoiser(pipe).add_adapter(
        LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    )
    lora_parameters = [p for name, p in denoiser(pipe).named_parameters() if "lora_" in name]
    for p in lora_parameters:
        p.data = p.data.float()
    return lora_parameters


def bench_baselines(options: BenchOptions, personal: PersonalPipeline, device: torch.device) -> dict:
    record: dict = {}
    personal.unload()
    pipe = personal.pipe
    lora_parameters = _add_peft_lora(pipe)
    with _peak_memory(device, record, "lora_peak_memory_gib"):
        record["lora_step_s"] = _baseline_steps(pipe, lora_parameters, options.baseline_steps, device, autocast=False)
    denoiser(pipe).delete_adapters("default")
    # DreamBooth: every UNet weight trains (fp32 master weights, bf16 autocast on GPU)
    denoiser(pipe).to(torch.float32)
    with _peak_memory(device, record, "dreambooth_peak_memory_gib"):
        record["dreambooth_step_s"] = _baseline_steps(
            pipe, list(denoiser(pipe).parameters()), options.baseline_steps, device, autocast=device.type == "cuda"
        )
    return record


def bench_operations(options: BenchOptions) -> dict:
    """ATen operations (about the kernel launches on a GPU) of one training forward+backward, for each way of
    training a person, and of one optimizer step apart. Counted, not timed: seconds at full size, on any device.

    hdb's LiDB with its factors built per component (now) and per layer (before); hdb with the paper's
    relaxation (prediction merged, a plain rank-4 LoRA training on the UNet and text encoder); and peft's
    DreamBooth-LoRA on the UNet alone, the text encoder frozen. The count does not depend on the resolution,
    so the latents are small.
    """
    device = resolve_device(options.device)
    pipe = bench_pipeline(options, device)
    scheduler = training_scheduler(pipe)
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0)).to(device)
    tokens = tokenize_prompts(pipe, [DEFAULT_INSTANCE_PROMPT])

    def operations(
        lidb: LiDB | None,
        prompt: list[torch.Tensor] | Conditioning,
        trained: list[torch.nn.Parameter],
        merge: bool = False,
    ) -> int:
        with training_stage(pipe, lidb, "counting operations", "--tiny"):
            for parameter in trained:
                parameter.requires_grad_(True)
            try:  # merged as personalisation merges (`--relax lora`: the prediction folded in, the LoRA live)
                counts = []
                with lidb.merged_while_training() if lidb is not None else contextlib.nullcontext():
                    for _ in range(2):  # the first pass warms up; the second is counted
                        with OperationCounter() as counter:
                            step_loss(pipe, scheduler, latents, prompt, [0]).mean().backward()
                        counts.append(counter.count)
            finally:
                for parameter in trained:
                    parameter.grad = None
        return counts[-1]

    rank = PersonalizeConfig().relaxed_rank
    with LiDB.attached(pipe) as lidb:
        relax(lidb, "lidb", *lidb.own.initial_weights(), rank)  # what `--relax lidb` trains
        record = {"operations_lidb": operations(lidb, tokens, lidb.trainable_parameters())}
        record["optimizer_operations_lidb"] = optimizer_operations(lidb.trainable_parameters(), TrainConfig.optimizer)
        lidb.own.batch_factors = False
        record["operations_lidb_per_layer"] = operations(lidb, tokens, lidb.trainable_parameters())
        lidb.own.batch_factors = True
        relax(lidb, "lora", *lidb.own.initial_weights(), rank)  # what `--relax lora` trains: a plain LoRA on top
        record["operations_relax_lora"] = operations(lidb, tokens, lidb.trainable_parameters())
        trained = lidb.trainable_parameters()
        record["optimizer_operations_relax_lora"] = optimizer_operations(trained, TrainConfig.optimizer)
        layers = len(lidb.layers)
    lora_parameters = _add_peft_lora(pipe)
    with torch.no_grad():  # DreamBooth-LoRA's text encoder is frozen: its embeddings are computed once
        cond = encode_prompts(pipe, [DEFAULT_INSTANCE_PROMPT])
    record["operations_peft_lora"] = operations(None, cond, lora_parameters)
    record["optimizer_operations_peft_lora"] = optimizer_operations(lora_parameters, TrainConfig.optimizer)
    return {
        "machine": _machine(device),
        "model": _model_name(options),
        "dtype": str(denoiser(pipe).dtype).replace("torch.", ""),
        "lidb_layers": layers,
        **record,
    }


def format_operations(record: dict) -> str:
    lora = record["operations_peft_lora"]
    rows = [
        ("hdb `--relax lidb`, factors built per component", "lidb", "optimizer_operations_lidb"),
        ("hdb `--relax lidb`, factors built in each layer", "lidb_per_layer", "optimizer_operations_lidb"),
        ("hdb `--relax lora` (prediction merged, plain LoRA)", "relax_lora", "optimizer_operations_relax_lora"),
        ("DreamBooth-LoRA (peft r=4, UNet only)", "peft_lora", "optimizer_operations_peft_lora"),
    ]
    lines = [
        f"operations per training step on {record['machine']}: {record['model']}, {record['dtype']}, "
        f"{record['lidb_layers']} LiDB layers (views excluded; about one GPU kernel each)",
        "",
        "| method | forward + backward | vs DreamBooth-LoRA | optimizer step |",
        "| --- | --- | --- | --- |",
    ]
    for label, key, optimizer in rows:
        count = record[f"operations_{key}"]
        lines.append(f"| {label} | {count:,} | {count / lora:.2f}x | {record[optimizer]:,} |")
    lines.append("hdb's steps train the text encoder too; DreamBooth-LoRA's use its frozen embeddings.")
    return "\n".join(lines)


def _machine(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"


def _model_name(options: BenchOptions) -> str:
    return "tiny SD1.5 (random)" if options.tiny else "SD1.5-shaped (random weights)"


def run_bench(options: BenchOptions) -> dict:
    device = resolve_device(options.device)
    built = time.perf_counter()
    personal = _build(options, device)
    pipe = personal.pipe
    record = {
        "machine": _machine(device),
        "model": _model_name(options),
        "dtype": str(denoiser(pipe).dtype).replace("torch.", ""),
        "resolution": native_resolution(pipe),
        "steps": options.steps,
        "relax": options.relax,
        "compiled": options.compile,
        "build_s": time.perf_counter() - built,
        "lidb_layers": len(personal.lidb.layers),
    }
    record.update(bench_hdb(options, personal, device))
    if options.baselines:
        record.update(bench_baselines(options, personal, device))
        record["baseline_steps_measured"] = options.baseline_steps
        record["lora_total_s"] = record["lora_step_s"] * DREAMBOOTH_LORA_STEPS
        record["dreambooth_total_s"] = record["dreambooth_step_s"] * DREAMBOOTH_STEPS
        record["speedup_vs_dreambooth"] = record["dreambooth_total_s"] / record["personalization_s"]
        record["speedup_vs_lora"] = record["lora_total_s"] / record["personalization_s"]
        record["step_ratio_vs_lora"] = record["finetune_step_s"] / record["lora_step_s"]
        unet_bytes = sum(p.numel() for p in denoiser(pipe).parameters()) * 2  # a DreamBooth UNet checkpoint in fp16
        record["size_ratio_vs_dreambooth"] = unet_bytes / record["file_bytes_r1_fp32"]
    if options.cold_start:
        del pipe, personal  # the fresh processes get the device to themselves
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()  # give the freed memory back to the driver, where the children can have it
        record.update(bench_cold_start(options))
    return record


def bench_cold_start(options: BenchOptions) -> dict:
    """The first personalisation of a fresh process, twice: with an empty compile cache, then with the cache
    the first process left. torch keeps compiled kernels and graphs on disk (inductor's FX graph and autograd
    caches, Triton's kernels); each child is pointed at one new folder through its own environment only.
    """
    child_options = replace(options, cold_start=False, baselines=False)
    record: dict = {}
    with tempfile.TemporaryDirectory(prefix="hdb_compile_cache_") as folder:
        cache = Path(folder)
        environment = compile_cache_environment(cache)
        for state in ("empty_cache", "warm_cache"):
            started = time.perf_counter()
            child = subprocess.run(
                [sys.executable, "-m", "hdb.bench", json.dumps(asdict(child_options))],
                env=environment,
                capture_output=True,
                text=True,
                check=False,
            )
            if child.returncode != 0:
                raise HdbError(f"the cold-start process failed:\n{child.stderr[-3000:]}")
            record[f"cold_start_{state}_process_s"] = time.perf_counter() - started  # imports and building too
            record[f"cold_start_{state}_s"] = json.loads(child.stdout.splitlines()[-1])["first_personalization_s"]
            if state == "empty_cache":
                record["compile_cache_mib"] = sum(f.stat().st_size for f in cache.rglob("*") if f.is_file()) / 2**20
    return record


def compile_cache_environment(cache: Path) -> dict[str, str]:
    """This process's environment, for a child whose torch.compile caches are kept in `cache` (and only there)."""
    return {
        **os.environ,
        "TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor"),
        "TRITON_CACHE_DIR": str(cache / "triton"),
        "TORCHINDUCTOR_FX_GRAPH_CACHE": "1",
        "TORCHINDUCTOR_AUTOGRAD_CACHE": "1",
    }


def first_personalization(options: BenchOptions) -> dict:
    """This process's first personalisation, compiling as `options.compile` says: what a fresh server pays."""
    device = resolve_device(options.device)
    personal = _build(options, device)
    compile_pipeline(personal.pipe, options.compile)
    config = _finetune_config(options)
    face = _stand_in_face(personal.pipe)
    return {"first_personalization_s": time_call(lambda: personal.personalize(face, config), device)}


def format_table(record: dict) -> str:
    lines = [
        f"hdb bench on {record['machine']}: {record['model']}, {record['dtype']}, {record['resolution']} px, "
        f"{record['lidb_layers']} LiDB layers, relax={record['relax']}, compiled={record['compiled']}",
        "",
        "| method | per step | steps | total | peak memory |",
        "| --- | --- | --- | --- | --- |",
        f"| hdb: hypernetwork + rank-relaxed finetune | {record['finetune_step_s'] * 1e3:.1f} ms | {record['steps']} | "
        f"{record['personalization_s']:.2f} s | {record['peak_memory_gib']:.2f} GiB |",
    ]
    if "lora_step_s" in record:
        lines += [
            f"| DreamBooth-LoRA (peft r=4) | {record['lora_step_s'] * 1e3:.1f} ms | {DREAMBOOTH_LORA_STEPS} "
            f"(extrapolated from {record['baseline_steps_measured']}) | "
            f"{record['lora_total_s']:.1f} s | {record['lora_peak_memory_gib']:.2f} GiB |",
            f"| DreamBooth (full UNet) | {record['dreambooth_step_s'] * 1e3:.1f} ms | {DREAMBOOTH_STEPS} "
            f"(extrapolated from {record['baseline_steps_measured']}) | "
            f"{record['dreambooth_total_s']:.1f} s | {record['dreambooth_peak_memory_gib']:.2f} GiB |",
            "",
            f"hdb is {record['speedup_vs_dreambooth']:.1f}x faster than DreamBooth and "
            f"{record['speedup_vs_lora']:.1f}x faster than DreamBooth-LoRA; "
            f"its r=1 file is {record['size_ratio_vs_dreambooth']:,.0f}x smaller than a fp16 DreamBooth UNet.",
        ]
    if "step_ratio_vs_lora" in record:
        lines.append(f"an hdb finetune step costs {record['step_ratio_vs_lora']:.2f}x a DreamBooth-LoRA step")
    if "finetune_step_channels_last_s" in record:
        lines.append(
            f"eager, UNet channels-last: {record['finetune_step_channels_last_s'] * 1e3:.1f} ms a step, "
            f"{record['personalization_channels_last_s']:.2f} s a personalisation"
        )
    for images, suffix in ((1, ""), (record["first_images"], f"_x{record['first_images']}")):
        base, merged, unmerged = (
            record[f"generate_{kind}{suffix}_s"] for kind in ("base", "person_merged", "person_unmerged")
        )
        pictures = f"{images} image{'s' if images > 1 else ''}, {record['generate_steps']} sampling steps"
        lines.append(
            f"{pictures}: base model {base:.2f} s; with the person merged {merged:.2f} s ({merged / base - 1:+.0%}), "
            f"unmerged {unmerged:.2f} s ({unmerged / base - 1:+.0%})"
        )
    compiling = "" if record["compiled"] == "none" else f", compiling ({record['compiled']})"
    lines += [
        f"merging holds {record['merge_memory_gib']:.2f} GiB of original weights",
        f"time to first images, warm: {record['time_to_first_images_s']:.2f} s from {record['first_images_from']} "
        f"to {record['first_images']} pictures (align {record['first_images_align_s']:.2f} s, personalise "
        f"{record['first_images_personalize_s']:.2f} s, generate {record['first_images_generate_s']:.2f} s)",
        f"hypernetwork forward: {record['hypernet_forward_s'] * 1e3:.1f} ms; "
        f"first personalisation (cold{compiling}): {record['first_personalization_s']:.2f} s",
    ]
    if "cold_start_empty_cache_s" in record:
        lines.append(
            f"first personalisation of a fresh process (compile={record['compiled']}): "
            f"{record['cold_start_empty_cache_s']:.2f} s with an empty compile cache, "
            f"{record['cold_start_warm_cache_s']:.2f} s with the cache it left "
            f"({record['compile_cache_mib']:.1f} MiB); "
            f"whole processes {record['cold_start_empty_cache_process_s']:.1f} s and "
            f"{record['cold_start_warm_cache_process_s']:.1f} s"
        )
    lines.append(
        f"personal file: r=1 {record['file_bytes_r1_fp32']:,} B fp32 ({record['personal_numbers_r1']:,} numbers); "
        f"relaxed r=4 {record['file_bytes_relaxed_fp32']:,} B fp32, {record['file_bytes_relaxed_fp16']:,} B fp16"
    )
    return "\n".join(lines)


def main(options: BenchOptions) -> dict:
    if options.count_operations:
        record = bench_operations(options)
        print(format_operations(record))
    else:
        record = run_bench(options)
        print(format_table(record))
    print(json.dumps(record))
    return record


if __name__ == "__main__":  # a cold-start child (see bench_cold_start): one first personalisation, as JSON
    print(json.dumps(first_personalization(BenchOptions(**json.loads(sys.argv[1])))))

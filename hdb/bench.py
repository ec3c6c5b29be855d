"""`python -m hdb bench`: what personalisation costs, beside what a user would pick instead.

Measured in one run on one machine: hypernetwork forward, seconds per fast-finetune step, a whole
personalisation (prediction + 40 steps), peak memory and the personal file's size; then the
baselines, DreamBooth (full UNet finetune) and DreamBooth-LoRA (peft, r=4), per step, extrapolated
to their usual step counts. Full-size runs use SD1.5-shaped models with random weights: the
arithmetic, and so the time and memory, are the real model's.
"""

from __future__ import annotations

import json
import resource
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from PIL import Image

from hdb.config import DEFAULT_INSTANCE_PROMPT, BenchOptions
from hdb.devices import resolve_device, resolve_dtype
from hdb.diffusion import augmented_views, encode_images, encode_prompts, sample_seed, step_loss
from hdb.faces import AlignedFace
from hdb.lidb import LiDB
from hdb.models import Pipeline, build_full_size_sd15, build_tiny_pipeline, native_resolution, training_scheduler
from hdb.personal_file import PersonalWeights, save_personal
from hdb.personalize import PersonalizeConfig, personalize
from hdb.stage import training_stage
from hdb.training import TrainConfig, train

if TYPE_CHECKING:
    from hdb.hypernet import HyperNetwork

DREAMBOOTH_STEPS = 1200  # the paper's DreamBooth: 1,000-1,200 steps (~5 min)
LORA_STEPS = 1000


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


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def _build(options: BenchOptions, device: torch.device):
    """Pipeline and hypernetwork of the benchmarked size, random weights, built on the device."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from hdb.hypernet import HyperNetwork, build_tiny_image_encoder

    dtype = resolve_dtype(options.dtype, device)
    with torch.device(device):
        if options.tiny:
            pipe = build_tiny_pipeline("sd15")
            encoder, encoder_name, sizes = (
                build_tiny_image_encoder(),
                "tiny CLIP vision",
                dict(width=64, depth=2, heads=4),
            )
        else:
            pipe = build_full_size_sd15(device=device)
            vit_h = CLIPVisionConfig(
                hidden_size=1280,
                intermediate_size=5120,
                num_hidden_layers=32,
                num_attention_heads=16,
                image_size=224,
                patch_size=14,
            )
            encoder, encoder_name, sizes = CLIPVisionModel(vit_h), "ViT-H/14-shaped CLIP vision (random)", {}
    pipe.to(device, dtype)
    lidb = LiDB(pipe)
    hypernet = HyperNetwork.for_lidb(lidb, encoder, encoder_name, **sizes).to(device)
    hypernet.image_encoder.to(dtype)
    return pipe, lidb, hypernet


def _photo(size: int) -> Image.Image:
    """A stand-in aligned face crop (timing does not depend on the pixels)."""
    generator = torch.Generator().manual_seed(0)
    pixels = (torch.rand(size, size, 3, generator=generator) * 255).to(torch.uint8).numpy()
    return Image.fromarray(pixels)


def bench_hdb(options: BenchOptions, pipe: Pipeline, lidb: LiDB, hypernet: HyperNetwork, device: torch.device) -> dict:
    record: dict = {}
    face = AlignedFace.from_crop(_photo(native_resolution(pipe)))
    for _ in range(3):  # warm up the encoder kernels
        hypernet.predict(face.image)
    record["hypernet_forward_s"] = min(_timed(lambda: hypernet.predict(face.image), device) for _ in range(5))
    record.update(bench_generation(options, pipe, lidb, device))  # eager, before anything is compiled
    if options.compile:
        pipe.unet.compile(mode="reduce-overhead")
        for encoder in [pipe.text_encoder]:
            encoder.compile(mode="reduce-overhead")
    config = PersonalizeConfig(steps=options.steps, progress=False)
    step_times: list[float] = []

    def on_step(step: int, loss: float) -> None:
        step_times.append(time.perf_counter())

    # first run compiles (when asked) and warms up; then the best of `repeats` warm runs
    record["first_personalization_s"] = _timed(lambda: personalize(pipe, face, hypernet, config, lidb=lidb), device)
    totals = []
    with _peak_memory(device, record, "peak_memory_gib"):
        for _ in range(options.repeats):
            step_times.clear()
            totals.append(_timed(lambda: personalize(pipe, face, hypernet, config, lidb=lidb, on_step=on_step), device))
    per_step = [b - a for a, b in zip(step_times, step_times[1:], strict=False)]
    record["finetune_step_s"] = sorted(per_step)[len(per_step) // 2]
    record["personalization_s"] = min(totals)
    with tempfile.TemporaryDirectory() as folder:
        result_weights = PersonalWeights.from_lidb(lidb)
        record["file_bytes_relaxed_fp32"] = save_personal(result_weights, Path(folder) / "p.safetensors").stat().st_size
        record["file_bytes_relaxed_fp16"] = (
            save_personal(result_weights, Path(folder) / "p16.safetensors", torch.float16).stat().st_size
        )
        rank1 = PersonalWeights.from_lidb(lidb)
        rank1.A, rank1.B = rank1.A[:, :1].contiguous(), rank1.B[:, :, :1].contiguous()
        record["file_bytes_r1_fp32"] = save_personal(rank1, Path(folder) / "r1.safetensors").stat().st_size
    record["personal_numbers_r1"] = len(lidb.layers) * (lidb.config.a + lidb.config.b)
    return record


def bench_generation(options: BenchOptions, pipe: Pipeline, lidb: LiDB, device: torch.device) -> dict:
    """One image of `generate_steps` sampling steps: the base model, the person merged, the person unmerged."""
    from hdb.generate import generate

    steps = options.generate_steps

    def seconds(strength: float, merge: bool) -> float:
        def run() -> None:
            generate(pipe, lidb, DEFAULT_INSTANCE_PROMPT, steps=steps, identity_strength=strength, merge=merge)

        run()  # warm-up
        return min(_timed(run, device) for _ in range(options.repeats))

    record = {"generate_steps": options.generate_steps}
    record["generate_base_s"] = seconds(0.0, merge=False)  # scale 0: the LiDB layers pass straight through
    record["generate_person_merged_s"] = seconds(1.0, merge=True)
    record["generate_person_unmerged_s"] = seconds(1.0, merge=False)
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
    cond.embeds = cond.embeds.to(pipe.unet.dtype)  # DreamBooth trains an fp32 UNet beside a half-precision text encoder
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
    return sorted(per_step)[len(per_step) // 2]


def bench_baselines(options: BenchOptions, pipe: Pipeline, lidb: LiDB, device: torch.device) -> dict:
    from peft import LoraConfig

    record: dict = {}
    lidb.detach()
    # DreamBooth-LoRA: peft rank-4 LoRA on the same attention projections
    pipe.unet.add_adapter(
        LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    )
    lora_parameters = [p for name, p in pipe.unet.named_parameters() if "lora_" in name]
    for p in lora_parameters:
        p.data = p.data.float()
    with _peak_memory(device, record, "lora_peak_memory_gib"):
        record["lora_step_s"] = _baseline_steps(pipe, lora_parameters, options.baseline_steps, device, autocast=False)
    pipe.unet.delete_adapters("default")
    # DreamBooth: every UNet weight trains (fp32 master weights, bf16 autocast on GPU)
    pipe.unet.to(torch.float32)
    with _peak_memory(device, record, "dreambooth_peak_memory_gib"):
        record["dreambooth_step_s"] = _baseline_steps(
            pipe, list(pipe.unet.parameters()), options.baseline_steps, device, autocast=device.type == "cuda"
        )
    return record


def run_bench(options: BenchOptions) -> dict:
    device = resolve_device(options.device)
    torch.manual_seed(0)
    built = time.perf_counter()
    pipe, lidb, hypernet = _build(options, device)
    record = {
        "machine": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU ({torch.get_num_threads()} threads)",
        "model": "tiny SD1.5 (random)" if options.tiny else "SD1.5-shaped (random weights)",
        "dtype": str(pipe.unet.dtype).replace("torch.", ""),
        "resolution": native_resolution(pipe),
        "steps": options.steps,
        "compiled": options.compile,
        "build_s": time.perf_counter() - built,
        "lidb_layers": len(lidb.layers),
    }
    record.update(bench_hdb(options, pipe, lidb, hypernet, device))
    if options.baselines:
        record.update(bench_baselines(options, pipe, lidb, device))
        record["baseline_steps_measured"] = options.baseline_steps
        record["lora_total_s"] = record["lora_step_s"] * LORA_STEPS
        record["dreambooth_total_s"] = record["dreambooth_step_s"] * DREAMBOOTH_STEPS
        record["speedup_vs_dreambooth"] = record["dreambooth_total_s"] / record["personalization_s"]
        record["speedup_vs_lora"] = record["lora_total_s"] / record["personalization_s"]
        unet_bytes = sum(p.numel() for p in pipe.unet.parameters()) * 2  # a DreamBooth UNet checkpoint in fp16
        record["size_ratio_vs_dreambooth"] = unet_bytes / record["file_bytes_r1_fp32"]
    return record


def format_table(record: dict) -> str:
    lines = [
        f"hdb bench on {record['machine']}: {record['model']}, {record['dtype']}, {record['resolution']} px, "
        f"{record['lidb_layers']} LiDB layers, compiled={record['compiled']}",
        "",
        "| method | per step | steps | total | peak memory |",
        "| --- | --- | --- | --- | --- |",
        f"| hdb: hypernetwork + rank-relaxed finetune | {record['finetune_step_s'] * 1e3:.1f} ms | {record['steps']} | "
        f"{record['personalization_s']:.2f} s | {record['peak_memory_gib']:.2f} GiB |",
    ]
    if "lora_step_s" in record:
        lines += [
            f"| DreamBooth-LoRA (peft r=4) | {record['lora_step_s'] * 1e3:.1f} ms | {LORA_STEPS} "
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
    base, merged, unmerged = (record[f"generate_{k}_s"] for k in ("base", "person_merged", "person_unmerged"))
    lines += [
        f"one image, {record['generate_steps']} sampling steps: base model {base:.2f} s; with the person merged "
        f"{merged:.2f} s ({merged / base - 1:+.0%}), unmerged {unmerged:.2f} s ({unmerged / base - 1:+.0%}); "
        f"merging holds {record['merge_memory_gib']:.2f} GiB of original weights",
        f"hypernetwork forward: {record['hypernet_forward_s'] * 1e3:.1f} ms; "
        f"first personalisation (cold{', compiling' if record['compiled'] else ''}): "
        f"{record['first_personalization_s']:.2f} s",
        f"personal file: r=1 {record['file_bytes_r1_fp32']:,} B fp32 ({record['personal_numbers_r1']:,} numbers); "
        f"relaxed r=4 {record['file_bytes_relaxed_fp32']:,} B fp32, {record['file_bytes_relaxed_fp16']:,} B fp16",
    ]
    return "\n".join(lines)


def main(options: BenchOptions) -> dict:
    record = run_bench(options)
    print(format_table(record))
    print(json.dumps(record))
    return record

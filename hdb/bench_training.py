"""`python -m hdb bench-training`: what stage 2's set-up costs per number of identities, cache or photos; with
`--step-costs`, what a training step of either stage costs per group size.

For each identity count, a synthetic stage 1 (random 64 px faces, random pre-optimised weights: no face
detection, the tiny model, trained at RESOLUTION px) and its training cache are made first; then each count
and data path runs a 3-step stage 2 in a fresh child process (`python -m hdb.bench_training CHILD_JSON`),
which reports its wall time (set-up and the 3 steps) and how far its resident memory rose above where it
stood as stage 2 began (the peak, reset then: imports and the model do not count). On the cache a process
holds the index and one batch whatever the count; in memory, every identity's tensors. Per identity these
are 32 KB of latents (fp16) and 12 KB of encoder crops (uint8) here, 128 KB and 150 KB for SD1.5 at 512 px
with ViT-H: the in-memory growth scales by about 6.

Both stages train through LiDB's per-sample path (each batch element its own weights), which no GPU has
timed. `step_costs` counts the operations (about one GPU kernel each) and FLOPs of one such forward+backward
at SD1.5's shapes (built on the meta device: shapes only, no arithmetic) per group size, and times the same
step on the tiny model on this CPU. `estimate_h200_ms` turns the counts into an H200 estimate from hdb's
own H200 anchors: an extrapolation, not a measurement.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from hdb.cache import TrainingData, build_cache
from hdb.config import DEFAULT_INSTANCE_TOKEN, DecoderConfig, HypernetTrainConfig, LiDBConfig
from hdb.devices import resolve_device
from hdb.diffusion import diffusion_loss, encode_tokens, tokenize_prompts
from hdb.errors import HdbError
from hdb.families import family_of_tiny
from hdb.hypernet import encoder_image_size
from hdb.identities import Identity, write_manifest
from hdb.lidb import LiDB
from hdb.models import Pipeline, build_full_size_sd15, build_tiny_pipeline, native_resolution, training_scheduler
from hdb.options import BENCH_GROUP_SIZES, BENCH_TRAINING_RESOLUTION, BenchOptions
from hdb.personal_file import PersonalWeights, save_personal
from hdb.stage import training_stage

PATHS = ("cache", "memory")  # stage 2 reads the training cache, or makes the same tensors in memory
LIDB = LiDBConfig(a=8, b=4)  # the tiny model's layers are narrow
STEPS = 3
RESOLUTION = BENCH_TRAINING_RESOLUTION  # the tiny model trained at 4x its native side


def synthetic_people(count: int) -> list[Identity]:
    """`count` identities, one random 64 px 'face' each, the same for the same count."""
    generator = torch.Generator().manual_seed(count)
    pixels = torch.randint(0, 256, (count, 64, 64, 3), generator=generator, dtype=torch.uint8).numpy()
    return [Identity(f"person{k:06d}", [Image.fromarray(pixels[k])]) for k in range(count)]


def synthetic_stage1(count: int, folder: Path) -> None:
    """What stage 1 would leave for `synthetic_people(count)`: random weights per identity, and the manifest."""
    pipe, generator = build_tiny_pipeline("sd15"), torch.Generator().manual_seed(count)
    (folder / "weights").mkdir(parents=True, exist_ok=True)
    with LiDB.attached(pipe, LIDB) as lidb:
        for identity in synthetic_people(count):
            A, B = lidb.own.initial_weights()
            weights = (A, torch.randn(B.shape, generator=generator) * 1e-3)
            person = PersonalWeights.from_lidb(lidb, weights=weights)
            save_personal(person, folder / "weights" / f"{identity.name}.safetensors")
        write_manifest(folder, lidb, DEFAULT_INSTANCE_TOKEN)


def _stage2_config(resolution: int) -> HypernetTrainConfig:
    return HypernetTrainConfig(
        steps=STEPS, batch_size=2, image_encoder="tiny", decoder=DecoderConfig(width=32, depth=2, heads=4),
        sample_steps=0,
        checkpoint_every=STEPS, validate_every=STEPS, resolution=resolution, progress=False,
    )  # fmt: skip


def _memory_mb(field: str) -> float:
    """This process's resident memory (VmRSS) or its peak (VmHWM), from /proc/self/status, in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak_memory() -> None:
    """Start VmHWM again from the current resident memory (Linux 4.0+: `5` to /proc/self/clear_refs)."""
    Path("/proc/self/clear_refs").write_text("5")


def child(path: str, count: int, work: str, resolution: int) -> dict:
    """One 3-step stage 2 over `count` synthetic identities, read the `path` way; in a process of its own."""
    from hdb.train_hypernet import train_hypernetwork

    torch.set_num_threads(1)
    root = Path(work) / str(count)
    pipe = build_tiny_pipeline("sd15")
    with tempfile.TemporaryDirectory() as out:
        _reset_peak_memory()
        before, started = _memory_mb("VmRSS"), time.perf_counter()
        if path == "cache":
            images, weights = TrainingData.open(root / "cache"), None
        else:
            images, weights = synthetic_people(count), root / "stage1"
        train_hypernetwork(pipe, images, out, weights, _stage2_config(resolution), device="cpu")
        seconds, peak = time.perf_counter() - started, _memory_mb("VmHWM")
    return {"path": path, "identities": count, "seconds": round(seconds, 2), "rss_rise_mb": round(peak - before, 1)}


def bench_training(
    counts: list[int], paths: tuple[str, ...] = PATHS, resolution: int = RESOLUTION, progress: bool = True
) -> list[dict]:
    """Make each count's synthetic stage 1 and cache, then run `child` once per count and path."""
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for count in counts:
            root = Path(work) / str(count)
            synthetic_stage1(count, root / "stage1")
            started = time.perf_counter()
            pipe = build_tiny_pipeline("sd15")
            build_cache(pipe, synthetic_people(count), root / "stage1", root / "cache", encoder_image_size("tiny"),
                        resolution, progress=False)  # fmt: skip
            cache_seconds = round(time.perf_counter() - started, 2)
            for path in paths:
                command = [sys.executable, "-m", "hdb.bench_training", json.dumps([path, count, work, resolution])]
                result = subprocess.run(command, capture_output=True, text=True, check=False)
                if result.returncode != 0:
                    raise RuntimeError(f"the {path} run over {count} identities failed:\n{result.stderr[-3000:]}")
                row = json.loads(result.stdout.strip().splitlines()[-1]) | {"cache_build_seconds": cache_seconds}
                rows.append(row)
                if progress:
                    print(format_row(row), flush=True)
    return rows


def format_row(row: dict) -> str:
    return (
        f"{row['identities']:>7} identities, {row['path']:>6}: {row['seconds']:6.1f} s (set-up + {STEPS} steps), "
        f"peak memory {row['rss_rise_mb']:+7.1f} MB over its start  (cache made in {row['cache_build_seconds']:.1f} s)"
    )


def format_growth(rows: list[dict]) -> str:
    """Per path: how much the peak memory and the time grew from the smallest count to the largest."""
    lines = []
    for path in sorted({row["path"] for row in rows}):
        mine = sorted((row for row in rows if row["path"] == path), key=lambda row: row["identities"])
        first, last = mine[0], mine[-1]
        lines.append(
            f"{path}: {first['identities']} -> {last['identities']} identities: peak memory "
            f"{last['rss_rise_mb'] - first['rss_rise_mb']:+.1f} MB, time {last['seconds'] - first['seconds']:+.1f} s"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------- what a training step costs

# hdb's H200 anchors (docs/BENCHMARKS.md, bf16, SD1.5 shapes, batch 1): eager steps are launch-bound and cost
# 37-44 us per dispatched operation (hdb's step: 203.5 ms for ~5,432 operations then; DreamBooth-LoRA's:
# 141.8 ms for 3,207); the compiled step (30.5 ms) is the arithmetic's floor for a batch-1 step's FLOPs.
H200_SECONDS_PER_OPERATION = (37e-6, 44e-6)
H200_COMPILED_BATCH1_STEP_S = 0.0305
# The H200's dense bf16 tensor-core peak (NVIDIA's H200 datasheet: 1,979 TFLOPS with sparsity, half of it dense): no
# step's arithmetic can take less than its FLOPs at this rate. A floor, far below any measured step.
H200_BF16_DENSE_TFLOPS = 989.5


def per_sample_step(pipe: Pipeline, lidb: LiDB, group: int, device: str) -> Callable[[], None]:
    """One forward+backward of the per-sample path both stages train through: `group` samples, each with its own
    LiDB, in the denoiser and the text encoders it targets, at the base's native size. Noise zero and timestep 0
    (a meta device draws no random numbers; the arithmetic does not depend on them)."""
    A, B = (weights.to(device).requires_grad_() for weights in lidb.own.initial_weights(group))
    side = native_resolution(pipe) // pipe.vae_scale_factor
    latents = torch.zeros(group, pipe.vae.config.latent_channels, side, side, device=device)
    tokens = [ids.expand(group, -1).to(device) for ids in tokenize_prompts(pipe, ["a photo of sks person"])]
    scheduler, timesteps = training_scheduler(pipe), torch.zeros(group, dtype=torch.long, device=device)

    def step() -> None:
        lidb.own.use_per_sample(A, B)
        cond = encode_tokens(pipe, tokens)
        diffusion_loss(pipe, scheduler, latents, cond, torch.zeros_like(latents), timesteps).mean().backward()

    return step


def counted_step(pipe: Pipeline, lidb: LiDB, group: int) -> tuple[int, float]:
    """The operations (about one GPU kernel each) and TFLOPs of one per-sample step of `pipe`'s shapes (meta)."""
    from hdb.bench import OperationCounter

    counted = per_sample_step(pipe, lidb, group, "meta")
    with OperationCounter() as operations:  # apart: the FLOP counter would dispatch more operations
        counted()
    with FlopCounterMode(display=False) as flops:
        counted()
    return operations.count, flops.get_total_flops() / 1e12


def step_costs(
    group_sizes: tuple[int, ...] = BENCH_GROUP_SIZES, repeats: int = 5, device: str = "cpu", arch: str = "sd15"
) -> list[dict]:
    """Per group size: the per-sample step's operations and TFLOPs at the full-size shapes of `arch`'s family
    (hdb.config.TINY_ARCHS; its reference model, `Family.build_full_size`), and its time (best of `repeats`, after
    a warm-up) on `device`: the tiny model of that family on a CPU, the SD1.5-shaped one (random weights, bf16
    where the GPU has it) on a GPU. A group of 1 costs what a personalisation step costs (one person's weights)."""
    from hdb.bench import bench_pipeline, time_call

    where = resolve_device(device)  # a clear error where CUDA is asked for and missing
    on_gpu = where.type == "cuda"
    if on_gpu and arch != "sd15":
        raise HdbError("On a GPU, steps are timed at SD1.5's shapes only (`arch` sd15): the others are counted")
    family = family_of_tiny(arch)
    full = family.build_full_size()
    timed = bench_pipeline(BenchOptions(device=device, tiny=not on_gpu), where) if on_gpu else build_tiny_pipeline(arch)
    rows = []
    # the default LiDB at full size; the tiny model's is narrow
    with (
        LiDB.attached(full, LiDBConfig()) as full_lidb,
        LiDB.attached(timed, LiDBConfig() if on_gpu else LIDB) as timed_lidb,
        training_stage(full, full_lidb, "counting a step", "smaller `group_sizes`"),  # the base frozen, as in training
        training_stage(timed, timed_lidb, "timing a step", "smaller `group_sizes`"),
    ):
        for group in group_sizes:
            operations, tflops = counted_step(full, full_lidb, group)
            timed_step = per_sample_step(timed, timed_lidb, group, str(where))
            timed_step()  # a warm-up
            seconds = [time_call(timed_step, where) for _ in range(repeats)]
            rows.append({
                "shapes": family.variant(family.variant_name(full)).title,
                "group": group,
                "operations": operations,
                "tflops": round(tflops, 3),
                "timed": f"SD1.5-shaped on {torch.cuda.get_device_name(where)}" if on_gpu else f"tiny {arch} on a CPU",
                "step_ms": round(min(seconds) * 1e3, 1),
            })  # fmt: skip
    return rows


def sd15_batch1_tflops() -> float:
    """The TFLOPs of SD1.5's batch-1 step, the arithmetic of hdb's compiled H200 anchor."""
    full = build_full_size_sd15(empty=True)
    with LiDB.attached(full, LiDBConfig()) as lidb, training_stage(full, lidb, "counting a step", ""):
        return counted_step(full, lidb, 1)[1]


def frozen_weights_gb(arch: str) -> dict[str, float]:
    """The frozen base's weights in GB (1e9 bytes), counted at `arch`'s full-size shapes: in bf16, and with
    `--quantize` nf4 (4 bits and one fp32 scale per 64 weights: 0.5625 bytes) or int8 (1 byte and a scale per row,
    ignored) for the components it quantises (`Family.quantised_components`); the rest stay bf16."""
    family = family_of_tiny(arch)
    full = family.build_full_size()
    quantised = family.quantised_components()
    counts = {
        name: sum(p.numel() for p in component.parameters())
        for name, component in full.components.items()
        if isinstance(component, torch.nn.Module)
    }
    total = sum(counts.values())
    in_quantised = sum(counts[name] for name in quantised if name in counts)
    return {
        "bf16": 2 * total / 1e9,
        "nf4": (2 * (total - in_quantised) + 0.5625 * in_quantised) / 1e9,
        "int8": (2 * (total - in_quantised) + 1 * in_quantised) / 1e9,
    }


def estimate_h200_ms(row: dict, batch1_tflops: float) -> tuple[float, float]:
    """An eager H200 step's likely range, in ms: launch-bound (operations x the anchors' cost of one) unless the
    arithmetic takes longer (FLOPs at the rate SD1.5's compiled batch-1 step reached). An extrapolation."""
    flops_rate = batch1_tflops / H200_COMPILED_BATCH1_STEP_S  # TFLOPs per second
    arithmetic = row["tflops"] / flops_rate
    low, high = (max(row["operations"] * cost, arithmetic) for cost in H200_SECONDS_PER_OPERATION)
    return low * 1e3, high * 1e3


def format_step_costs(rows: list[dict], batch1_tflops: float, weights_gb: dict[str, float]) -> str:
    """The rows, each with its H200 extrapolation (`batch1_tflops`: SD1.5's, `sd15_batch1_tflops`), and the frozen
    weights' memory (`frozen_weights_gb`)."""
    lines = []
    for row in rows:
        low, high = estimate_h200_ms(row, batch1_tflops)
        estimate = f"{low:.0f} ms" if round(low) == round(high) else f"{low:.0f}-{high:.0f} ms"
        floor = row["tflops"] / H200_BF16_DENSE_TFLOPS * 1e3
        lines.append(
            f"group {row['group']}: {row['shapes']} {row['operations']:,} operations, {row['tflops']:.2f} TFLOPs "
            f"forward+backward; measured, {row['timed']}: {row['step_ms']:.1f} ms; H200 eager, extrapolated: "
            f"{estimate} (at SD1.5's rate; the bf16 peak's floor: {floor:.0f} ms)"
        )
    memory = ", ".join(f"{precision} {gb:.1f} GB" for precision, gb in weights_gb.items())
    lines.append(f"frozen weights (counted; activations not): {memory}")
    return "\n".join(lines)


if __name__ == "__main__":  # a child run: print its figures as the last line
    print(json.dumps(child(*json.loads(sys.argv[1]))))

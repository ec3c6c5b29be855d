"""The models every visitor shares, and the GPU time each request asks for (Hugging Face ZeroGPU)."""

from __future__ import annotations

import argparse
import inspect
import logging
import threading
import time
from collections.abc import Callable

from hdb.config import APP_COMPILE_MODE, STEPS_FROM_ZERO, STEPS_WITH_HYPERNET, PersonalizeConfig
from hdb.pipeline import PersonalPipeline
from hdb.styles import SIZE_PRESETS

log = logging.getLogger("hdb.app")

# ZeroGPU lends a GPU only inside functions marked with spaces.GPU, charges a visitor's daily quota by the
# duration a call *asks* for, and stops a call that runs past it. So each GPU function asks for what its
# work needs: seconds per unit of work at 512 px, estimated from hdb's H200 measurements (docs/BENCHMARKS.md:
# 0.24 s an eager fp16 finetune step, 1.13 s a 25-step image) with a margin for a shared GPU slice.
GPU_SECONDS = {"setup": 10.0, "finetune_step": 0.35, "image_step": 0.08}
MAX_GPU_SECONDS = 180  # what one call may ask for at most; the sliders' limits are set so their work fits
MAX_FINETUNE_STEPS, MAX_SAMPLING_STEPS, MAX_IMAGES = 400, 100, 4
MAX_STRENGTH, MAX_GUIDANCE = 1.5, 15.0  # the page's slider limits, checked again on the server (API callers)
# the largest size preset's pixels over the native square's (SD1.x's portrait: 1.5)
MAX_AREA = max(w * h / native**2 for native, sizes in SIZE_PRESETS.items() for w, h in sizes.values())


def on_spaces() -> bool:
    """Whether `spaces` is installed, as on Hugging Face Spaces (where the GPU may be ZeroGPU's)."""
    try:
        import spaces  # noqa: F401
    except ImportError:
        return False
    return True


def compile_refusal(device_type: str, zero_gpu: bool) -> str | None:
    """Why `--compile` does not apply here, or None where it does: a dedicated GPU."""
    if zero_gpu:
        return "--compile is ignored on Spaces: ZeroGPU runs each call in a fresh worker, which would compile again"
    if device_type != "cuda":
        return f"--compile is ignored on {device_type}: compiling pays off on a dedicated GPU only"
    return None


def gpu_task(duration: Callable[[dict], float]) -> Callable[[Callable], Callable]:
    """spaces.GPU asking for `duration(the call's inputs by name)` seconds on ZeroGPU; elsewhere a no-op."""
    try:
        import spaces  # on Spaces only; effect-free outside ZeroGPU
    except ImportError:
        return lambda fn: fn

    def decorate(fn: Callable) -> Callable:
        signature = inspect.signature(fn)

        def seconds(*args: object, **kwargs: object) -> float:  # ZeroGPU calls it with the function's inputs
            return duration(signature.bind_partial(*args, **kwargs).arguments)

        return spaces.GPU(duration=seconds)(fn)

    return decorate


class Engine:
    """The personal pipeline (base model, LiDB, hypernetwork), loaded once and shared by every visitor.

    It holds one person at a time: every use of it (personalise, load a person and generate) runs under
    `lock`, and loads the visitor's own person inside it, whatever Gradio's queue settings are.
    """

    def __init__(self, options: argparse.Namespace) -> None:
        from hdb.devices import resolve_device, resolve_dtype
        from hdb.models import build_tiny_pipeline, load_pipeline

        self.options = options
        self.tiny = options.tiny
        self.lock = threading.Lock()
        if self.tiny:
            device = resolve_device(options.device)
            pipe = build_tiny_pipeline("sd15").to(device, resolve_dtype(options.dtype, device))
            pipe.set_progress_bar_config(disable=True)
        else:
            pipe = load_pipeline(options.base, options.dtype, options.device)
        hypernet = None
        if options.hypernet:
            from hdb.hypernet import HyperNetwork

            hypernet = HyperNetwork.from_pretrained(options.hypernet, device=pipe.unet.device)
        self.personal = PersonalPipeline(pipe, hypernet)
        self.seconds_per_step: float | None = None  # measured: at start on a CPU, else on the first personalisation
        if self.pipe.unet.device.type == "cpu":
            self.seconds_per_step = self._time_two_steps()
        self.warm_up: threading.Thread | None = None  # compiling in the background (--compile on a dedicated GPU)
        self.warm_up_note = ""  # what the page says about it while it runs, or if it failed
        if options.compile:
            self._start_compiling()

    @property
    def pipe(self):  # noqa: ANN201 (a diffusers pipeline)
        return self.personal.pipe

    @property
    def hypernet(self):  # noqa: ANN201 (a HyperNetwork or None)
        return self.personal.hypernet

    def _practice_run(self, generate: bool = False) -> None:
        """A 2-step personalisation of a plain gray crop (and a 2-step picture): for timing and compiling only."""
        from PIL import Image

        from hdb.faces import AlignedFace

        size = self.personal.resolution
        gray = AlignedFace.from_crop(Image.new("RGB", (size, size), (128, 128, 128)))
        with self.lock:  # visitors who come meanwhile wait for it
            try:
                self.personal.personalize(gray, PersonalizeConfig(steps=2, progress=False))
                if generate:
                    self.personal.generate("a photo of [V]", steps=2)
            finally:
                self.personal.forget()

    def _time_two_steps(self) -> float:
        """On a CPU, users deserve an honest estimate before they wait: time two real steps once at start."""
        started = time.perf_counter()
        self._practice_run()
        return (time.perf_counter() - started) / 2

    def _start_compiling(self) -> None:
        """Compile on a dedicated GPU, warming up in a background thread so the page is served at once."""
        from hdb.models import compile_pipeline

        refusal = compile_refusal(self.pipe.unet.device.type, zero_gpu=on_spaces())
        if refusal:
            log.warning(refusal)
            return
        compile_pipeline(self.pipe, APP_COMPILE_MODE)  # only marks the models: compiling happens as they run
        self.warm_up_note = "⏳ Warming up: the model is being compiled, so the first run may be slower."
        self.warm_up = threading.Thread(target=self._compile_by_running, name="hdb-compile", daemon=True)
        self.warm_up.start()

    def _compile_by_running(self) -> None:
        """A short personalisation and a short generation: the training and the sampling graphs get compiled."""
        started = time.perf_counter()
        try:
            self._practice_run(generate=True)
        except Exception as error:  # the page keeps serving: say what happened instead of dying in a thread
            log.exception("compiling the model failed")
            self.warm_up_note = f"⚠️ Compiling the model failed ({error}). Restart the app without --compile."
            return
        log.info("compiled the model in %.0f s", time.perf_counter() - started)
        self.warm_up_note = ""

    @property
    def default_steps(self) -> int:
        return STEPS_WITH_HYPERNET if self.hypernet else STEPS_FROM_ZERO

    @property
    def device_name(self) -> str:
        return str(self.pipe.unet.device)

    @property
    def pixel_scale(self) -> float:
        """Work per step relative to 512 px (SDXL's 1024 px: 4x)."""
        return (self.personal.resolution / 512) ** 2

    def personalize_seconds(self, steps: int) -> float:
        """GPU seconds to ask for: measured speed on a dedicated GPU, the estimate elsewhere (ZeroGPU forks)."""
        per_step = self.seconds_per_step or GPU_SECONDS["finetune_step"] * self.pixel_scale
        return min(GPU_SECONDS["setup"] + steps * per_step, MAX_GPU_SECONDS)

    def generate_seconds(self, steps: int, images: int, area: float = 1.0) -> float:
        """`area`: the picture's pixels over the native square's (a portrait: 1.5)."""
        per_step = GPU_SECONDS["image_step"] * self.pixel_scale * area
        return min(GPU_SECONDS["setup"] / 2 + images * steps * per_step, MAX_GPU_SECONDS)

    @property
    def max_sampling_steps(self) -> int:
        """The slider's limit: the most steps whose largest request (4 portraits) fits in one call."""
        per_step = GPU_SECONDS["image_step"] * self.pixel_scale * MAX_AREA * MAX_IMAGES
        return min(MAX_SAMPLING_STEPS, int((MAX_GPU_SECONDS - GPU_SECONDS["setup"] / 2) / per_step))

    @property
    def max_finetune_steps(self) -> int:
        """The slider's limit: as many steps as fit in one call's GPU time (400 at 512 px)."""
        per_step = GPU_SECONDS["finetune_step"] * self.pixel_scale
        return min(MAX_FINETUNE_STEPS, int((MAX_GPU_SECONDS - GPU_SECONDS["setup"]) / per_step))

    def estimate(self, steps: int) -> str:
        if self.seconds_per_step is None:
            return f"{steps} finetune steps on {self.device_name}"
        return f"{steps} finetune steps on {self.device_name}: about {steps * self.seconds_per_step:.0f} s"

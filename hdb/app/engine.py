"""The models every visitor shares, and the GPU time each request asks for (Hugging Face ZeroGPU)."""

from __future__ import annotations

import argparse
import inspect
import logging
import threading
import time
from collections.abc import Callable
from types import ModuleType

from hdb.config import PersonalizeConfig
from hdb.errors import HdbError
from hdb.families import denoiser, family_of
from hdb.options import APP_COMPILE_MODE
from hdb.pipeline import PersonalPipeline
from hdb.styles import SIZE_PRESETS

log = logging.getLogger("hdb.app")

# ZeroGPU lends a GPU only inside functions marked with spaces.GPU, checks the duration a call *asks* for against
# the visitor's daily quota before it runs, and stops a call that runs past it. So each GPU function asks for what
# its work needs. ZeroGPU's facts, in one place (the page, the sliders and README derive from them):
# - huggingface.co/docs/hub/spaces-zerogpu (hub-docs 242f4a1, 2026-08-22): the default size "large" is half an
#   NVIDIA RTX Pro 6000 Blackwell (48 GB) at 1x quota, "xlarge" the whole card (96 GB) at 2x; daily quotas below,
#   taken from the visitor's Hugging Face account (signed in on huggingface.co, or a token through the API);
# - the `spaces` package 0.51.3 (spaces/zero/client.py, configs.json): on the RTX Pro 6000 a "large" request is
#   multiplied by its duration factor, 1.5, before it is checked against the quota (an H200 slice: 1.0), and the
#   visitor is known only by the X-IP-Token header the Hub adds: a sign-in inside the app changes nothing;
# - hdb's own step times are estimates, not measured on ZeroGPU: 3x hdb's H200 eager finetune step (0.20 s) and
#   2x its 512 px sampling step (docs/BENCHMARKS.md). Half an RTX Pro 6000 has 94 SMs (the card's 188 per
#   configs.json) against the H200's 132 and a fraction of its memory bandwidth, but an eager batch-1 step is
#   launch-bound on the H200 (compiled, the same step takes a seventh of the time), so the margin is generous.
ZERO_GPU_CARD = "half an RTX Pro 6000 Blackwell (48 GB)"
ZERO_GPU_FACTOR = 1.5  # what `spaces` multiplies a request on ZeroGPU's card by (size "large", hdb's)
QUOTA_MINUTES = {"anonymous": 2, "free account": 5, "PRO": 40, "Team": 40, "Enterprise": 60}  # daily, per visitor
QUOTA_SECONDS = {account: minutes * 60 for account, minutes in QUOTA_MINUTES.items()}
GPU_SECONDS = {"setup": 10.0, "finetune_step": 0.6, "image_step": 0.1}
MAX_GPU_SECONDS = 180  # what one call may ask for at most; the sliders' limits are set so their work fits
FIRST_PICTURES = 2  # what one click on Personalise draws (the page's default), at the base's own sampling steps
MAX_FINETUNE_STEPS, MAX_SAMPLING_STEPS, MAX_IMAGES = 400, 100, 4
MAX_STRENGTH, MAX_GUIDANCE = 1.5, 15.0  # the page's slider limits, checked again on the server (API callers)
# the largest size preset's pixels over the native square's (SD1.x's portrait: 1.5)
MAX_AREA = max(w * h / native**2 for native, sizes in SIZE_PRESETS.items() for w, h in sizes.values())


def import_spaces() -> ModuleType | None:
    """The `spaces` package of Hugging Face Spaces, imported now; None elsewhere.

    On ZeroGPU it patches torch as it is imported, and refuses to be imported once CUDA is initialised: so the
    app imports it first thing, before any model is built or placed. Not earlier than gradio either: `spaces`
    refuses to be imported while gradio itself is still importing (gradio then quietly goes without it).
    """
    try:
        import spaces
    except ImportError:
        return None
    return spaces


def on_zero_gpu(spaces: ModuleType | None) -> bool:
    """Whether this is a ZeroGPU Space, as the `spaces` package says (SPACES_ZERO_GPU), not whether it is installed:
    every Gradio Space has it, dedicated GPU Spaces too."""
    config = getattr(getattr(spaces, "config", None), "Config", None)
    return bool(getattr(config, "zero_gpu", False))


def compile_refusal(device_type: str, zero_gpu: bool) -> str | None:
    """Why `--compile` does not apply here, or None where it does: a dedicated GPU."""
    if zero_gpu:
        return "--compile is ignored on ZeroGPU: each call runs in a fresh worker, which would compile again"
    if device_type != "cuda":
        return f"--compile is ignored on {device_type}: compiling pays off on a dedicated GPU only"
    return None


class Engine:
    """The personal pipeline (base model, LiDB, hypernetwork), loaded once and shared by every visitor.

    It holds one person at a time: every use of it (personalise, load a person and generate) runs under
    `lock`, and loads the visitor's own person inside it, whatever Gradio's queue settings are.
    """

    def __init__(self, options: argparse.Namespace, spaces: ModuleType | None = None) -> None:
        """`spaces`: the Spaces package where it was imported (`import_spaces`), which decides where models go."""
        from hdb.devices import resolve_device, resolve_dtype
        from hdb.models import build_tiny_pipeline, load_pipeline

        self.options = options
        self.tiny = options.tiny
        self.lock = threading.Lock()
        self.spaces, self.zero_gpu = spaces, on_zero_gpu(spaces)
        # ZeroGPU: models go to "cuda" at start (the patched torch moves them when a call gets its GPU), in bf16,
        # which both of its cards compute natively; asking torch which GPU this is would initialise CUDA
        device_name = "cuda" if self.zero_gpu else options.device
        dtype = "bf16" if self.zero_gpu and options.dtype == "auto" else options.dtype
        if self.tiny:
            device = resolve_device(device_name)
            pipe = build_tiny_pipeline("sd15").to(device, resolve_dtype(dtype, device))
            pipe.set_progress_bar_config(disable=True)
        elif self.zero_gpu and options.quantize != "none":  # bitsandbytes quantises on a GPU, which loading lacks
            raise HdbError("A quantised base needs a dedicated GPU: ZeroGPU lends one only inside each call")
        else:
            pipe = load_pipeline(options.base, dtype, device_name, options.quantize)
        hypernet = None
        if options.hypernet:
            from hdb.hypernet import HyperNetwork

            hypernet = HyperNetwork.from_pretrained(options.hypernet, device=denoiser(pipe).device)
        self.personal = PersonalPipeline(pipe, hypernet)
        self.seconds_per_step: float | None = None  # measured: at start on a CPU, else on the first personalisation
        if denoiser(self.pipe).device.type == "cpu":
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

        refusal = compile_refusal(denoiser(self.pipe).device.type, zero_gpu=self.zero_gpu)
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

    def gpu_task(self, duration: Callable[[dict], float]) -> Callable[[Callable], Callable]:
        """spaces.GPU asking for `duration(the call's inputs by name)` seconds where there is `spaces` (effect-free
        outside ZeroGPU); a no-op elsewhere. Only GPU work goes inside: the time asked for is the visitor's quota."""
        if self.spaces is None:
            return lambda fn: fn

        def decorate(fn: Callable) -> Callable:
            signature = inspect.signature(fn)

            def seconds(*args: object, **kwargs: object) -> float:  # ZeroGPU calls it with the function's inputs
                return duration(signature.bind_partial(*args, **kwargs).arguments)

            return self.spaces.GPU(duration=seconds)(fn)

        return decorate

    @property
    def default_guidance(self) -> float:
        """The guidance slider's start: the base family's (FLUX.1 reads its guidance as a distilled number)."""
        return family_of(self.pipe).sampling_guidance(self.pipe)

    @property
    def default_sampling_steps(self) -> int:
        """The sampling-steps slider's start: the base's own (FLUX.1 [schnell] is distilled to 4)."""
        return family_of(self.pipe).sampling_steps(self.pipe)

    @property
    def default_steps(self) -> int:
        """The library's (40 from a hypernetwork's prediction, 200 from zero); on ZeroGPU, from zero, as many as
        let an anonymous visitor's first personalisation and first pictures fit their daily quota."""
        steps = self.personal.default_steps
        if self.zero_gpu and self.hypernet is None:
            return min(steps, self.zero_gpu_steps(QUOTA_SECONDS["anonymous"]))
        return steps

    def zero_gpu_steps(self, quota: float) -> int:
        """The most finetune steps whose request, with the first pictures', is charged at most `quota` seconds."""
        budget = quota / ZERO_GPU_FACTOR - self.generate_seconds(self.default_sampling_steps, FIRST_PICTURES)
        return max(1, int((budget - GPU_SECONDS["setup"]) / (GPU_SECONDS["finetune_step"] * self.pixel_scale)))

    @property
    def device_name(self) -> str:
        return str(denoiser(self.pipe).device)

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
        """The slider's limit: as many steps as fit in one call's GPU time; on ZeroGPU also within what a free
        account's daily quota pays for (a longer request would be refused outright)."""
        per_step = GPU_SECONDS["finetune_step"] * self.pixel_scale
        most = min(MAX_FINETUNE_STEPS, int((MAX_GPU_SECONDS - GPU_SECONDS["setup"]) / per_step))
        return min(most, self.zero_gpu_steps(QUOTA_SECONDS["free account"])) if self.zero_gpu else most

    def estimate(self, steps: int) -> str:
        if self.seconds_per_step is None:
            return f"{steps} finetune steps on {self.device_name}"
        return f"{steps} finetune steps on {self.device_name}: about {steps * self.seconds_per_step:.0f} s"

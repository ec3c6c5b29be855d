"""Where and in which precision the models run: device and dtype names as the CLI and the app take them."""

from __future__ import annotations

import torch

from hdb.config import DTYPE_CHOICES
from hdb.errors import HdbError, check_choice

NATIVE_BF16 = (8, 0)  # compute capability from which GPUs compute bf16 natively (A100, RTX 30xx, L4, ...)
DTYPES = dict(zip(DTYPE_CHOICES[1:], (torch.float32, torch.float16, torch.bfloat16), strict=True))  # all but auto


def resolve_device(device: str | None) -> torch.device:
    """'auto'/None picks CUDA when present, else CPU."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise HdbError(f"`device='{device}'` was asked for, but no CUDA GPU is available here; use `device='cpu'`")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """'auto' means bf16 on GPUs that compute it natively (Ampere and newer), fp16 on older ones, fp32 on a CPU.

    bf16 has fp32's range, so training needs no loss scaling; half precision is slow on CPUs. Not
    `torch.cuda.is_bf16_supported()`: it counts emulation, and says yes on a T4 (sm_75), where bf16 has
    no fast kernels and runs several times slower than fp16.
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.get_device_capability(device) >= NATIVE_BF16 else torch.float16
    check_choice("dtype", dtype, ["auto", *DTYPES])
    return DTYPES[dtype]

"""Where the model runs (the current CUDA GPU, else the CPU) and in what precision."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where it is used: the preflight reads configs without it
    import torch


def device() -> torch.device:
    import torch

    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def amp_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype for `precision`, or None for plain fp32.

    'auto' picks bf16 where the device computes it natively (CUDA Ampere+, CPUs with
    AVX512-BF16/AMX), else fp16 on a GPU (with a gradient scaler) and fp32 on a CPU.
    """
    import torch

    if precision == "auto":
        if torch.cuda.is_available():
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


def autocast(precision: str):
    """Autocast on the current device in `precision`'s dtype, or a no-op for fp32."""
    import torch

    dtype = amp_dtype(precision)
    return torch.autocast(device().type, dtype=dtype or torch.float32, enabled=dtype is not None)

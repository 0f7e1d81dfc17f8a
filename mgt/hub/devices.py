"""Device and dtype names as users write them (``auto``, ``cuda:1``, ``bf16``, ``float16``) -> torch objects.

One copy for the engine and the scorers: the models default to fp32 everywhere (diffusers' rule: full
precision unless asked), the inference-only scorers pass ``cuda_default=torch.float16``.
"""

from __future__ import annotations

import torch

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16, "half": torch.float16}


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None``/``"auto"`` -> the first GPU if there is one, else CPU; a named device is checked.

    Raises:
        ValueError: an unknown or unsupported device, or ``cuda`` where no GPU is visible (names the fix).
    """
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"unknown device {device!r}; use cpu, cuda, cuda:N or auto") from error
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but no CUDA device is visible; use --device cpu")
    if resolved.type not in ("cpu", "cuda", "mps", "xpu"):
        raise ValueError(f"unsupported device {device!r}; use cpu, cuda, cuda:N or auto")
    return resolved


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device | None = None,
                  cuda_default: torch.dtype = torch.float32) -> torch.dtype:
    """A dtype name (``fp32``/``float32``, ``bf16``/``bfloat16``, ``fp16``/``float16``/``half``) as a torch dtype.

    Args:
        dtype: the name, a torch dtype, or None for the default.
        device: where the weights go; None counts as CPU.
        cuda_default: the default on a CUDA device (fp32 elsewhere).

    Raises:
        ValueError: an unknown name; the message lists the accepted ones.
    """
    if dtype is None:
        return cuda_default if device is not None and device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of fp32, bf16, fp16 (or float32, bfloat16, float16)")
    return DTYPES[dtype]

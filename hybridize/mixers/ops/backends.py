"""Which kernel library a compute path may use on this machine.

fla imports triton at import time; on a machine without a CUDA driver every kernel then fails, so fla is
only imported when a CUDA tensor asks for it, and only once.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util

import torch

BACKENDS = ("auto", "torch", "fla")


@functools.cache
def fla_available() -> bool:
    """True when fla's kernels import and a CUDA device exists."""
    if not torch.cuda.is_available() or importlib.util.find_spec("fla") is None:
        return False
    try:
        importlib.import_module("fla.ops.gated_delta_rule")
    except Exception:  # a broken triton/fla install means "not available", never a crash at import
        return False
    return True


def resolve_backend(backend: str, device: torch.device, op: str) -> str:
    """Turn "auto" into a concrete backend for tensors on `device`, or fail clearly."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} for {op} is not one of {BACKENDS}.")
    if backend == "auto":
        return "fla" if device.type == "cuda" and fla_available() else "torch"
    if backend == "fla" and (device.type != "cuda" or not fla_available()):
        raise RuntimeError(
            f"backend='fla' for {op} needs CUDA tensors and flash-linear-attention installed "
            f"(got device {device}); install the GPU extra with `pip install 'hybridize[cuda]'` "
            "or use backend='auto'."
        )
    return backend


def available_backends() -> list[str]:
    """The concrete backends usable on this machine."""
    return ["torch", "fla"] if fla_available() else ["torch"]

"""Which kernel library a compute path may use on this machine.

Backends: "torch" (the pure-PyTorch references, everywhere), "fla" (flash-linear-attention's Triton
kernels) and "mamba_ssm" (the Mamba-2 kernels). fla imports triton at import time; on a machine without a
CUDA driver every kernel then fails, so kernel libraries are only imported when a CUDA tensor asks for
them, and only once.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util

import torch

# The module whose import proves a library's kernels are usable, and how to install it.
KERNEL_LIBRARIES = {
    "fla": ("fla.ops", "pip install 'hybridize[cuda]'"),
    "mamba_ssm": ("mamba_ssm.ops.triton.ssd_combined", "pip install 'hybridize[mamba]'"),
}


@functools.cache
@torch.compiler.assume_constant_result  # torch.compile cannot trace the import machinery; the answer is fixed
def library_available(library: str) -> bool:
    """True when `library`'s kernels import and a CUDA device exists."""
    module, _ = KERNEL_LIBRARIES[library]
    if not torch.cuda.is_available() or importlib.util.find_spec(module.split(".")[0]) is None:
        return False
    try:
        importlib.import_module(module)
    except Exception:  # a broken triton/fla install means "not available", never a crash at import
        return False
    return True


def fla_available() -> bool:
    return library_available("fla")


def resolve_backend(backend: str, device: torch.device, op: str, kernels: tuple[str, ...] = ("fla",)) -> str:
    """Turn "auto" into a concrete backend for tensors on `device`, or fail clearly.

    `kernels` are the libraries that implement `op`, in order of preference; "torch" always does.
    """
    check_backend(backend, kernels, op)
    if backend == "auto":
        usable = [lib for lib in kernels if device.type == "cuda" and library_available(lib)]
        return usable[0] if usable else "torch"
    if backend != "torch" and (device.type != "cuda" or not library_available(backend)):
        raise RuntimeError(
            f"backend={backend!r} for {op} needs CUDA tensors and {backend} installed (got device {device}); "
            f"install it with `{KERNEL_LIBRARIES[backend][1]}` or use backend='auto'."
        )
    return backend


def check_backend(backend: str, kernels: tuple[str, ...], what: str) -> None:
    """Check a backend name for a mixer or op with fast paths in `kernels` (availability is checked when it runs)."""
    choices = ("auto", "torch", *kernels)
    if backend not in choices:
        raise ValueError(f"{what} backend={backend!r} is not one of {choices}.")


# "auto" runs fla's fused recurrent kernels on inputs of up to this many tokens without gradients, its chunked
# kernels above (`benchmarks/gdn_backends.py --short-lengths` times both forms; a streamed frame is 258 tokens).
FLA_RECURRENT_MAX_TOKENS = 64


def choose_mode(mode: str, backend: str, length: int, *tensors: torch.Tensor) -> str:
    """ "chunk" or "recurrent" for a scan over `length` tokens. "auto": the recurrent form for decode-sized
    inputs that need no gradient (one token on torch, up to `FLA_RECURRENT_MAX_TOKENS` on fla's fused kernels),
    chunked otherwise."""
    if mode == "auto":
        short = length <= FLA_RECURRENT_MAX_TOKENS if backend == "fla" else length == 1
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
        return "recurrent" if short and not needs_grad else "chunk"
    if mode not in ("chunk", "recurrent"):
        raise ValueError(f"mode={mode!r} is not one of 'auto', 'chunk', 'recurrent'.")
    return mode

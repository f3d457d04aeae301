"""CUDA-graph capture, one way for the decode step and the stream's frame steps.

A captured function must read and write fixed tensors only (static buffers, caches updated in place); each replay
reruns its kernels on whatever those tensors hold. Before a capture the function runs eagerly `WARMUP_STEPS`
times on a side stream, as capture requires, so that Triton compiles and autotunes and cuBLAS picks its kernels
outside the graph.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

WARMUP_STEPS = 2
# torch.compile modes that leave CUDA graphs to the caller ("reduce-overhead" and "max-autotune" capture graphs
# of their own, which cannot sit inside ours). "max-autotune-no-cudagraphs" benchmarks Triton templates against
# cuBLAS for every matrix product of the compiled shapes: minutes more compilation, sometimes faster kernels.
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")


def compile_options(compile: bool | str | None) -> dict | None:
    """torch.compile's keyword arguments for a `compile=` argument: None for False/None (no compilation),
    {"mode": ...} for True ("default") or a mode of `COMPILE_MODES`; anything else is refused."""
    if compile is None or compile is False:
        return None
    mode = "default" if compile is True else compile
    if mode not in COMPILE_MODES:
        raise ValueError(
            f"compile={compile!r}: give True, False or a torch.compile mode that leaves CUDA graphs to hybridize "
            f"({', '.join(COMPILE_MODES)})."
        )
    return {"mode": mode}


def on_side_stream(fn: Callable[[], Any], device: torch.device | None = None) -> Any:
    """fn() on a side stream, ordered after and before the current stream's work (a warm-up run)."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        output = fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    return output


def capture_cuda_graph(
    fn: Callable[[], Any],
    warmup: Callable[[], Any] | None = None,
    pool=None,
    warmup_steps: int = WARMUP_STEPS,
) -> tuple[torch.cuda.CUDAGraph, Any]:
    """Capture `fn` in a CUDA graph after `warmup_steps` runs of `warmup` (default `fn`) on a side stream; in the
    memory pool of another graph if given (graphs that never run at once). Returns (graph, fn's output, whose
    tensors each replay rewrites). warmup_steps=0 for a caller whose own eager runs were the warm-up."""
    for _ in range(warmup_steps):
        on_side_stream(warmup or fn)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        output = fn()
    return graph, output

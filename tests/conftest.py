"""Shared fixtures: tiny models are built once per session from configs (no downloads)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

# Lightning binds its log handler to sys.stderr when first imported: imported inside a test whose output is
# captured, it would log into that closed stream in every later test.
import lightning  # noqa: F401
import numpy as np
import pytest
import torch
from PIL import Image

import hybridize  # noqa: F401  (registers the hybrid Auto classes)
from hybridize.converters import convert, plan_layers
from hybridize.mixers.ops.backends import fla_available
from hybridize.presets import tiny_qwen2_5_vl


def needs_cuda(reason: str = "needs a CUDA device", *, fla: bool = False):
    """Mark a test (function or class) that runs only on a CUDA device, with fla's kernels if `fla`: skipped
    elsewhere, and selected by `python -m pytest -m cuda` (what `benchmarks/gpu_suite.py --cuda-only` runs)."""
    available = fla_available() if fla else torch.cuda.is_available()
    if fla and torch.cuda.is_available() and not available:  # the skip says what a GPU run lacks
        reason = f"{reason}: this CUDA machine lacks fla (pip install 'hybridize[cuda]')"

    def mark(test):
        return pytest.mark.cuda(pytest.mark.skipif(not available, reason=reason)(test))

    return mark


def relative_rms(reference: torch.Tensor, value: torch.Tensor) -> float:
    reference, value = reference.double(), value.double()
    return ((reference - value).pow(2).mean().sqrt() / reference.pow(2).mean().sqrt()).item()


def fla_naive_module(op: str):
    """fla's `fla/ops/<op>/naive.py` reference, loaded by file path (no triton needed), from HYBRIDIZE_FLA_SRC
    (an unpacked fla-core wheel, as .ci/run makes) or an installed fla; skips the test when neither exists."""
    root = os.environ.get("HYBRIDIZE_FLA_SRC")
    if root is None:
        spec = importlib.util.find_spec("fla")
        root = str(Path(spec.origin).parent.parent) if spec and spec.origin else None
    path = Path(root or "/nonexistent") / "fla" / "ops" / op / "naive.py"
    if not path.is_file():
        pytest.skip(f"fla's {op}/naive.py not found (set HYBRIDIZE_FLA_SRC to an unpacked fla-core wheel)")
    spec = importlib.util.spec_from_file_location(f"fla_{op}_naive", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_image(seed: int, size: tuple[int, int] = (56, 56)) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


@pytest.fixture(scope="session")
def tiny_teacher():
    """(model, processor): the embedded tiny Qwen2.5-VL, 8 layers, fp32, eval mode."""
    return tiny_qwen2_5_vl(seed=0)


@pytest.fixture(scope="session")
def tiny_hybrid(tiny_teacher):
    """The InfiniteVL layout of the tiny teacher: SWA (window 8) at layers 0 and 4, Gated DeltaNet elsewhere."""
    model, _ = tiny_teacher
    torch.manual_seed(0)
    hybrid, _ = convert(model, plan_layers(8, "1/4", window=8), progress=False)
    return hybrid

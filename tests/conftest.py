"""Shared fixtures: tiny models are built once per session from configs (no downloads)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import hybridize  # noqa: F401  (registers the hybrid Auto classes)
from hybridize.converters import convert, plan_layers
from hybridize.presets import tiny_qwen2_5_vl


def relative_rms(reference: torch.Tensor, value: torch.Tensor) -> float:
    reference, value = reference.double(), value.double()
    return ((reference - value).pow(2).mean().sqrt() / reference.pow(2).mean().sqrt()).item()


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

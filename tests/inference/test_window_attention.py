"""A static cache's sliding-window layer under its fixed-window prefill, and the window attention, against
sliding-window SDPA over the whole sequence."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hybridize.inference.static_cache import SLIDING, LayerLayout, StaticHybridCache
from hybridize.inference.window_attention import WindowKeys, window_attention
from hybridize.mixers.ops.flash import flash_kernel_usable
from tests.conftest import needs_cuda, relative_rms

pytestmark = pytest.mark.transformers_surface  # also run on the oldest supported transformers

CHUNKS = [5, 1, 7, 3, 9, 1, 12, 2]  # shorter and longer than the window, single tokens between


def sliding_reference(query, key, value, window: int, scale: float) -> torch.Tensor:
    """(B, H, T, D) the whole sequence -> (B, T, H, D): SDPA under the sliding causal mask, in float64."""
    positions = torch.arange(query.shape[2], device=query.device)
    distance = positions[:, None] - positions[None, :]
    mask = (distance >= 0) & (distance < window)
    out = F.scaled_dot_product_attention(
        query.double(), key.double(), value.double(), attn_mask=mask, scale=scale, enable_gqa=True
    )
    return out.transpose(1, 2)


def window_cache(window: int, like: torch.Tensor) -> StaticHybridCache:
    """A static cache of one sliding-window layer for keys like `like` (B, Hkv, T, D)."""
    batch, kv_heads, _, head_dim = like.shape
    return StaticHybridCache(
        [LayerLayout(SLIDING, window, kv_heads, head_dim)], batch, like.dtype, like.device
    )


def prefill_fixed(cache: StaticHybridCache, key: torch.Tensor, value: torch.Tensor):
    """One chunk through the layer under the fixed-window prefill, recorded in the cache; the keys and values
    the chunk attends to."""
    with cache.fixed_window_prefill():
        keys, values = cache.layers[0].update(key, value)
    valid = torch.ones(key.shape[0], key.shape[2], dtype=torch.bool, device=key.device)
    cache.record_tokens(valid, torch.zeros(key.shape[0], 1, dtype=torch.long, device=key.device))
    return keys, values


def stream_chunks(query, key, value, window: int, flash: bool, chunks=CHUNKS) -> tuple[torch.Tensor, list]:
    """Feed the sequence chunk by chunk through a static cache's sliding-window layer under its fixed-window
    prefill and window_attention; (B, T, H, D) and the phase (window full or not) of each chunk."""
    batch, _, _, head_dim = key.shape
    cache = window_cache(window, key)
    outs, phases, start = [], [], 0
    for length in chunks:
        piece = slice(start, start + length)
        full = cache.seen_tokens >= window - 1
        keys = WindowKeys(window=window, empty=cache.layers[0].empty_slots(), full=full, flash=flash)
        all_keys, all_values = prefill_fixed(cache, key[:, :, piece], value[:, :, piece])
        assert all_keys.shape[2] == window - 1 + length and cache.layers[0].keys.shape[2] == window
        out, weights = window_attention(
            nn.Module(), query[:, :, piece], all_keys, all_values, keys, scaling=0.25, sliding_window=window
        )
        assert weights is None and out.shape == (batch, length, query.shape[1], head_dim)
        outs.append(out)
        phases.append(full)
        start += length
    return torch.cat(outs, dim=1), phases


@pytest.mark.parametrize(("dtype", "kv_heads"), [(torch.float64, 4), (torch.float32, 2)])
def test_chunks_through_the_fixed_window_equal_sliding_sdpa(dtype, kv_heads):
    torch.manual_seed(0)
    window, total = 8, sum(CHUNKS)
    query = torch.randn(2, 4, total, 16, dtype=dtype)
    key, value = (torch.randn(2, kv_heads, total, 16, dtype=dtype) for _ in range(2))
    out, phases = stream_chunks(query, key, value, window, flash=False)
    assert phases[:2] == [False, False] and phases[-1]  # filling, then full
    expected = sliding_reference(query, key, value, window, 0.25)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


def test_the_layer_keeps_the_last_window_of_tokens_in_fixed_tensors():
    tokens = torch.arange(1, 10, dtype=torch.float32).view(1, 1, 9, 1).expand(1, 2, 9, 4)
    cache = window_cache(6, tokens)
    layer = cache.layers[0]
    buffers = layer.keys.data_ptr(), layer.values.data_ptr()
    shapes, kept, handed = set(), [], []
    for start, length in [(0, 2), (2, 1), (3, 4), (7, 2)]:
        assert int(layer.empty_slots()) == max(5 - cache.seen_tokens, 0)
        keys, _ = prefill_fixed(
            cache, tokens[:, :, start : start + length], -tokens[:, :, start : start + length]
        )
        shapes.add(tuple(layer.keys.shape))
        handed.append(keys[0, 0, :, 0].tolist())
        kept.append(layer.kept()[0][0, 0, :, 0].tolist())
    assert shapes == {(1, 2, 6, 4)} and (layer.keys.data_ptr(), layer.values.data_ptr()) == buffers
    assert handed[1] == [0, 0, 0, 1, 2, 3] and handed[3] == [3, 4, 5, 6, 7, 8, 9]  # empty slots first, zero
    assert kept == [[1, 2], [1, 2, 3], [3, 4, 5, 6, 7], [5, 6, 7, 8, 9]]
    assert torch.equal(layer.kept()[1], -layer.kept()[0])
    branch = cache.clone()
    prefill_fixed(branch, tokens[:, :, :1], tokens[:, :, :1])
    assert layer.kept()[0][0, 0, :, 0].tolist() == [5, 6, 7, 8, 9]
    restore = cache.save_for_tokens(3)
    prefill_fixed(cache, tokens[:, :, :3], tokens[:, :, :3])
    assert layer.kept()[0][0, 0, :, 0].tolist() == [8, 9, 1, 2, 3]
    restore()
    assert layer.kept()[0][0, 0, :, 0].tolist() == [5, 6, 7, 8, 9] and cache.seen_tokens == 9


def test_window_attention_refuses_other_masks_and_windows():
    query = torch.randn(1, 2, 3, 8)
    keys = WindowKeys(window=4, empty=torch.tensor(0), full=True, flash=False)
    with pytest.raises(TypeError, match="WindowKeys"):
        window_attention(nn.Module(), query, query, query, torch.ones(1, 1, 3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="window is 8"):
        window_attention(nn.Module(), query, query, query, keys, sliding_window=8)


@needs_cuda("PyTorch's flash kernel runs on CUDA")
@pytest.mark.parametrize("kv_heads", [4, 1])
def test_flash_paths_equal_sliding_sdpa_in_bf16(kv_heads):
    """The varlen call while the window fills, the batched one once it is full, against float64 SDPA."""
    assert flash_kernel_usable("cuda", torch.bfloat16, 64)
    torch.manual_seed(0)
    window, chunks = 128, [100, 1, 60, 37, 258, 1, 258, 5]
    total = sum(chunks)
    # q, k, v as (B, H, T, D) views of (B, T, H, D) projections, as the attention layers hand them over
    query = torch.randn(2, total, 4, 64, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    key, value = (
        torch.randn(2, total, kv_heads, 64, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
        for _ in range(2)
    )
    out, phases = stream_chunks(query, key, value, window, flash=True, chunks=chunks)
    assert not phases[2] and phases[-1]
    expected = sliding_reference(query, key, value, window, 0.25)
    assert relative_rms(expected, out) < 5e-3
    reference, _ = stream_chunks(query.double(), key.double(), value.double(), window, False, chunks)
    torch.testing.assert_close(reference, expected)

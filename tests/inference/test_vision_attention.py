"""The packed (block-diagonal) attention against SDPA run on each segment alone."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface

from hybridize.compat import configured_attention
from hybridize.inference.vision_attention import (
    PACKED_ATTENTION,
    BlockDiagonalMasks,
    block_diagonal_mask,
    packed_attention_on,
    packed_sdpa_attention,
)
from hybridize.mixers.ops.flash import flash_kernel_usable
from tests.conftest import needs_cuda, relative_rms

BOUNDARIES = [0, 5, 12, 13, 24]  # unequal segments, one of a single position


def per_segment_sdpa(query, key, value, boundaries, scale) -> torch.Tensor:
    """(1, H, L, D) -> (1, L, H, D): SDPA on each segment, the way transformers splits a vision tower's windows."""
    lengths = torch.tensor(boundaries).diff().tolist()
    key = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
    value = value.repeat_interleave(query.shape[1] // value.shape[1], dim=1)
    outs = [
        F.scaled_dot_product_attention(q, k, v, scale=scale)
        for q, k, v in zip(*(t.split(lengths, dim=2) for t in (query, key, value)), strict=True)
    ]
    return torch.cat(outs, dim=2).transpose(1, 2)


@pytest.mark.parametrize(("dtype", "kv_heads"), [(torch.float64, 4), (torch.float32, 4), (torch.float64, 2)])
def test_packed_attention_equals_per_segment_sdpa(dtype, kv_heads):
    torch.manual_seed(0)
    length = BOUNDARIES[-1]
    query = torch.randn(1, 4, length, 8, dtype=dtype)
    key, value = (torch.randn(1, kv_heads, length, 8, dtype=dtype) for _ in range(2))
    cu_seqlens = torch.tensor(BOUNDARIES, dtype=torch.int32)
    module = nn.Module()
    out, weights = packed_sdpa_attention(
        module,
        query,
        key,
        value,
        None,
        scaling=0.3,
        dropout=0.0,
        is_causal=False,
        cu_seq_lens_q=cu_seqlens,
        cu_seq_lens_k=cu_seqlens,
        max_length_q=11,
        max_length_k=11,
    )
    assert weights is None and out.shape == (1, length, 4, 8) and out.is_contiguous()
    torch.testing.assert_close(out, per_segment_sdpa(query, key, value, BOUNDARIES, 0.3))


def packed_call(query, key, value, boundaries, masks: BlockDiagonalMasks | None = None) -> torch.Tensor:
    cu_seqlens = torch.tensor(boundaries, dtype=torch.int32, device=query.device)
    longest = max(torch.tensor(boundaries).diff().tolist())
    return packed_sdpa_attention(
        nn.Module(),
        query,
        key,
        value,
        None,
        scaling=0.3,
        cu_seq_lens_q=cu_seqlens,
        cu_seq_lens_k=cu_seqlens,
        max_length_q=longest,
        max_length_k=longest,
        block_diagonal_masks=masks,
    )[0]


def test_one_segment_needs_no_mask():
    torch.manual_seed(0)
    query, key, value = (torch.randn(1, 4, 24, 8, dtype=torch.float64) for _ in range(3))
    masks = BlockDiagonalMasks()
    out = packed_call(query, key, value, [0, 24], masks)
    assert not masks.entries
    torch.testing.assert_close(out, per_segment_sdpa(query, key, value, [0, 24], 0.3))


@needs_cuda("PyTorch's flash kernel runs on CUDA")
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_varlen_flash_equals_per_segment_sdpa_in_bf16(kv_heads):
    """The ViT's layout: q, k, v as (1, H, L, D) views of one (L, 3, H, D) projection; head size 80."""
    assert flash_kernel_usable("cuda", torch.bfloat16, 80)
    torch.manual_seed(0)
    boundaries = [0, 64, 128, 150, 151, 256]
    qkv = torch.randn(256, 3, 4, 80, device="cuda", dtype=torch.bfloat16)
    query, key, value = qkv.permute(1, 2, 0, 3)[:, None].unbind(0)  # (1, 4, 256, 80) views
    key, value = key[:, :kv_heads], value[:, :kv_heads]
    masks = BlockDiagonalMasks(flash=True)
    out = packed_call(query, key, value, boundaries, masks)
    expected = per_segment_sdpa(query.double(), key.double(), value.double(), boundaries, 0.3)
    assert not masks.entries and out.shape == (1, 256, 4, 80)
    assert relative_rms(expected, out) < 5e-3


def test_masks_are_built_once_per_boundary_tensor():
    cu_seqlens, windows = torch.tensor(BOUNDARIES), torch.tensor([0, 12, 24])
    masks = BlockDiagonalMasks()
    mask = masks.get(cu_seqlens, cu_seqlens, 24, 24)
    assert masks.get(cu_seqlens, cu_seqlens, 24, 24) is mask
    assert masks.get(windows, windows, 24, 24) is not mask and len(masks.entries) == 2
    assert torch.equal(mask, block_diagonal_mask(cu_seqlens, cu_seqlens, 24, 24))
    expected = torch.block_diag(*(torch.ones(n, n, dtype=torch.bool) for n in [5, 7, 1, 11]))
    assert mask.shape == (1, 1, 24, 24) and torch.equal(mask[0, 0], expected)


def test_packed_attention_refuses_what_it_does_not_compute():
    query = torch.randn(1, 2, 4, 8)
    cu_seqlens = torch.tensor([0, 4])
    varlen = dict(cu_seq_lens_q=cu_seqlens, cu_seq_lens_k=cu_seqlens)
    with pytest.raises(ValueError, match="cu_seq_lens_q"):
        packed_sdpa_attention(nn.Module(), query, query, query, None)
    with pytest.raises(NotImplementedError, match="is_causal=True"):
        packed_sdpa_attention(nn.Module(), query, query, query, None, is_causal=True, **varlen)
    with pytest.raises(NotImplementedError, match="softcap"):
        packed_sdpa_attention(nn.Module(), query, query, query, None, softcap=30.0, **varlen)


def test_packed_attention_is_registered_under_a_flash_name():
    from transformers.utils.generic import is_flash_attention_requested

    assert AttentionInterface._global_mapping[PACKED_ATTENTION] is packed_sdpa_attention
    assert is_flash_attention_requested(requested_attention_implementation=PACKED_ATTENTION)


def test_packed_attention_on_restores_the_config(tiny_teacher):
    config = tiny_teacher[0].model.visual.config
    assert configured_attention(config) == "sdpa"
    with pytest.raises(RuntimeError, match="inside"), packed_attention_on(config):
        assert configured_attention(config) == PACKED_ATTENTION
        raise RuntimeError("inside")
    assert configured_attention(config) == "sdpa"

"""Packed attention for Qwen2.5-VL's vision tower: one SDPA call per layer instead of one per window.

Under SDPA or eager attention, transformers' `Qwen2_5_VLVisionAttention` splits q, k, v at the window boundaries
and runs attention once per window (at 448x448, 16 windows of 64 patches in each of 28 windowed layers: some 450
small attention calls per frame). Under a flash implementation it instead hands the whole packed sequence to the
attention function with the boundaries as `cu_seq_lens_q` / `cu_seq_lens_k`. `packed_sdpa_attention` takes that
call and runs it as one SDPA call whose boolean mask is block-diagonal over the segments: more arithmetic (each
query is scored against every key, the mask zeroes the other windows) for far fewer kernels. Where PyTorch's
flash kernel runs (`hybridize.mixers.ops.flash`), the call is instead its varlen form over the segments, which
scores each query against its own window only; a single segment (the ViT's full-attention layers) is plain SDPA.
"""

from __future__ import annotations

from contextlib import AbstractContextManager

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface

from hybridize.compat import attention_implementation
from hybridize.mixers.ops.flash import flash_attention

# transformers takes the varlen branch (cu_seqlens passed, no split per window) only for implementations whose name
# contains "flash" (`is_flash_attention_requested`), so the name carries the word though no flash-attn kernel runs.
PACKED_ATTENTION = "hybridize_flash_packed_sdpa"


def block_diagonal_mask(
    cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, query_length: int, key_length: int
) -> torch.Tensor:
    """(1, 1, query_length, key_length) bool: query i sees key j when both lie in the same segment.

    Segment s spans [cu_seqlens[s], cu_seqlens[s + 1]); positions past the last boundary form one more segment.
    Device ops only (no host sync), so a CUDA graph can hold it.
    """

    def segments(cu_seqlens: torch.Tensor, length: int) -> torch.Tensor:  # (length,) segment of each position
        positions = torch.arange(length, dtype=cu_seqlens.dtype, device=cu_seqlens.device)
        return torch.bucketize(positions, cu_seqlens[1:], right=True)

    same = segments(cu_seqlens_q, query_length)[:, None] == segments(cu_seqlens_k, key_length)[None, :]
    return same[None, None]


class BlockDiagonalMasks:
    """Block-diagonal masks built once per pair of boundary tensors, looked up by the tensors' identity.

    The vision tower passes the same `cu_seqlens` object to every layer of a kind (windowed or full), so with
    boundaries fixed for good (a frame encoder's), each mask is built once instead of in every layer. The
    boundaries must not change in place. The cache holds the boundary tensors, so their ids stay theirs.
    flash: the attention runs PyTorch's varlen flash kernel instead and needs no mask (the caller checks
    `flash_kernel_usable` once, for the tower's device, dtype and head size).
    """

    def __init__(self, flash: bool = False):
        self.flash = flash
        self.entries: dict[tuple[int, int, int, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def get(
        self, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, query_length: int, key_length: int
    ) -> torch.Tensor:
        key = (id(cu_seqlens_q), id(cu_seqlens_k), query_length, key_length)
        if key not in self.entries:
            mask = block_diagonal_mask(cu_seqlens_q, cu_seqlens_k, query_length, key_length)
            self.entries[key] = (cu_seqlens_q, cu_seqlens_k, mask)
        return self.entries[key][2]


def packed_sdpa_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    cu_seq_lens_q: torch.Tensor | None = None,
    cu_seq_lens_k: torch.Tensor | None = None,
    max_length_q: int | None = None,
    max_length_k: int | None = None,
    block_diagonal_masks: BlockDiagonalMasks | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention within each segment of packed sequences, for transformers' attention interface (varlen call).

    query (B, Hq, Lq, D); key, value (B, Hkv, Lk, D); cu_seq_lens_q / cu_seq_lens_k (S + 1,) int segment
    boundaries on the device, `max_length_q` / `max_length_k` the longest segments. With
    `block_diagonal_masks.flash`: PyTorch's varlen flash kernel (batch 1), or one SDPA call without a mask when
    a single segment spans everything. Else one SDPA call under a block-diagonal bool mask, from
    `block_diagonal_masks` when given (built once per boundary tensor) or built here. `output_attentions` gets no
    weights, as under flash attention. Returns ((B, Lq, Hq, D), None) like transformers' flash and SDPA attention.
    """
    if cu_seq_lens_q is None or cu_seq_lens_k is None:
        raise ValueError(
            f"{PACKED_ATTENTION!r} attention needs the segment boundaries cu_seq_lens_q and cu_seq_lens_k (the "
            "varlen call of a vision tower's attention); set it on a vision config only."
        )
    is_causal = getattr(module, "is_causal", False) if is_causal is None else is_causal
    if attention_mask is not None or is_causal:
        raise NotImplementedError(
            f"{PACKED_ATTENTION!r} attention is bidirectional within each segment; got is_causal={is_causal} and "
            f"attention_mask={'a tensor' if attention_mask is not None else None}, expected False and None."
        )
    for unsupported in ("sliding_window", "softcap", "s_aux"):
        if kwargs.get(unsupported) is not None:
            raise NotImplementedError(f"{PACKED_ATTENTION!r} attention does not support {unsupported!r}.")
    one_segment = max_length_q == query.shape[2] and max_length_k == key.shape[2]
    if block_diagonal_masks is not None and block_diagonal_masks.flash and not (one_segment or dropout):
        if query.shape[0] != 1 or None in (max_length_q, max_length_k):
            raise ValueError(
                f"Varlen flash attention takes batch 1 with max_length_q and max_length_k; got batch "
                f"{query.shape[0]}, max_length_q={max_length_q}, max_length_k={max_length_k}."
            )
        out = flash_attention(
            query[0].transpose(0, 1),  # (Lq, Hq, D) views
            key[0].transpose(0, 1),
            value[0].transpose(0, 1),
            query.shape[-1] ** -0.5 if scaling is None else scaling,
            causal=False,
            cu_seqlens_q=cu_seq_lens_q.int(),
            cu_seqlens_k=cu_seq_lens_k.int(),
            max_q=max_length_q,
            max_k=max_length_k,
        )
        return out[None], None
    lengths = (cu_seq_lens_q, cu_seq_lens_k, query.shape[2], key.shape[2])
    mask = (
        None
        if one_segment
        else (
            block_diagonal_mask(*lengths)
            if block_diagonal_masks is None
            else block_diagonal_masks.get(*lengths)
        )
    )
    out = F.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=mask,
        dropout_p=dropout,
        scale=scaling,
        enable_gqa=key.shape[1] != query.shape[1],
    )  # (B, Hq, Lq, D)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(PACKED_ATTENTION, packed_sdpa_attention)


def packed_attention_on(config) -> AbstractContextManager[None]:
    """`config` (a vision config) names the packed attention inside the block, and what it named before after it."""
    return attention_implementation(config, PACKED_ATTENTION)

"""Sliding-window attention over a preallocated window: a stream's keys in fixed tensors, one flash call per layer.

Under a static cache's fixed-window prefill (`hybridize.inference.static_cache.StaticHybridCache.
fixed_window_prefill`) a stream's sliding-window layer gets its `window - 1` most recent slots, oldest first, from
the first token on (the slots without a token yet at the front), followed by the chunk's tokens, so that the
shapes are the same at every frame and the per-frame prefill can be captured in CUDA graphs at the second frame.
Its attention is told how many slots hold no token by a `WindowKeys` passed in place of the mask, and runs as:

- a full window (every slot holds a token): one call of PyTorch's flash attention kernel with its sliding
  window (`window - 1` keys to the left, none to the right, aligned to the last key), which visits only the
  keys in the band. SDPA takes no window and runs this band as a dense boolean mask (3.5x slower at 258 x 8,449
  keys on the H100, `benchmarks/attention_kernels.py`);
- a window still filling: the same kernel in its varlen form, each sequence's empty slots skipped through its
  key offsets, which a CUDA graph can read from the device;
- elsewhere (CPU, fp32, no flash kernel): SDPA under the band mask of the same keys, the reference that the
  flash paths are tested against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface

from hybridize.mixers.masks import band_mask
from hybridize.mixers.ops.flash import flash_attention

WINDOW_ATTENTION = "hybridize_window_attention"


# ----------------------------------------------------------------------------------------------- attention


@dataclass(frozen=True)
class WindowKeys:
    """What a sliding-window layer under a fixed-window prefill attends to, passed in place of its mask.

    The keys are the layer's `window - 1` slots followed by the chunk's own tokens; the first `empty` slots
    hold no token (a device tensor read before the update). `full`: known on the host to be 0, so one batched
    flash call does. `flash`: run PyTorch's flash kernel (`flash_kernel_usable`), else SDPA under a mask.
    """

    window: int
    empty: torch.Tensor
    full: bool
    flash: bool


def window_band_mask(keys: WindowKeys, query_length: int, key_length: int) -> torch.Tensor:
    """(1, 1, Lq, Lk) bool: query i (the (Lk - Lq + i)-th key's token) sees the `window` keys up to its own,
    past the empty slots."""
    device = keys.empty.device
    query = torch.arange(query_length, device=device) + (key_length - query_length)
    key = torch.arange(key_length, device=device)
    allowed = band_mask(query, key, keys.window) & (key >= keys.empty)[None, :]
    return allowed[None, None]


def window_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: WindowKeys,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention interface over a fixed-window prefill's keys: query (B, Hq, Lq, D), key and value
    (B, Hkv, window - 1 + Lq, D). Returns ((B, Lq, Hq, D), None) like transformers' SDPA attention."""
    if not isinstance(attention_mask, WindowKeys):
        raise TypeError(
            f"{WINDOW_ATTENTION!r} attention reads a WindowKeys in place of the mask (a stream's sliding-window "
            f"layers under a fixed-window prefill), got {type(attention_mask).__name__}; use 'sdpa' elsewhere."
        )
    if sliding_window is not None and sliding_window != attention_mask.window:
        raise ValueError(f"The layer's window is {sliding_window}, its cache's {attention_mask.window}.")
    if dropout:
        raise NotImplementedError(f"{WINDOW_ATTENTION!r} attention is for inference; got dropout={dropout}.")
    batch, heads, length, head_dim = query.shape
    total = key.shape[2]
    scale = head_dim**-0.5 if scaling is None else scaling
    if attention_mask.flash and attention_mask.full:
        out = flash_attention(
            query.transpose(1, 2),  # (B, Lq, Hq, D) views
            key.transpose(1, 2),
            value.transpose(1, 2),
            scale,
            causal=True,
            window_left=attention_mask.window - 1,
        )
        return out, None
    if attention_mask.flash:
        # Two sequences per batch row: no queries over its empty slots, then the row's queries over the rest.
        device = query.device
        rows = torch.arange(batch + 1, device=device, dtype=torch.int32)
        cu_q = torch.stack([rows[:-1] * length, rows[1:] * length], dim=1).flatten()
        cu_k = torch.stack([rows[:-1] * total + attention_mask.empty, rows[1:] * total], dim=1).flatten()
        zero = rows[:1] * 0
        out = flash_attention(
            query.transpose(1, 2).reshape(batch * length, heads, head_dim),
            key.transpose(1, 2).reshape(batch * total, -1, head_dim),
            value.transpose(1, 2).reshape(batch * total, -1, head_dim),
            scale,
            causal=True,
            window_left=attention_mask.window - 1,
            cu_seqlens_q=torch.cat([zero, cu_q]),
            cu_seqlens_k=torch.cat([zero, cu_k]),
            max_q=length,
            max_k=total,
        )
        return out.view(batch, length, heads, head_dim), None
    out = F.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=window_band_mask(attention_mask, length, total),
        scale=scale,
        enable_gqa=key.shape[1] != heads,
    )  # (B, Hq, Lq, D)
    return out.transpose(1, 2), None


AttentionInterface.register(WINDOW_ATTENTION, window_attention)

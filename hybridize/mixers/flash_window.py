"""Softmax attention for training and prefill without dense masks: PyTorch's flash kernel with the layer's window.

Under SDPA a sliding-window layer, a padded batch or a packed row (several samples in one row) gets a dense
(B, 1, L, L) boolean mask: the kernel computes every block of it and the mask alone is L^2 bytes (1 GiB at 32K).
The flash kernel (`hybridize.mixers.ops.flash`) takes the window as `window_size_left` and packed or padded rows
as varlen boundaries, forward and backward, and skips the blocks outside them.

`FLASH_WINDOW` is registered with transformers' attention and mask interfaces: the model then builds masks the way
it does for flash-attention (None, or the 2-D key-padding mask, which the linear mixers read too), and every
softmax layer calls `flash_window_attention` with its `sliding_window` and the packing kwargs (`cu_seq_lens_q/k`,
`max_length_q/k`). Where the flash kernel cannot run (CPU, fp32, a head size it lacks) the same call is SDPA under
the equivalent dense mask: the reference the kernel path is tested against. `use_attention_implementation`
(`hybridize.converters.discovery`) points a model's text attention at it; the training stages do so.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hybridize.compat import register_unpadded_attention
from hybridize.mixers.masks import band_mask
from hybridize.mixers.ops.flash import flash_attention, flash_kernel_usable

FLASH_WINDOW = "hybridize_flash_window"


def flash_window_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    cu_seq_lens_q: torch.Tensor | None = None,
    cu_seq_lens_k: torch.Tensor | None = None,
    max_length_q: int | None = None,
    max_length_k: int | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: query (B, Hq, Lq, D), key/value (B, Hkv, Lk, D) with Hkv
    dividing Hq; `attention_mask` None or (B, Lk) bool, True at real keys (the last Lq of them are the queries);
    `sliding_window` W: a query sees itself and the W - 1 keys before it; `cu_seq_lens_q/k`: int32 sample
    boundaries over the flattened (B * L) tokens of packed rows. Causal unless `module.is_causal` is False;
    queries are aligned to the last keys. Returns ((B, Lq, Hq, D), None); padding queries give zeros."""
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(
            f"{FLASH_WINDOW} takes a 2-D key-padding mask, got shape {tuple(attention_mask.shape)}; the model must "
            f"build its masks for {FLASH_WINDOW} (use_attention_implementation) rather than for SDPA or eager."
        )
    unsupported = [name for name in ("softcap", "s_aux") if kwargs.get(name) is not None]
    if unsupported:
        raise ValueError(
            f"{type(module).__name__} passes {', '.join(unsupported)} to its attention, which {FLASH_WINDOW} does "
            "not apply; train this family with flash_window: false (its own attention implementation)."
        )
    if attention_mask is not None and bool(attention_mask.all()):
        attention_mask = None  # no padding: the kernel's causal form, no gather
    if cu_seq_lens_q is not None and attention_mask is not None:
        raise ValueError("Packed rows (cu_seq_lens_q) carry no padding mask; got both.")
    batch, heads, length_q, head_dim = query.shape
    scale = head_dim**-0.5 if scaling is None else scaling
    causal = getattr(module, "is_causal", True)
    dropout = dropout if module.training else 0.0
    if not flash_kernel_usable(query.device, query.dtype, head_dim):
        out = _masked_reference(
            query,
            key,
            value,
            attention_mask,
            scale,
            causal,
            sliding_window,
            cu_seq_lens_q,
            cu_seq_lens_k,
            dropout,
        )
        return out, None
    window_left = None if sliding_window is None else sliding_window - 1
    query, key, value = (x.transpose(1, 2) for x in (query, key, value))  # (B, L, H, D)
    if cu_seq_lens_q is not None:
        cu_seq_lens_k = cu_seq_lens_q if cu_seq_lens_k is None else cu_seq_lens_k
        if max_length_q is None:  # the kernel's grid covers the longest sample (one host read)
            max_length_q = int((cu_seq_lens_q[1:] - cu_seq_lens_q[:-1]).max())
        max_length_k = max_length_q if max_length_k is None else max_length_k
        out = flash_attention(
            *(x.reshape(-1, *x.shape[2:]) for x in (query, key, value)),
            scale,
            causal,
            window_left,
            cu_seq_lens_q.int(),
            cu_seq_lens_k.int(),
            int(max_length_q),
            int(max_length_k),
            dropout=dropout,
        )
        return out.view(batch, length_q, heads, head_dim), None
    if attention_mask is None:
        return flash_attention(query, key, value, scale, causal, window_left, dropout=dropout), None
    # Padded rows: only the real tokens go through the kernel, as one varlen call.
    keys_real = attention_mask.reshape(-1)
    queries_real = attention_mask[:, -length_q:].reshape(-1)
    lengths_q, lengths_k = attention_mask[:, -length_q:].sum(-1), attention_mask.sum(-1)
    cu_q = F.pad(lengths_q.cumsum(0), (1, 0)).int()
    cu_k = F.pad(lengths_k.cumsum(0), (1, 0)).int()
    real_out = flash_attention(
        query.reshape(-1, heads, head_dim)[queries_real],
        key.reshape(-1, *key.shape[2:])[keys_real],
        value.reshape(-1, *value.shape[2:])[keys_real],
        scale,
        causal,
        window_left,
        cu_q,
        cu_k,
        int(lengths_q.max()),
        int(lengths_k.max()),
        dropout=dropout,
    )
    out = real_out.new_zeros(batch * length_q, heads, head_dim).index_put((queries_real,), real_out)
    return out.view(batch, length_q, heads, head_dim), None


def _masked_reference(
    query, key, value, key_mask, scale, causal, window, cu_q, cu_k, dropout
) -> torch.Tensor:
    """The same attention as SDPA under a dense boolean mask. Returns (B, Lq, Hq, D)."""
    batch, heads, length_q, head_dim = query.shape
    length_k = key.shape[2]
    device = query.device
    if cu_q is not None:
        if length_q != length_k or (cu_k is not None and not torch.equal(cu_k, cu_q)):
            raise ValueError("Packed rows (cu_seq_lens_q/k) need the same queries and keys, as in training.")
        # Samples may cross row ends: one row of all B * L tokens, each position counted from its sample's start.
        query, key, value = (
            x.transpose(0, 1).reshape(1, x.shape[1], -1, head_dim) for x in (query, key, value)
        )
        flat = torch.arange(batch * length_q, device=device)
        sample = torch.bucketize(flat, cu_q[1:].long(), right=True)
        query_pos = key_pos = flat - cu_q.long()[sample]
        same_sample = sample[:, None] == sample[None, :]
    else:
        query_pos = torch.arange(length_q, device=device) + (length_k - length_q)  # aligned to the last key
        key_pos = torch.arange(length_k, device=device)
        same_sample = None
    allowed = band_mask(query_pos, key_pos, window, causal)
    if same_sample is not None:
        allowed &= same_sample
    allowed = allowed[None, None]  # (1, 1, Lq, Lk)
    if key_mask is not None:
        allowed = allowed & key_mask[:, None, None, :]  # (B, 1, Lq, Lk)
    # A padding query with no key in reach would give NaN; it sees everything and is zeroed after.
    empty = ~allowed.any(-1, keepdim=True)
    out = F.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=allowed | empty,
        dropout_p=dropout,
        scale=scale,
        enable_gqa=query.shape[1] != key.shape[1],
    ).masked_fill(empty, 0.0)
    if key_mask is not None:
        out = out * key_mask[:, None, -length_q:, None]
    return out.transpose(1, 2).reshape(batch, length_q, heads, head_dim)


register_unpadded_attention(FLASH_WINDOW, flash_window_attention)

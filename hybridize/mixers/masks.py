"""Padding information for mixers, recovered from the attention mask the decoder layer receives."""

from __future__ import annotations

import torch


def key_padding_mask(attention_mask, query_length: int) -> torch.Tensor | None:
    """(B, query_length) bool, True at real tokens, for the tokens of this forward; None when nothing is padded.

    Decoder layers get the model's prepared mask: None (no padding, causal kernels), a 2-D key mask
    (flash-attention), a 4-D boolean mask (SDPA, True = attend) or a 4-D additive float mask (eager). In a
    causal mask the last query row attends to every real key, so it is the key-padding mask; its last
    `query_length` columns are this forward's tokens.
    """
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(
            f"Linear mixers need a tensor attention mask to find padding, got {type(attention_mask).__name__}; "
            "use attn_implementation='sdpa', 'eager' or 'flash_attention_2'."
        )
    if attention_mask.dim() == 2:
        valid = attention_mask.bool()
    elif attention_mask.dim() == 4:
        row = attention_mask[:, 0, -1, :]
        valid = row if row.dtype == torch.bool else row == 0
    else:
        raise ValueError(f"Expected a 2-D or 4-D attention mask, got shape {tuple(attention_mask.shape)}.")
    valid = valid[:, -query_length:]
    if valid.shape[-1] != query_length:
        raise ValueError(
            f"The attention mask covers {valid.shape[-1]} keys but this forward has {query_length} tokens."
        )
    # A single new token (a decode step) is always real; skipping the check avoids a device sync.
    return None if query_length == 1 or bool(valid.all()) else valid


def band_mask(
    query_positions: torch.Tensor, key_positions: torch.Tensor, window: int | None, causal: bool = True
) -> torch.Tensor:
    """(..., Lq, Lk) bool, True where a query at `query_positions` (..., Lq) sees a key at `key_positions`
    (..., Lk): at or before its own position (if `causal`) and fewer than `window` positions back (None: no
    window), so a window of W keeps the query's own token and the W - 1 before it. The one rule of the
    sliding-window mixer's masks, the stream's window attention and the flash-window reference."""
    query, key = query_positions[..., :, None], key_positions[..., None, :]
    allowed = torch.ones(
        torch.broadcast_shapes(query.shape, key.shape), dtype=torch.bool, device=query.device
    )
    if causal:
        allowed &= key <= query
    if window is not None:
        allowed &= query - key < window
    return allowed

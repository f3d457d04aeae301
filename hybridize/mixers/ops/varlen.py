"""Packed sequences in one row: N sequences laid end to end along time (batch size 1), their boundaries
`cu_seqlens` (N+1,) rising from 0 to the row's length, as fla's and flash-attention's varlen kernels take them.

A scan over a packed row restarts from an empty state at every boundary. The kernel paths do that inside one
call; the pure-PyTorch references run once per sequence (`run_per_sequence`, which reads the boundaries on
the host).
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def check_packed_inputs(
    cu_seqlens: torch.Tensor,
    batch: int,
    initial_state: torch.Tensor | None,
    output_final_state: bool,
    op: str,
) -> None:
    """Packed rows are a training input: one row, every sequence from an empty state, no state kept."""
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.is_floating_point():
        raise ValueError(
            f"{op}: cu_seqlens must be a 1-D integer tensor of N+1 sequence boundaries, got shape "
            f"{tuple(cu_seqlens.shape)} and dtype {cu_seqlens.dtype}."
        )
    if batch != 1:
        raise ValueError(
            f"{op}: packed sequences (cu_seqlens) come as one row, got batch size {batch}; flatten the batch "
            "to (1, B*T, ...) and give the boundaries over the flattened row."
        )
    if initial_state is not None or output_final_state:
        raise ValueError(
            f"{op}: packed sequences (cu_seqlens) each start from an empty state and keep none; pass no "
            "initial_state and output_final_state=False (generation takes one sequence per row)."
        )


def sequence_ids(cu_seqlens: torch.Tensor, length: int) -> torch.Tensor:
    """(length,) int64: which packed sequence each token of the row belongs to, computed on the device."""
    starts = cu_seqlens.long()
    tokens = torch.arange(length, device=cu_seqlens.device)
    return torch.searchsorted(starts, tokens, right=True) - 1


def positions_in_sequence(cu_seqlens: torch.Tensor, length: int) -> torch.Tensor:
    """(length,) int64: each token's position within its packed sequence (0 at every boundary)."""
    tokens = torch.arange(length, device=cu_seqlens.device)
    return tokens - cu_seqlens.long()[sequence_ids(cu_seqlens, length)]


def run_per_sequence(
    scan: Callable[..., torch.Tensor], cu_seqlens: torch.Tensor, *tensors: torch.Tensor
) -> torch.Tensor:
    """`scan` on each packed sequence alone (every tensor sliced along time, dim 1), the outputs joined along
    time again: the pure-PyTorch form of a varlen kernel. Reads the boundaries on the host."""
    bounds = cu_seqlens.tolist()
    spans = [(start, end) for start, end in zip(bounds[:-1], bounds[1:], strict=False) if end > start]
    return torch.cat([scan(*(t[:, start:end] for t in tensors)) for start, end in spans], dim=1)

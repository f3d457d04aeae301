"""PyTorch's own flash attention kernel, called directly where SDPA cannot express the call.

SDPA reaches the kernel only without a mask. `aten._flash_attention_forward` (the op behind SDPA's flash backend,
present in every CUDA build of PyTorch) also takes a sliding window and packed (varlen) sequences, which
sliding-window layers, packed training rows and the ViT's windowed attention need; without it they run SDPA under
dense boolean masks, which cuDNN and the efficient kernel compute in full. The op is differentiable: autograd runs
`aten._flash_attention_backward` with the same window and boundaries, so training uses it too.
"""

from __future__ import annotations

import torch

FLASH_DTYPES = (torch.float16, torch.bfloat16)


def flash_kernel_usable(device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    """Whether PyTorch's flash attention kernel (`aten._flash_attention_forward`, the one behind SDPA's flash
    backend) runs these inputs: CUDA on sm80 or newer, fp16/bf16, a head size that is a multiple of 8 up to 256."""
    device = torch.device(device)
    return (
        device.type == "cuda"
        and dtype in FLASH_DTYPES
        and head_dim % 8 == 0
        and head_dim <= 256
        and torch.backends.cuda.is_flash_attention_available()
        and torch.backends.cuda.flash_sdp_enabled()
        and torch.cuda.get_device_capability(device)[0] >= 8
    )


def flash_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scale: float,
    causal: bool,
    window_left: int | None = None,
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    max_q: int | None = None,
    max_k: int | None = None,
    dropout: float = 0.0,
) -> torch.Tensor:
    """PyTorch's flash attention (differentiable). Batched: query (B, Lq, Hq, D), key/value (B, Lk, Hkv, D)
    with Hkv dividing Hq; varlen: (total, H, D) with int32 boundaries `cu_seqlens_*` and the longest sequences
    `max_q` / `max_k`. Masks are aligned to each sequence's last key (a query sees the keys up to its own
    position counted from the end, and `window_left` more before it). Only the last dim needs to be contiguous.
    Returns the output shaped like query."""
    if cu_seqlens_q is None:
        max_q, max_k = query.shape[1], key.shape[1]
    return torch.ops.aten._flash_attention_forward(
        query,
        key,
        value,
        cu_seqlens_q,
        cu_seqlens_k,
        max_q,
        max_k,
        dropout,
        causal,
        False,
        scale=scale,
        window_size_left=window_left,
        window_size_right=0 if causal else None,
    )[0]

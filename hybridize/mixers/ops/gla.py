"""Gated linear attention: S_t = diag(exp(gk_t)) S_{t-1} + k_t v_t^T, o_t = scale * S_t^T q_t.

Layouts follow fla: q, k and the log decay gk (<= 0, one per key dimension) (B, T, H, K); v (B, T, H, V);
the recurrent state is K-first (B, H, K, V) and fp32 (fp64 for fp64 inputs).

Two pure-PyTorch references (a chunked form for prefill/training, a step-by-step recurrence for decode)
and a dispatcher that uses fla's Triton kernels on CUDA when fla is installed. Packed rows (`cu_seqlens`,
ops/varlen.py) run through fla's varlen kernels in one call, or through a reference once per sequence.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hybridize.mixers.ops.backends import choose_mode, resolve_backend
from hybridize.mixers.ops.dtypes import compute_dtype
from hybridize.mixers.ops.varlen import check_packed_inputs, run_per_sequence


def recurrent_gla_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gk: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Step-by-step recurrence in fp32 (fp64 for fp64 inputs): the decode path and the ground truth for the
    chunked form."""
    batch, length, heads, key_dim = k.shape
    value_dim, out_dtype = v.shape[-1], v.dtype
    scale = key_dim**-0.5 if scale is None else scale
    dtype = compute_dtype(v)
    # (B, T, H, D) -> (B, H, T, D) in the compute dtype
    q, k, v, gk = (x.transpose(1, 2).to(dtype) for x in (q, k, v, gk))
    q = q * scale
    state = (
        q.new_zeros(batch, heads, key_dim, value_dim) if initial_state is None else initial_state.to(dtype)
    )
    outputs = []
    for t in range(length):
        state = state * gk[:, :, t, :, None].exp() + k[:, :, t, :, None] * v[:, :, t, None, :]
        outputs.append(torch.einsum("bhkv,bhk->bhv", state, q[:, :, t]))
    out = torch.stack(outputs, dim=2) if outputs else v.new_zeros(batch, heads, 0, value_dim)
    return out.transpose(1, 2).to(out_dtype), (state if output_final_state else None)


def chunk_gla_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gk: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = 16,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunked form in fp32 (fp64 for fp64 inputs), one loop step per chunk.

    Within a chunk with cumulative log decay G_i (per key dimension) and start state S0,
    o_i = (q_i * e^(G_i))^T S0 + sum_{j<=i} sum_k q_ik k_jk e^(G_ik - G_jk) v_j and the state leaves as
    e^(G_C) S0 + sum_j (k_j * e^(G_C - G_j)) v_j^T. Every exponent is <= 0: the usual factorisation
    (q e^G)(k e^-G)^T needs e^(-G), which overflows fp32 once a chunk decays by more than ~88 nats (strong
    gates, long chunks), so the intra-chunk scores keep the key dimension until the decay is applied.
    Memory is one chunk's (B, H, C, C, K) decay at a time.
    """
    batch, length, heads, key_dim = k.shape
    value_dim, out_dtype = v.shape[-1], v.dtype
    scale = key_dim**-0.5 if scale is None else scale
    pad = (-length) % chunk_size
    dtype = compute_dtype(v)
    # Zero padding at the end is an identity step on the state (k = 0 writes nothing, gk = 0 keeps it).
    q, k, v, gk = (F.pad(x.to(dtype), (0, 0, 0, 0, 0, pad)) for x in (q, k, v, gk))
    chunks = (length + pad) // chunk_size
    # (B, T, H, D) -> (B, H, N, C, D)
    q, k, v, gk = (x.transpose(1, 2).reshape(batch, heads, chunks, chunk_size, -1) for x in (q, k, v, gk))
    q = q * scale
    g = gk.cumsum(-2)  # G_i: log decay from the chunk start through token i
    causal = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=q.device).tril()[..., None]

    state = (
        q.new_zeros(batch, heads, key_dim, value_dim) if initial_state is None else initial_state.to(dtype)
    )
    outputs = []
    for n in range(chunks):
        q_n, k_n, v_n, g_n = q[:, :, n], k[:, :, n], v[:, :, n], g[:, :, n]  # (B, H, C, D)
        # (B, H, C, C, K): G_i - G_j, masked before exp since above the diagonal it is > 0 and may overflow
        decay = (g_n[:, :, :, None] - g_n[:, :, None]).masked_fill(~causal, float("-inf")).exp()
        scores = (q_n[:, :, :, None] * k_n[:, :, None] * decay).sum(-1)  # (B, H, C, C)
        outputs.append((q_n * g_n.exp()) @ state + scores @ v_n)
        last = g_n[:, :, -1:]  # (B, H, 1, K)
        state = state * last.transpose(-1, -2).exp() + (k_n * (last - g_n).exp()).transpose(-1, -2) @ v_n
    out = torch.stack(outputs, dim=2).reshape(batch, heads, chunks * chunk_size, value_dim)
    return out[:, :, :length].transpose(1, 2).to(out_dtype), (state if output_final_state else None)


def gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gk: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    backend: str = "auto",
    mode: str = "auto",
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run gated linear attention on the best available kernel.

    backend: "auto" (fla on CUDA when installed, else torch), "fla" or "torch".
    mode: "auto" (recurrent for short inputs without gradients, chunked otherwise), "chunk" or "recurrent".
    cu_seqlens: (N+1,) boundaries of N sequences packed in one row (batch 1), each scanned from an empty
    state: fla's varlen kernels in one call, the torch reference once per sequence.
    Returns the output in v's dtype and, if asked, the fp32 final state (B, H, K, V).
    """
    backend = resolve_backend(backend, q.device, "gla", kernels=("fla",))
    if cu_seqlens is not None:
        check_packed_inputs(cu_seqlens, q.shape[0], initial_state, output_final_state, "gla")
    length = q.shape[1]
    mode = choose_mode(mode, backend, length, q, k, v, gk)
    if initial_state is not None:
        initial_state = initial_state.to(compute_dtype(v))

    if backend == "fla":
        from fla.ops.gla import chunk_gla, fused_recurrent_gla

        # fla asserts an fp32 state; its chunk kernel names the decay `g`, the recurrent one `gk`.
        initial_state = None if initial_state is None else initial_state.float()
        kernel, decay = (chunk_gla, "g") if mode == "chunk" else (fused_recurrent_gla, "gk")
        out, state = kernel(
            q=q,
            k=k,
            v=v,
            **{decay: gk.float()},
            scale=scale,
            initial_state=initial_state,
            output_final_state=output_final_state,
            cu_seqlens=cu_seqlens,
        )
        return out.to(v.dtype), state

    reference = chunk_gla_torch if mode == "chunk" else recurrent_gla_torch
    if cu_seqlens is not None:
        return run_per_sequence(lambda *parts: reference(*parts, scale)[0], cu_seqlens, q, k, v, gk), None
    return reference(q, k, v, gk, scale, initial_state, output_final_state)

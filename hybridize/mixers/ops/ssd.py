"""Mamba-2's state space duality (SSD) scan: h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t^T, y_t = C_t . h_t + D x_t.

Layouts follow mamba-ssm's `mamba_chunk_scan_combined`: x (B, T, H, P); dt (B, T, H), already softplus'ed;
A (H), negative; Bm, Cm (B, T, G, N) with G dividing H (group g serves heads g*H/G .. (g+1)*H/G - 1); D (H).
The state is K-first like fla's, (B, H, N, P), in fp32 (fp64 for fp64 inputs); mamba-ssm keeps (B, H, P, N)
and its path transposes at the boundary.

SSD is fla's simple GLA (a scalar decay per head) under q = C, k = dt B, v = x, g = dt A, scale 1, plus the
D skip. The pure-PyTorch references are written in that form; the dispatcher uses mamba-ssm's or fla's
Triton kernels on CUDA when they are installed. Packed rows (`cu_seqlens`, ops/varlen.py) run in one call
through fla's varlen kernels or mamba-ssm's chunked scan (sequence ids, `seq_idx`), or through a reference
once per sequence.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hybridize.mixers.ops.backends import choose_mode, resolve_backend
from hybridize.mixers.ops.dtypes import compute_dtype
from hybridize.mixers.ops.gla import gla
from hybridize.mixers.ops.varlen import check_packed_inputs, run_per_sequence, sequence_ids

MAMBA_CHUNK_SIZE = 256  # mamba-ssm's Mamba2 default; its kernels are tuned for it


def _heads_from_groups(t: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, T, G, N) -> (B, T, H, N): each group's B or C is shared by H/G consecutive heads."""
    groups = t.shape[2]
    if heads % groups:
        raise ValueError(
            f"B and C have {groups} groups but x has {heads} heads; the number of groups must divide the heads."
        )
    return t.repeat_interleave(heads // groups, dim=2)


def _linear_attention_form(
    x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, Bm: torch.Tensor, Cm: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v (B, H, T, N|P) and the log decay g (B, H, T) in the compute dtype: q = C, k = dt B, v = x, g = dt A."""
    heads, dtype = x.shape[2], compute_dtype(x)
    dt = dt.to(dtype)
    q = _heads_from_groups(Cm.to(dtype), heads)
    k = _heads_from_groups(Bm.to(dtype), heads) * dt[..., None]
    g = dt * A.to(dtype)
    return q.transpose(1, 2), k.transpose(1, 2), x.to(dtype).transpose(1, 2), g.transpose(1, 2)


def _add_skip(y: torch.Tensor, x: torch.Tensor, D: torch.Tensor | None) -> torch.Tensor:
    """y + D x, per head; y (B, T, H, P) in the compute dtype."""
    return y if D is None else y + D.to(y.dtype)[:, None] * x.to(y.dtype)


def ssd_recurrent_torch(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    Bm: torch.Tensor,
    Cm: torch.Tensor,
    D: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Step-by-step recurrence: the decode path and the ground truth for the chunked form."""
    batch, length, heads, head_dim = x.shape
    q, k, v, g = _linear_attention_form(x, dt, A, Bm, Cm)
    state = (
        q.new_zeros(batch, heads, q.shape[-1], head_dim)
        if initial_state is None
        else initial_state.to(q.dtype)
    )
    outputs = []
    for t in range(length):
        state = state * g[:, :, t, None, None].exp() + k[:, :, t, :, None] * v[:, :, t, None, :]
        outputs.append(torch.einsum("bhnp,bhn->bhp", state, q[:, :, t]))
    y = torch.stack(outputs, dim=1) if outputs else v.new_zeros(batch, 0, heads, head_dim)  # (B, T, H, P)
    return _add_skip(y, x, D).to(x.dtype), (state if output_final_state else None)


def ssd_chunk_torch(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    Bm: torch.Tensor,
    Cm: torch.Tensor,
    D: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunked form: within a chunk the output is a decay-masked attention (batched matmuls over all chunks);
    the state crosses chunk boundaries in one loop step per chunk.

    With cumulative log decay G_i inside a chunk and start state S0:
    y_i = e^(G_i) C_i . S0 + sum_{j<=i} e^(G_i - G_j) (C_i . dt_j B_j) x_j, and the end state is
    e^(G_last) S0 + sum_j e^(G_last - G_j) dt_j B_j x_j^T.
    """
    batch, length, heads, head_dim = x.shape
    pad = (-length) % chunk_size
    # Zero padding at the end is an identity step on the state (dt = 0: no decay, nothing written).
    x, dt, Bm, Cm = (F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) for t in (x, dt, Bm, Cm))
    q, k, v, g = _linear_attention_form(x, dt, A, Bm, Cm)
    chunks = (length + pad) // chunk_size
    # (B, H, T, D) -> (B, H, Nc, C, D)
    q, k, v = (t.reshape(batch, heads, chunks, chunk_size, -1) for t in (q, k, v))
    g = g.reshape(batch, heads, chunks, chunk_size).cumsum(-1)

    causal = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=x.device).tril()
    # Mask before exp: above the diagonal G_i - G_j > 0 could overflow to inf and give inf * 0 = nan.
    decay = (g[..., :, None] - g[..., None, :]).masked_fill(~causal, float("-inf")).exp()  # (B, H, Nc, C, C)
    intra = ((q @ k.transpose(-1, -2)) * decay) @ v  # (B, H, Nc, C, P)
    q_decayed = q * g.exp()[..., None]
    k_decayed = k * (g[..., -1:] - g).exp()[..., None]

    state = (
        q.new_zeros(batch, heads, q.shape[-1], head_dim)
        if initial_state is None
        else initial_state.to(q.dtype)
    )
    outputs = []
    for n in range(chunks):
        outputs.append(intra[:, :, n] + q_decayed[:, :, n] @ state)
        state = state * g[:, :, n, -1, None, None].exp() + k_decayed[:, :, n].transpose(-1, -2) @ v[:, :, n]
    # (B, H, Nc, C, P) -> (B, T, H, P)
    y = torch.stack(outputs, dim=2).reshape(batch, heads, chunks * chunk_size, head_dim).transpose(1, 2)
    y = _add_skip(y[:, :length], x[:, :length], D)
    return y.to(x.dtype), (state if output_final_state else None)


def ssd(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    Bm: torch.Tensor,
    Cm: torch.Tensor,
    *,
    D: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    backend: str = "auto",
    mode: str = "auto",
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run the SSD scan on the best available kernel.

    backend: "auto" (mamba-ssm, then fla, on CUDA when installed; else torch), "mamba_ssm", "fla" or "torch".
    mode: "auto" (recurrent for short inputs without gradients, chunked otherwise), "chunk" or "recurrent".
    cu_seqlens: (N+1,) boundaries of N sequences packed in one row (batch 1), each scanned from an empty
    state: one kernel call (mamba-ssm's step kernel takes no boundaries, so its packed rows always run
    chunked), the torch reference once per sequence.
    Returns y in x's dtype and, if asked, the fp32 final state (B, H, N, P).
    """
    backend = resolve_backend(backend, x.device, "ssd", kernels=("mamba_ssm", "fla"))
    length = x.shape[1]
    if cu_seqlens is not None:
        check_packed_inputs(cu_seqlens, x.shape[0], initial_state, output_final_state, "ssd")
        if backend == "mamba_ssm":
            if mode == "recurrent":
                raise ValueError(
                    "ssd: mamba-ssm's step kernel takes no sequence boundaries (cu_seqlens); use mode='chunk' "
                    "or 'auto' for packed rows."
                )
            mode = "chunk"
    mode = choose_mode(mode, backend, length, x, dt, A, Bm, Cm)
    if initial_state is not None:
        initial_state = initial_state.to(compute_dtype(x))

    if backend == "mamba_ssm":
        return _ssd_mamba_ssm(x, dt, A, Bm, Cm, D, initial_state, output_final_state, mode, cu_seqlens)
    if backend == "fla":
        return _ssd_fla(x, dt, A, Bm, Cm, D, initial_state, output_final_state, mode, cu_seqlens)
    reference = ssd_chunk_torch if mode == "chunk" else ssd_recurrent_torch
    if cu_seqlens is not None:

        def scan(x, dt, Bm, Cm):  # one sequence; A and D are per head
            return reference(x, dt, A, Bm, Cm, D)[0]

        return run_per_sequence(scan, cu_seqlens, x, dt, Bm, Cm), None
    return reference(x, dt, A, Bm, Cm, D, initial_state, output_final_state)


def _ssd_mamba_ssm(x, dt, A, Bm, Cm, D, initial_state, output_final_state, mode, cu_seqlens):
    """mamba-ssm's kernels keep the state (B, H, P, N): transposed views at the boundary. Its chunked scan
    restarts the state where the sequence id of the next token (`seq_idx`, (1, T) int32) changes."""
    if mode == "chunk":
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

        if initial_state is not None:
            initial_state = (
                initial_state.float().transpose(-1, -2).contiguous()
            )  # (B, H, N, P) -> (B, H, P, N)
        result = mamba_chunk_scan_combined(
            x,
            dt.float(),
            A.float(),
            Bm.to(x.dtype),
            Cm.to(x.dtype),
            chunk_size=MAMBA_CHUNK_SIZE,
            D=D,
            initial_states=initial_state,
            seq_idx=None if cu_seqlens is None else sequence_ids(cu_seqlens, x.shape[1]).int()[None],
            return_final_states=output_final_state,
        )
        if not output_final_state:
            return result.to(x.dtype), None
        y, state = result
        return y.to(x.dtype), state.float().transpose(-1, -2).contiguous()

    from mamba_ssm.ops.triton.selective_state_update import selective_state_update

    batch, length, heads, head_dim = x.shape
    state_size = Bm.shape[-1]
    state = (
        x.new_zeros(batch, heads, state_size, head_dim, dtype=torch.float32)
        if initial_state is None
        else initial_state.float().clone()  # the kernel updates its state in place
    )
    # Per-head scalars as stride-0 views over the head dimension, the layout mamba-ssm's Mamba2.step passes
    # (its kernel reads dt_bias's strides even when dt is already final, so a zero bias goes in).
    A_hpn = A.float()[:, None, None].expand(heads, head_dim, state_size)
    D_hp = None if D is None else D[:, None].expand(heads, head_dim)
    zero_bias = dt.new_zeros(heads)[:, None].expand(heads, head_dim)
    outputs = [
        selective_state_update(
            state.transpose(-1, -2),  # (B, H, P, N) view of our (B, H, N, P) state
            x[:, t],
            dt[:, t, :, None].expand(batch, heads, head_dim),
            A_hpn,
            Bm[:, t],
            Cm[:, t],
            D=D_hp,
            dt_bias=zero_bias,
        )
        for t in range(length)
    ]
    y = torch.stack(outputs, dim=1)  # (B, T, H, P)
    return y.to(x.dtype), (state if output_final_state else None)


def fla_simple_gla_backward_broken() -> bool:
    """fla refuses simple GLA's backward on Hopper with Triton 3.4 to 3.7.0 (wrong gradients, fla issue
    #640), and its TileLang fallback does not take simple GLA's fp32 states."""
    from fla import utils

    return (
        getattr(utils, "IS_NVIDIA_HOPPER", False)
        and getattr(utils, "TRITON_ABOVE_3_4_0", False)
        and not getattr(utils, "TRITON_ABOVE_3_7_1", True)
    )


def _ssd_fla(x, dt, A, Bm, Cm, D, initial_state, output_final_state, mode, cu_seqlens):
    """fla's simple GLA under q = C, k = dt B (both expanded from groups to heads), v = x, g = dt A, scale 1.

    Where fla refuses simple GLA's backward (Hopper, Triton < 3.7.1) and gradients are needed, the same
    scan runs as GLA with the per-head decay broadcast over the key dimension: identical math, whose
    backward fla computes with its own (unaffected) kernels.
    """
    from fla.ops.simple_gla import chunk_simple_gla, fused_recurrent_simple_gla

    heads = x.shape[2]
    # The chunk kernels multiply in x's dtype on tensor cores; the recurrent one computes in fp32 whatever it
    # is given, so decode gets k = dt B unrounded.
    dtype = x.dtype if mode == "chunk" else compute_dtype(x)
    q = _heads_from_groups(Cm, heads).to(dtype)
    k = (_heads_from_groups(Bm, heads) * dt[..., None]).to(dtype)
    g = (dt * A).float()  # (B, T, H) log decay
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (x, dt, A, Bm, Cm))
    if mode == "chunk" and needs_grad and fla_simple_gla_backward_broken():
        gk = g[..., None].expand(*g.shape, q.shape[-1]).contiguous()  # (B, T, H, N)
        y, state = gla(
            q,
            k,
            x.to(dtype),
            gk,
            scale=1.0,
            initial_state=initial_state,
            output_final_state=output_final_state,
            backend="fla",
            mode="chunk",
            cu_seqlens=cu_seqlens,
        )
    else:
        kernel = chunk_simple_gla if mode == "chunk" else fused_recurrent_simple_gla
        y, state = kernel(
            q=q,
            k=k,
            v=x.to(dtype),
            g=g,
            scale=1.0,
            initial_state=None if initial_state is None else initial_state.float(),
            output_final_state=output_final_state,
            cu_seqlens=cu_seqlens,
        )
    return _add_skip(y.to(compute_dtype(x)), x, D).to(x.dtype), state

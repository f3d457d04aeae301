"""The gated delta rule: S_t = S_{t-1} a_t (I - b_t k_t k_t^T) + b_t v_t k_t^T, o_t = S_t^T q_t.

Layouts follow fla: q, k (B, T, H, K); v (B, T, H, V); g (log decay a_t = exp(g_t)) and beta (B, T, H);
the recurrent state is K-first (B, H, K, V) and always fp32.

Two pure-PyTorch references (a chunked WY form for prefill/training, a step-by-step recurrence for decode)
and a dispatcher that uses fla's Triton kernels on CUDA when fla is installed. Packed rows (`cu_seqlens`,
ops/varlen.py) run through fla's varlen kernels in one call, or through a reference once per sequence.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hybridize.mixers.ops.backends import choose_mode, resolve_backend
from hybridize.mixers.ops.dtypes import compute_dtype
from hybridize.mixers.ops.varlen import check_packed_inputs, run_per_sequence

L2NORM_EPS = 1e-6  # fla's l2norm epsilon


def l2norm(x: torch.Tensor) -> torch.Tensor:
    """Normalise the last dimension as fla's kernels do (x / sqrt(sum x^2 + eps))."""
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + L2NORM_EPS)


def gated_delta_rule_gates(
    a: torch.Tensor, b: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gated DeltaNet's log decay g = -exp(A_log) softplus(a + dt_bias) and write strength beta = sigmoid(b),
    in the compute dtype, from the raw projections a, b (B, T, H) and the per-head A_log, dt_bias (H,).
    a = b = -inf gives g = 0, beta = 0: a step that leaves the state as it was."""
    dtype = compute_dtype(a)
    g = -A_log.to(dtype).exp() * F.softplus(a.to(dtype) + dt_bias.to(dtype))
    return g, b.to(dtype).sigmoid()


def recurrent_gated_delta_rule_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Step-by-step recurrence in fp32 (fp64 for fp64 inputs): the decode path and the ground truth for the chunked form."""
    batch, length, heads, key_dim = k.shape
    value_dim = v.shape[-1]
    scale = key_dim**-0.5 if scale is None else scale
    dtype = compute_dtype(v)
    # (B, T, H, D) -> (B, H, T, D) in the compute dtype
    q, k, v = (x.transpose(1, 2).to(dtype) for x in (q, k, v))
    g, beta = (x.transpose(1, 2).to(dtype) for x in (g, beta))
    q = q * scale
    state = (
        q.new_zeros(batch, heads, key_dim, value_dim) if initial_state is None else initial_state.to(dtype)
    )
    outputs = []
    for t in range(length):
        state = state * g[:, :, t, None, None].exp()
        remembered = torch.einsum("bhkv,bhk->bhv", state, k[:, :, t])
        delta = (v[:, :, t] - remembered) * beta[:, :, t, None]
        state = state + k[:, :, t, :, None] * delta[:, :, None, :]
        outputs.append(torch.einsum("bhkv,bhk->bhv", state, q[:, :, t]))
    out = torch.stack(outputs, dim=2) if outputs else v.new_zeros(batch, heads, 0, value_dim)
    return out.transpose(1, 2), (state if output_final_state else None)


def chunk_gated_delta_rule_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunked (WY) form in fp32 (fp64 for fp64 inputs): intra-chunk work is batched matmuls, one loop step per chunk.

    Within a chunk with cumulative log decay G_i and start state S0, the new values
    U = (I + L)^-1 (beta V - beta e^G K S0), with L_ij = beta_i e^(G_i - G_j) k_i.k_j for j < i,
    give o_i = e^(G_i) S0^T q_i + sum_{j<=i} e^(G_i - G_j) (q_i.k_j) u_j.
    """
    batch, length, heads, key_dim = k.shape
    value_dim = v.shape[-1]
    scale = key_dim**-0.5 if scale is None else scale
    pad = (-length) % chunk_size
    dtype = compute_dtype(v)
    # Zero padding at the end is an identity step on the state (k = 0 writes nothing, g = 0 keeps it).
    q, k, v = (F.pad(x.to(dtype), (0, 0, 0, 0, 0, pad)) for x in (q, k, v))
    g, beta = (F.pad(x.to(dtype), (0, 0, 0, pad)) for x in (g, beta))
    chunks = (length + pad) // chunk_size
    # (B, T, H, D) -> (B, H, N, C, D)
    q, k, v = (x.transpose(1, 2).reshape(batch, heads, chunks, chunk_size, -1) for x in (q, k, v))
    g, beta = (x.transpose(1, 2).reshape(batch, heads, chunks, chunk_size) for x in (g, beta))
    q = q * scale

    g = g.cumsum(-1)
    causal = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=q.device).tril()
    # Mask before exp: above the diagonal G_i - G_j > 0 could overflow to inf and give inf * 0 = nan.
    decay = (g[..., :, None] - g[..., None, :]).masked_fill(~causal, float("-inf")).exp()  # (B, H, N, C, C)
    k_beta = k * beta[..., None]
    lower = (k_beta @ k.transpose(-1, -2) * decay).tril(-1)
    eye = torch.eye(chunk_size, dtype=q.dtype, device=q.device)
    inverse = torch.linalg.solve_triangular(
        eye + lower, eye.expand_as(lower), upper=False, unitriangular=True
    )
    u = inverse @ (v * beta[..., None])
    w = inverse @ (k_beta * g.exp()[..., None])
    scores = (q @ k.transpose(-1, -2)) * decay

    state = (
        q.new_zeros(batch, heads, key_dim, value_dim) if initial_state is None else initial_state.to(dtype)
    )
    outputs = []
    for n in range(chunks):
        g_n = g[:, :, n]
        new_values = u[:, :, n] - w[:, :, n] @ state
        outputs.append((q[:, :, n] * g_n.exp()[..., None]) @ state + scores[:, :, n] @ new_values)
        last = g_n[..., -1, None]
        state = (
            state * last[..., None].exp()
            + (k[:, :, n] * (last - g_n).exp()[..., None]).transpose(-1, -2) @ new_values
        )
    out = torch.stack(outputs, dim=2).reshape(batch, heads, chunks * chunk_size, value_dim)
    return out[:, :, :length].transpose(1, 2), (state if output_final_state else None)


@torch.library.custom_op("hybridize::fla_gated_delta_rule", mutates_args=())
def fla_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None,
    use_qk_l2norm: bool,
    chunked: bool,
    cu_seqlens: torch.Tensor | None = None,
    A_log: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """fla's chunked (prefill) or fused recurrent (decode) kernels without autograd, as an operator that
    torch.compile keeps whole: fla's Triton launches, and its chunked entry point marked
    `torch.compiler.disable`, would break a compiled model's graph at every layer. Returns the output and the
    fp32 final state (B, H, K, V), one per packed sequence (N, H, K, V) with cu_seqlens.

    With A_log and dt_bias (recurrent only), g and beta are the raw projections a and b, and the kernel
    computes `gated_delta_rule_gates` itself."""
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule

    kernel = chunk_gated_delta_rule if chunked else fused_recurrent_gated_delta_rule
    gates = {}
    if A_log is not None:
        gates = dict(use_gate_in_kernel=True, A_log=A_log, dt_bias=dt_bias, use_beta_sigmoid_in_kernel=True)
    return kernel(
        q=q,
        k=k,
        v=v,
        g=g,
        beta=beta,
        scale=scale,
        initial_state=initial_state,
        output_final_state=True,
        use_qk_l2norm_in_kernel=use_qk_l2norm,
        cu_seqlens=cu_seqlens,
        **gates,
    )


@fla_gated_delta_rule.register_fake
def _(
    q, k, v, g, beta, scale, initial_state, use_qk_l2norm, chunked, cu_seqlens=None, A_log=None, dt_bias=None
):
    batch, _, heads, value_dim = v.shape  # fla returns a new contiguous output, whatever v's strides
    batch = batch if cu_seqlens is None else cu_seqlens.shape[0] - 1
    # in q's dtype from the chunked kernels, in v's from the recurrent one
    out = (q if chunked else v).new_empty(v.shape)
    return out, v.new_empty(batch, heads, k.shape[-1], value_dim, dtype=torch.float32)


def gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm: bool = True,
    backend: str = "auto",
    mode: str = "auto",
    cu_seqlens: torch.Tensor | None = None,
    gate_params: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run the gated delta rule on the best available kernel.

    backend: "auto" (fla on CUDA when installed, else torch), "fla" or "torch".
    mode: "auto" (recurrent for short inputs without gradients, chunked otherwise), "chunk" or "recurrent".
    cu_seqlens: (N+1,) boundaries of N sequences packed in one row (batch 1), each scanned from an empty
    state: fla's varlen kernels in one call, the torch reference once per sequence.
    gate_params: (A_log, dt_bias) (H,): g and beta are then Gated DeltaNet's raw projections a and b, turned
    into the decay and write strength (`gated_delta_rule_gates`) inside fla's fused recurrent kernel (decode:
    no separate gate kernels), before the scan elsewhere.
    Returns the output in v's dtype and, if asked, the fp32 final state (B, H, K, V).
    """
    backend = resolve_backend(backend, q.device, "gated_delta_rule")
    if cu_seqlens is not None:
        check_packed_inputs(cu_seqlens, q.shape[0], initial_state, output_final_state, "gated_delta_rule")
    length = q.shape[1]
    tensors = (q, k, v, g, beta, *(gate_params or ()))
    mode = choose_mode(mode, backend, length, *tensors)
    if initial_state is not None:
        initial_state = initial_state.to(compute_dtype(v))

    needs_grad = torch.is_grad_enabled() and any(
        x.requires_grad for x in (*tensors, initial_state) if x is not None
    )
    # fla's fused recurrent kernel computes the gates itself (a decode step without gradients); else they come first
    in_kernel = gate_params is not None and backend == "fla" and mode == "recurrent" and not needs_grad
    if gate_params is not None and not in_kernel:
        g, beta = gated_delta_rule_gates(g, beta, *gate_params)
    if backend == "fla" and (mode == "recurrent" or not needs_grad):
        # fla's kernels copy strided inputs (the mixer's q, k, v are views of one convolution's output) in
        # launches of their own; made contiguous here, torch.compile writes them so in the kernels that make them
        out, state = fla_gated_delta_rule(
            q.contiguous(),
            k.contiguous(),
            v.contiguous(),
            g.contiguous() if in_kernel else g.float(),
            beta.contiguous() if in_kernel else beta.to(q.dtype),
            k.shape[-1] ** -0.5 if scale is None else scale,
            None if initial_state is None else initial_state.float(),
            use_qk_l2norm,
            chunked=mode == "chunk",
            cu_seqlens=cu_seqlens,
            A_log=gate_params[0] if in_kernel else None,
            dt_bias=gate_params[1] if in_kernel else None,
        )
        return out.to(v.dtype), (state if output_final_state else None)
    if backend == "fla":
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule

        out, state = chunk_gated_delta_rule(
            q=q,
            k=k,
            v=v,
            g=g.float(),
            beta=beta.to(q.dtype),
            scale=scale,
            initial_state=None if initial_state is None else initial_state.float(),
            output_final_state=output_final_state,
            use_qk_l2norm_in_kernel=use_qk_l2norm,
            cu_seqlens=cu_seqlens,
        )
        return out.to(v.dtype), state

    if use_qk_l2norm:
        q, k = l2norm(q.to(compute_dtype(q))), l2norm(k.to(compute_dtype(k)))
    reference = chunk_gated_delta_rule_torch if mode == "chunk" else recurrent_gated_delta_rule_torch
    if cu_seqlens is not None:
        out = run_per_sequence(lambda *parts: reference(*parts, scale)[0], cu_seqlens, q, k, v, g, beta)
        return out.to(v.dtype), None
    out, state = reference(q, k, v, g, beta, scale, initial_state, output_final_state)
    return out.to(v.dtype), state

"""The gated delta rule's PyTorch references against each other and against independent implementations."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from transformers.models.qwen3_next import modeling_qwen3_next

from hybridize.mixers.ops import (
    chunk_gated_delta_rule_torch,
    gated_delta_rule,
    gated_delta_rule_gates,
    l2norm,
    recurrent_gated_delta_rule_torch,
)
from tests.conftest import fla_naive_module, needs_cuda, relative_rms

SHAPES = [  # (batch, length, heads, key_dim, value_dim, chunk_size)
    (2, 100, 3, 16, 32, 16),  # length not a multiple of the chunk
    (1, 64, 2, 8, 8, 64),  # exactly one chunk
    (2, 1, 2, 8, 16, 64),  # a single token
    (1, 130, 2, 32, 16, 32),
]


def random_inputs(batch, length, heads, key_dim, value_dim, seed=0, requires_grad=False):
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float32)

    q = l2norm(randn(batch, length, heads, key_dim))
    k = l2norm(randn(batch, length, heads, key_dim))
    v = randn(batch, length, heads, value_dim)
    g = torch.nn.functional.logsigmoid(randn(batch, length, heads) + 3)
    beta = randn(batch, length, heads).sigmoid()
    state = randn(batch, heads, key_dim, value_dim)
    tensors = [q, k, v, g, beta, state]
    return [t.requires_grad_(requires_grad) for t in tensors]


@pytest.mark.parametrize("shape", SHAPES)
def test_chunked_equals_recurrent_with_initial_state(shape):
    *dims, chunk_size = shape
    q, k, v, g, beta, state = random_inputs(*dims)
    out_r, state_r = recurrent_gated_delta_rule_torch(
        q, k, v, g, beta, initial_state=state, output_final_state=True
    )
    out_c, state_c = chunk_gated_delta_rule_torch(
        q, k, v, g, beta, initial_state=state, output_final_state=True, chunk_size=chunk_size
    )
    assert relative_rms(out_r, out_c) < 1e-5
    assert relative_rms(state_r, state_c) < 1e-5
    torch.testing.assert_close(out_c, out_r, rtol=1e-5, atol=1e-5)


def test_state_carries_across_calls():
    q, k, v, g, beta, _ = random_inputs(2, 90, 2, 16, 16, seed=1)
    whole, whole_state = chunk_gated_delta_rule_torch(
        q, k, v, g, beta, output_final_state=True, chunk_size=16
    )
    first, state = chunk_gated_delta_rule_torch(
        q[:, :37], k[:, :37], v[:, :37], g[:, :37], beta[:, :37], output_final_state=True, chunk_size=16
    )
    second, final = chunk_gated_delta_rule_torch(
        q[:, 37:], k[:, 37:], v[:, 37:], g[:, 37:], beta[:, 37:], initial_state=state, output_final_state=True
    )
    assert relative_rms(whole, torch.cat([first, second], dim=1)) < 1e-5
    assert relative_rms(whole_state, final) < 1e-5


def test_gradients_of_chunked_and_recurrent_forms_agree():
    inputs = random_inputs(1, 40, 2, 8, 8, seed=2, requires_grad=True)
    grads = []
    for reference in (recurrent_gated_delta_rule_torch, chunk_gated_delta_rule_torch):
        out, state = reference(*inputs[:5], initial_state=inputs[5], output_final_state=True)
        (out.pow(2).sum() + state.pow(2).sum()).backward()
        grads.append([t.grad.clone() for t in inputs])
        for t in inputs:
            t.grad = None
    for recurrent_grad, chunk_grad in zip(*grads, strict=True):
        assert recurrent_grad.abs().sum() > 0
        assert relative_rms(recurrent_grad, chunk_grad) < 1e-5


@pytest.mark.skipif(
    importlib.util.find_spec("fla") is not None,
    reason="with fla installed transformers routes its torch reference through fla's Triton kernels",
)
@pytest.mark.parametrize("shape", SHAPES[:2])
def test_matches_transformers_torch_reference(shape):
    *dims, _ = shape
    q, k, v, g, beta, state = random_inputs(*dims, seed=3)
    expected, expected_state = modeling_qwen3_next.torch_recurrent_gated_delta_rule(
        q, k, v, g, beta, initial_state=state, output_final_state=True
    )
    ours, ours_state = chunk_gated_delta_rule_torch(
        q, k, v, g, beta, initial_state=state, output_final_state=True
    )
    assert relative_rms(expected, ours) < 1e-5
    assert relative_rms(expected_state, ours_state) < 1e-5


@pytest.mark.parametrize("shape", SHAPES)
def test_matches_fla_naive_references(shape):
    naive = fla_naive_module("gated_delta_rule")
    *dims, chunk_size = shape
    q, k, v, g, beta, state = random_inputs(*dims, seed=4)
    ours, ours_state = chunk_gated_delta_rule_torch(
        q, k, v, g, beta, initial_state=state, output_final_state=True, chunk_size=chunk_size
    )
    # fla's two references take beta and g in opposite orders.
    expected, expected_state = naive.naive_recurrent_gated_delta_rule(
        q, k, v, beta, g, initial_state=state, output_final_state=True
    )
    assert relative_rms(expected, ours) < 1e-5
    assert relative_rms(expected_state, ours_state) < 1e-5
    if dims[1] % 64 == 0:
        expected_chunk, _ = naive.naive_chunk_gated_delta_rule(q, k, v, g, beta, initial_state=state)
        assert relative_rms(expected_chunk, ours) < 1e-4


def test_dispatcher_normalises_and_picks_modes():
    q, k, v, g, beta, state = random_inputs(1, 20, 2, 8, 8, seed=5)
    raw_q, raw_k = q * 3.0, k * 0.5  # l2norm inside the dispatcher undoes the scaling
    expected, _ = recurrent_gated_delta_rule_torch(q, k, v, g, beta, initial_state=state)
    for mode in ("auto", "chunk", "recurrent"):
        out, _ = gated_delta_rule(raw_q, raw_k, v, g, beta, initial_state=state, backend="torch", mode=mode)
        assert relative_rms(expected, out) < 1e-5
    with pytest.raises(ValueError, match="mode"):
        gated_delta_rule(q, k, v, g, beta, mode="parallel")
    with pytest.raises(RuntimeError, match="hybridize\\[cuda\\]"):
        gated_delta_rule(q, k, v, g, beta, backend="fla")


def raw_gates(batch, length, heads, seed=0):
    """Gated DeltaNet's raw decay and write projections a, b (B, T, H), as views of one fused projection
    (not contiguous), and its per-head A_log, dt_bias (H,)."""
    generator = torch.Generator().manual_seed(seed)
    projection = torch.randn(batch, length, 3 * heads, generator=generator)
    a, b = projection[..., :heads], projection[..., heads : 2 * heads]
    return a, b, torch.randn(heads, generator=generator), torch.randn(heads, generator=generator)


@pytest.mark.parametrize("mode", ["chunk", "recurrent"])
def test_raw_gates_give_the_explicit_gates_and_minus_inf_is_no_step(mode):
    q, k, v, _, _, state = random_inputs(2, 9, 3, 8, 16, seed=6)
    a, b, A_log, dt_bias = raw_gates(2, 9, 3)
    g, beta = gated_delta_rule_gates(a, b, A_log, dt_bias)
    assert (g < 0).all() and ((beta > 0) & (beta < 1)).all()
    common = dict(initial_state=state, output_final_state=True, backend="torch", mode=mode)
    expected, expected_state = gated_delta_rule(q, k, v, g, beta, **common)
    out, final = gated_delta_rule(q, k, v, a, b, gate_params=(A_log, dt_bias), **common)
    assert relative_rms(expected, out) < 1e-6 and relative_rms(expected_state, final) < 1e-6

    # a = b = -inf at position 4 (padding): decay 0, write 0, so the state is as if it were not there
    skip = torch.arange(9) != 4
    padded_a, padded_b = (x.masked_fill(~skip[:, None], float("-inf")) for x in (a, b))
    out, final = gated_delta_rule(q, k, v, padded_a, padded_b, gate_params=(A_log, dt_bias), **common)
    kept = (x[:, skip] for x in (q, k, v, a, b))
    without, without_state = gated_delta_rule(*kept, gate_params=(A_log, dt_bias), **common)
    assert relative_rms(without, out[:, skip]) < 1e-6 and relative_rms(without_state, final) < 1e-6


@needs_cuda("fla's kernels need CUDA", fla=True)
def test_fla_decode_step_computes_the_gates_in_its_kernel():
    """Raw gates go into fla's fused recurrent kernel (no gate kernels of their own), inside one compiled
    graph, with fla's tolerances against the fp32 reference; when A_log wants a gradient, the autograd path
    runs instead of the kernel that has none."""
    q, k, v, _, _, state = (t.cuda() for t in random_inputs(2, 1, 4, 64, 64, seed=7))
    a, b, A_log, dt_bias = (t.cuda() for t in raw_gates(2, 1, 4))
    q, k, v, a, b = (t.to(torch.bfloat16) for t in (q, k, v, a, b))

    def run(q, k, v, a, b, A_log, backend):
        return gated_delta_rule(
            q,
            k,
            v,
            a,
            b,
            gate_params=(A_log, dt_bias),
            initial_state=state,
            output_final_state=True,
            backend=backend,
        )

    with torch.no_grad():
        expected, expected_state = run(q.float(), k.float(), v.float(), a.float(), b.float(), A_log, "torch")
        compiled = torch.compile(run, fullgraph=True, backend="aot_eager")
        for out, final in (run(q, k, v, a, b, A_log, "fla"), compiled(q, k, v, a, b, A_log, "fla")):
            assert relative_rms(expected, out) < 0.005 and relative_rms(expected_state, final) < 0.005
    trained = A_log.clone().requires_grad_()
    out, _ = run(q, k, v, a, b, trained, "fla")
    out.float().square().sum().backward()
    assert trained.grad is not None and trained.grad.isfinite().all() and trained.grad.abs().sum() > 0


@needs_cuda("fla's kernels need CUDA", fla=True)
@pytest.mark.parametrize("mode", ["chunk", "recurrent"])
def test_fla_kernels_without_gradients_compile_whole_and_match_the_reference(mode):
    """Inference calls go through custom operators: torch.compile keeps them in one graph (fla's own entry
    points are `torch.compiler.disable`d), with fla's forward tolerances against the fp32 reference."""
    q, k, v, g, beta, state = (t.cuda() for t in random_inputs(2, 300 if mode == "chunk" else 1, 4, 64, 64))
    q, k, v = (t.to(torch.bfloat16) for t in (q, k, v))

    def run(q, k, v, g, beta, state, backend):
        out, final = gated_delta_rule(
            q, k, v, g, beta, initial_state=state, output_final_state=True, backend=backend, mode=mode
        )
        return out * 2, final

    with torch.no_grad():
        expected, expected_state = run(q.float(), k.float(), v.float(), g, beta, state, "torch")
        compiled = torch.compile(run, fullgraph=True, backend="aot_eager")  # fails on a graph break
        for out, final in (run(q, k, v, g, beta, state, "fla"), compiled(q, k, v, g, beta, state, "fla")):
            assert relative_rms(expected, out) < 0.005 and relative_rms(expected_state, final) < 0.005


@pytest.mark.parametrize("mode", ["chunk", "recurrent"])
def test_fla_operator_gets_contiguous_inputs(mode, monkeypatch):
    """The mixer's q, k, v are views of one convolution's output: they reach fla's operator contiguous (under
    torch.compile, written so by the kernels that compute them, rather than copied by fla in launches of its own)."""
    ops = importlib.import_module("hybridize.mixers.ops.gated_delta_rule")  # the module, not its function
    seen = []

    def operator(q, k, v, g, beta, *args, **kwargs):
        seen.extend(t.is_contiguous() for t in (q, k, v, g, beta))
        return torch.zeros_like(v), v.new_zeros(v.shape[0], v.shape[2], k.shape[-1], v.shape[-1])

    monkeypatch.setattr(ops, "resolve_backend", lambda *args: "fla")
    monkeypatch.setattr(ops, "fla_gated_delta_rule", operator)
    q, k, v, g, beta, _ = random_inputs(1, 5, 2, 8, 8)
    qkv = torch.cat([q, k, v], dim=-1)  # one projection's output, split: strided views
    a, b = torch.randn(2, 1, 5, 2).unbind(0)
    with torch.no_grad():
        gated_delta_rule(*qkv.split(8, dim=-1), g, beta, mode=mode)
        gated_delta_rule(*qkv.split(8, dim=-1), a, b, mode=mode, gate_params=(torch.zeros(2), torch.zeros(2)))
    assert len(seen) == 10 and all(seen)


def test_auto_mode_runs_fla_recurrent_up_to_its_limit(monkeypatch):
    """ "auto": fla's fused recurrent kernel up to FLA_RECURRENT_MAX_TOKENS tokens without gradients, chunked above
    or with gradients; torch's recurrent form only for one token."""
    from hybridize.mixers.ops import backends

    x = torch.zeros(1)
    assert [backends.choose_mode("auto", "fla", n, x) for n in (1, 64, 65)] == [
        "recurrent",
        "recurrent",
        "chunk",
    ]
    assert [backends.choose_mode("auto", "torch", n, x) for n in (1, 2)] == ["recurrent", "chunk"]
    monkeypatch.setattr(backends, "FLA_RECURRENT_MAX_TOKENS", 258)  # a frame's prefill
    assert backends.choose_mode("auto", "fla", 258, x) == "recurrent"
    assert backends.choose_mode("auto", "fla", 258, x.requires_grad_()) == "chunk"

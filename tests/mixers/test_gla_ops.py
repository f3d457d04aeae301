"""Gated linear attention's PyTorch references against each other, against fla's naive reference, and fla's
kernels against them on a GPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hybridize.mixers.ops.gla import chunk_gla_torch, gla, recurrent_gla_torch
from tests.conftest import fla_naive_module, needs_cuda, relative_rms

SHAPES = [  # (batch, length, heads, key_dim, value_dim, chunk_size)
    (2, 100, 3, 16, 32, 16),  # length not a multiple of the chunk
    (1, 64, 2, 8, 8, 64),  # exactly one chunk
    (2, 1, 2, 8, 16, 16),  # a single token
    (1, 130, 2, 32, 16, 32),
]


def random_inputs(
    batch, length, heads, key_dim, value_dim, seed=0, gate_shift=0.0, dtype=torch.float32, device="cpu"
):
    """q, k, v, gk, initial state. gk = logsigmoid(x + gate_shift): a negative shift gives strong decays."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)

    q, k = randn(batch, length, heads, key_dim), randn(batch, length, heads, key_dim)
    v = randn(batch, length, heads, value_dim)
    gk = F.logsigmoid(randn(batch, length, heads, key_dim) + gate_shift)
    state = randn(batch, heads, key_dim, value_dim).float()
    return q, k, v, gk, state


@pytest.mark.parametrize("gate_shift", [0.0, -3.0])
@pytest.mark.parametrize("shape", SHAPES)
def test_chunked_equals_recurrent_with_initial_state(shape, gate_shift):
    *dims, chunk_size = shape
    q, k, v, gk, state = random_inputs(*dims, gate_shift=gate_shift)
    out_r, state_r = recurrent_gla_torch(q, k, v, gk, initial_state=state, output_final_state=True)
    out_c, state_c = chunk_gla_torch(
        q, k, v, gk, initial_state=state, output_final_state=True, chunk_size=chunk_size
    )
    assert relative_rms(out_r, out_c) < 1e-5
    assert relative_rms(state_r, state_c) < 1e-5
    assert state_c.dtype == torch.float32 and out_c.dtype == v.dtype


def test_chunked_form_is_stable_where_a_chunk_decays_past_fp32_range():
    # About -10 nats per step: a 64-token chunk decays by ~640 nats, and e^640 overflows fp32.
    q, k, v, gk, state = random_inputs(1, 128, 2, 16, 16, seed=1, gate_shift=-10.0)
    out_r, state_r = recurrent_gla_torch(q, k, v, gk, initial_state=state, output_final_state=True)
    out_c, state_c = chunk_gla_torch(q, k, v, gk, initial_state=state, output_final_state=True, chunk_size=64)
    assert torch.isfinite(out_c).all() and torch.isfinite(state_c).all()
    assert relative_rms(out_r, out_c) < 1e-5
    assert relative_rms(state_r, state_c) < 1e-5


def test_state_carries_across_calls():
    q, k, v, gk, _ = random_inputs(2, 90, 2, 16, 16, seed=2)
    whole, whole_state = chunk_gla_torch(q, k, v, gk, output_final_state=True)
    first, state = chunk_gla_torch(q[:, :37], k[:, :37], v[:, :37], gk[:, :37], output_final_state=True)
    second, final = chunk_gla_torch(
        q[:, 37:], k[:, 37:], v[:, 37:], gk[:, 37:], initial_state=state, output_final_state=True
    )
    assert relative_rms(whole, torch.cat([first, second], dim=1)) < 1e-5
    assert relative_rms(whole_state, final) < 1e-5


def test_gradients_of_chunked_and_recurrent_forms_agree():
    inputs = [t.requires_grad_() for t in random_inputs(1, 40, 2, 8, 8, seed=3)]
    grads = []
    for reference in (recurrent_gla_torch, chunk_gla_torch):
        out, state = reference(*inputs[:4], initial_state=inputs[4], output_final_state=True)
        (out.pow(2).sum() + state.pow(2).sum()).backward()
        grads.append([t.grad.clone() for t in inputs])
        for t in inputs:
            t.grad = None
    for recurrent_grad, chunk_grad in zip(*grads, strict=True):
        assert recurrent_grad.abs().sum() > 0
        assert relative_rms(recurrent_grad, chunk_grad) < 1e-5


@pytest.mark.parametrize("shape", SHAPES)
def test_matches_fla_naive_reference(shape):
    naive = fla_naive_module("gla")
    *dims, chunk_size = shape
    q, k, v, gk, state = random_inputs(*dims, seed=4, gate_shift=-1.0)
    # fla's reference: scale K^-0.5, K-first fp32 state, output in q's dtype.
    expected, expected_state = naive.naive_recurrent_gla(
        q, k, v, gk, initial_state=state, output_final_state=True
    )
    for ours, ours_state in (
        recurrent_gla_torch(q, k, v, gk, initial_state=state, output_final_state=True),
        chunk_gla_torch(q, k, v, gk, initial_state=state, output_final_state=True, chunk_size=chunk_size),
    ):
        assert relative_rms(expected, ours) < 1e-5
        assert relative_rms(expected_state, ours_state) < 1e-5


def test_dispatcher_picks_modes_and_keeps_dtypes():
    q, k, v, gk, state = random_inputs(1, 20, 2, 8, 8, seed=5)
    expected, _ = recurrent_gla_torch(q, k, v, gk, scale=0.3, initial_state=state)
    for mode in ("auto", "chunk", "recurrent"):
        out, _ = gla(q, k, v, gk, scale=0.3, initial_state=state, backend="torch", mode=mode)
        assert relative_rms(expected, out) < 1e-5
        # bf16 in: bf16 out, fp32 state; fp64 in: fp64 throughout (exactness tests)
        out, final = gla(*(t.bfloat16() for t in (q, k, v)), gk, output_final_state=True, mode=mode)
        assert out.dtype == torch.bfloat16 and final.dtype == torch.float32
        out, final = gla(*(t.double() for t in (q, k, v, gk)), output_final_state=True, mode=mode)
        assert out.dtype == final.dtype == torch.float64
    with pytest.raises(ValueError, match="mode"):
        gla(q, k, v, gk, mode="parallel")
    with pytest.raises(RuntimeError, match="hybridize\\[cuda\\]"):
        gla(q, k, v, gk, backend="fla")


@needs_cuda("needs a CUDA device and fla", fla=True)
@pytest.mark.parametrize("mode, forward_tolerance", [("chunk", 0.005), ("recurrent", 0.002)])
def test_fla_kernels_match_the_torch_reference_in_bf16(mode, forward_tolerance):
    # fla's own kernel-test tolerances (relative RMS), fla's test gate logsigmoid(N(0, 1)).
    q, k, v, gk, state = random_inputs(2, 1000, 4, 64, 64, seed=6, dtype=torch.bfloat16, device="cuda")
    gk, state = gk.float(), state.cuda()
    inputs = [t.requires_grad_() for t in (q, k, v, gk)]
    upstream = torch.randn_like(v)

    out, final = gla(*inputs, initial_state=state, output_final_state=True, backend="fla", mode=mode)
    (out * upstream).sum().backward()
    fp32 = [t.detach().float().requires_grad_() for t in inputs]
    ref, ref_final = chunk_gla_torch(*fp32, initial_state=state, output_final_state=True)
    (ref * upstream.float()).sum().backward()

    assert relative_rms(ref, out) < forward_tolerance
    assert relative_rms(ref_final, final) < forward_tolerance
    for name, ours, theirs, tolerance in zip(
        ("dq", "dk", "dv", "dgk"), fp32, inputs, (0.008, 0.008, 0.008, 0.02), strict=True
    ):
        assert relative_rms(ours.grad, theirs.grad) < tolerance, name

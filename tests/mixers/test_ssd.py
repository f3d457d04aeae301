"""The SSD scan's PyTorch references against each other, against fla and transformers, and the GPU kernels."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F
from transformers.models.mamba2 import modeling_mamba2

from hybridize.mixers.ops.backends import library_available
from hybridize.mixers.ops.ssd import ssd, ssd_chunk_torch, ssd_recurrent_torch
from tests.conftest import fla_naive_module, needs_cuda, relative_rms

SHAPES = [  # (batch, length, heads, groups, head_dim, state_size, chunk_size)
    (2, 100, 4, 2, 16, 8, 16),  # length not a multiple of the chunk, two heads per group
    (1, 64, 2, 2, 8, 8, 64),  # exactly one chunk
    (2, 1, 2, 1, 8, 16, 64),  # a single token, one group for all heads
    (1, 130, 3, 3, 16, 32, 32),
]


def random_inputs(batch, length, heads, groups, head_dim, state_size, seed=0, requires_grad=False):
    """x, dt (softplus'ed), A (negative), B, C, D and an initial state, as the mixer produces them."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float32)

    x = randn(batch, length, heads, head_dim)
    dt = F.softplus(randn(batch, length, heads) - 2)
    A = -torch.empty(heads).uniform_(1, 8, generator=generator)
    Bm = randn(batch, length, groups, state_size)
    Cm = randn(batch, length, groups, state_size)
    D = randn(heads)
    state = randn(batch, heads, state_size, head_dim)
    tensors = [x, dt, A, Bm, Cm, D, state]
    return [t.requires_grad_(requires_grad) for t in tensors]


def linear_attention_form(x, dt, A, Bm, Cm):
    """SSD as simple GLA: q = C, k = dt B (groups expanded to heads), v = x, g = dt A."""
    repeat = x.shape[2] // Bm.shape[2]
    q = Cm.repeat_interleave(repeat, dim=2)
    k = Bm.repeat_interleave(repeat, dim=2) * dt[..., None]
    return q, k, x, dt * A


@pytest.mark.parametrize("shape", SHAPES)
def test_chunked_equals_recurrent_with_initial_state(shape):
    *dims, chunk_size = shape
    x, dt, A, Bm, Cm, D, state = random_inputs(*dims)
    out_r, state_r = ssd_recurrent_torch(x, dt, A, Bm, Cm, D, initial_state=state, output_final_state=True)
    out_c, state_c = ssd_chunk_torch(
        x, dt, A, Bm, Cm, D, initial_state=state, output_final_state=True, chunk_size=chunk_size
    )
    assert out_c.shape == x.shape and state_c.shape == state.shape and state_c.dtype == torch.float32
    assert relative_rms(out_r, out_c) < 1e-5
    assert relative_rms(state_r, state_c) < 1e-5


def test_references_keep_fp64():
    x, dt, A, Bm, Cm, D, state = (t.double() for t in random_inputs(1, 20, 2, 1, 4, 4, seed=6))
    for reference in (ssd_recurrent_torch, ssd_chunk_torch):
        out, final = reference(x, dt, A, Bm, Cm, D, initial_state=state, output_final_state=True)
        assert out.dtype == final.dtype == torch.float64


def test_state_carries_across_calls():
    x, dt, A, Bm, Cm, D, _ = random_inputs(2, 90, 4, 2, 8, 8, seed=1)
    whole, whole_state = ssd_chunk_torch(x, dt, A, Bm, Cm, D, output_final_state=True, chunk_size=16)
    first, state = ssd_chunk_torch(
        x[:, :37], dt[:, :37], A, Bm[:, :37], Cm[:, :37], D, output_final_state=True, chunk_size=16
    )
    second, final = ssd_recurrent_torch(
        x[:, 37:], dt[:, 37:], A, Bm[:, 37:], Cm[:, 37:], D, initial_state=state, output_final_state=True
    )
    assert relative_rms(whole, torch.cat([first, second], dim=1)) < 1e-5
    assert relative_rms(whole_state, final) < 1e-5


def test_gradients_of_chunked_and_recurrent_forms_agree():
    inputs = random_inputs(1, 40, 4, 2, 8, 8, seed=2, requires_grad=True)
    grads = []
    for reference in (ssd_recurrent_torch, lambda *a, **k: ssd_chunk_torch(*a, **k, chunk_size=16)):
        out, state = reference(*inputs[:6], initial_state=inputs[6], output_final_state=True)
        (out.pow(2).sum() + state.pow(2).sum()).backward()
        grads.append([t.grad.clone() for t in inputs])
        for t in inputs:
            t.grad = None
    for recurrent_grad, chunk_grad in zip(*grads, strict=True):
        assert recurrent_grad.abs().sum() > 0
        assert relative_rms(recurrent_grad, chunk_grad) < 1e-5


@pytest.mark.parametrize("shape", SHAPES)
def test_is_fla_simple_gla_under_the_mapping(shape):
    """The mapping the fla backend relies on, checked against fla's own references (fp32, D = 0)."""
    naive = fla_naive_module("simple_gla")
    *dims, chunk_size = shape
    x, dt, A, Bm, Cm, _, state = random_inputs(*dims, seed=4)
    ours, ours_state = ssd_chunk_torch(
        x, dt, A, Bm, Cm, initial_state=state, output_final_state=True, chunk_size=chunk_size
    )
    q, k, v, g = linear_attention_form(x, dt, A, Bm, Cm)
    # fla's references take (q, k, v, g, scale, initial_state, ...) and (q, k, v, g, initial_state, ..., scale).
    expected, expected_state = naive.naive_recurrent_simple_gla(
        q, k, v, g, scale=1.0, initial_state=state, output_final_state=True
    )
    assert relative_rms(expected, ours) < 1e-5
    assert relative_rms(expected_state, ours_state) < 1e-5
    expected_chunk, expected_chunk_state = naive.naive_chunk_simple_gla(
        q, k, v, g, initial_state=state, output_final_state=True, chunk_size=chunk_size, scale=1.0
    )
    assert relative_rms(expected_chunk, ours) < 1e-5
    assert relative_rms(expected_chunk_state, ours_state) < 1e-5


@pytest.mark.skipif(
    importlib.util.find_spec("mamba_ssm") is not None,
    reason="with mamba_ssm installed transformers routes its torch reference through mamba-ssm's kernels",
)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_transformers_torch_reference(shape):
    """transformers' Mamba2 scan (its own segment-sum SSD, state (B, H, P, N)) is an independent reference."""
    *dims, chunk_size = shape
    x, dt, A, Bm, Cm, D, state = random_inputs(*dims, seed=3)
    expected, expected_state = modeling_mamba2.mamba2_chunk_scan(
        x,
        dt,
        A,
        Bm,
        Cm,
        chunk_size=chunk_size,
        D=D,
        initial_states=state.transpose(-1, -2),
        return_final_states=True,
    )
    ours, ours_state = ssd_chunk_torch(
        x, dt, A, Bm, Cm, D, initial_state=state, output_final_state=True, chunk_size=chunk_size
    )
    assert relative_rms(expected, ours) < 1e-5
    assert relative_rms(expected_state.transpose(-1, -2), ours_state) < 1e-5


def test_dispatcher_picks_modes_and_checks_arguments():
    x, dt, A, Bm, Cm, D, state = random_inputs(1, 20, 4, 2, 8, 8, seed=5)
    expected, _ = ssd_recurrent_torch(x, dt, A, Bm, Cm, D, initial_state=state)
    for mode in ("auto", "chunk", "recurrent"):
        out, final = ssd(x, dt, A, Bm, Cm, D=D, initial_state=state, backend="torch", mode=mode)
        assert final is None and relative_rms(expected, out) < 1e-5
    with pytest.raises(ValueError, match="mode"):
        ssd(x, dt, A, Bm, Cm, mode="parallel")
    with pytest.raises(ValueError, match="groups must divide"):
        ssd(x, dt, A, Bm[:, :, :1].expand(-1, -1, 3, -1), Cm, backend="torch")
    with pytest.raises(RuntimeError, match="hybridize\\[cuda\\]"):
        ssd(x, dt, A, Bm, Cm, backend="fla")
    with pytest.raises(RuntimeError, match="hybridize\\[mamba\\]"):
        ssd(x, dt, A, Bm, Cm, backend="mamba_ssm")


@needs_cuda("the kernels need a CUDA device")
class TestKernels:
    """bf16 kernels against the fp32 reference on the same inputs, with fla's own test tolerances."""

    @pytest.fixture(params=["fla", "mamba_ssm"])
    def backend(self, request):
        if not library_available(request.param):
            pytest.skip(f"{request.param} is not installed")
        return request.param

    @staticmethod
    def inputs(seed=0):
        """x, B, C in bf16 (as the mixer's projections give them), dt and A in fp32; all leaves on CUDA."""
        x, dt, A, Bm, Cm, D, state = random_inputs(2, 1000, 4, 2, 64, 64, seed=seed)
        x, Bm, Cm = (t.to(torch.bfloat16) for t in (x, Bm, Cm))
        return [t.cuda().requires_grad_() for t in (x, dt, A, Bm, Cm, D, state)]

    def test_chunk_forward_and_backward(self, backend):
        inputs = self.inputs()
        reference_inputs = [t.detach().float().requires_grad_() for t in inputs]
        grad_out = torch.randn(inputs[0].shape, generator=torch.Generator().manual_seed(1)).cuda()

        def run(tensors, which):
            x, dt, A, Bm, Cm, D, state = tensors
            return ssd(
                x,
                dt,
                A,
                Bm,
                Cm,
                D=D,
                initial_state=state,
                output_final_state=True,
                backend=which,
                mode="chunk",
            )

        ref_out, ref_state = run(reference_inputs, "torch")
        out, state = run(inputs, backend)
        assert relative_rms(ref_out, out) < 0.005
        assert relative_rms(ref_state, state) < 0.005
        for result in (ref_out, out):
            (result.float() * grad_out).sum().backward()
        names = ("x", "dt", "A", "B", "C")
        for name, ref_tensor, tensor in zip(names, reference_inputs, inputs, strict=False):
            tolerance = 0.02 if name in ("dt", "A") else 0.008
            assert relative_rms(ref_tensor.grad, tensor.grad) < tolerance, name

    def test_recurrent_forward(self, backend):
        x, dt, A, Bm, Cm, D, state = (t.detach() for t in self.inputs(seed=2))
        x, dt, Bm, Cm = (t[:, :64] for t in (x, dt, Bm, Cm))
        with torch.no_grad():
            expected, expected_state = ssd_recurrent_torch(
                x.float(), dt, A, Bm.float(), Cm.float(), D, initial_state=state, output_final_state=True
            )
            out, final = ssd(
                x,
                dt,
                A,
                Bm,
                Cm,
                D=D,
                initial_state=state,
                output_final_state=True,
                backend=backend,
                mode="recurrent",
            )
        assert relative_rms(expected, out) < 0.002
        assert relative_rms(expected_state, final) < 0.002

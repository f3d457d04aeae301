"""The shared building blocks: the short causal convolution and the gated RMSNorm."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache

from hybridize.mixers import AttentionSpec, build_mixer
from hybridize.mixers.modules import GatedRMSNorm, ShortConvolution
from tests.conftest import needs_cuda, relative_rms


@pytest.mark.parametrize("bias", [False, True])
def test_short_convolution_is_a_causal_depthwise_conv_with_carried_state(bias):
    torch.manual_seed(0)
    conv = ShortConvolution(6, 4, bias=bias).double()
    x = torch.randn(2, 11, 6, dtype=torch.float64)
    whole, _ = conv(x)
    padded = F.pad(x.transpose(1, 2), (3, 0))  # zeros before the first token
    expected = F.silu(F.conv1d(padded, conv.weight, conv.bias, groups=6)).transpose(1, 2)
    torch.testing.assert_close(whole, expected)
    first, state = conv(x[:, :5])
    steps = [first]
    for t in range(5, 11):
        out, state = conv(x[:, t : t + 1], state)
        steps.append(out)
    torch.testing.assert_close(torch.cat(steps, dim=1), whole)


def test_identity_taps_pass_the_input_through():
    conv = ShortConvolution(4, 3, bias=True)
    conv.set_identity()
    x = torch.randn(1, 5, 4)
    torch.testing.assert_close(conv(x)[0], F.silu(x))


def test_gated_rms_norm_orders():
    x, gate = torch.randn(3, 8, dtype=torch.float64), torch.randn(3, 8, dtype=torch.float64)

    def rms(t):
        return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + 1e-6)

    before = GatedRMSNorm(8, 1e-6, norm_before_gate=True).double()
    after = GatedRMSNorm(8, 1e-6, norm_before_gate=False).double()
    torch.testing.assert_close(before(x, gate), rms(x) * F.silu(gate))
    torch.testing.assert_close(after(x, gate), rms(x * F.silu(gate)))


def test_backends_are_checked_when_built():
    with pytest.raises(ValueError, match="backend='triton' is not one of"):
        ShortConvolution(4, 3, backend="triton")
    with pytest.raises(ValueError, match="backend='cuda' is not one of"):
        GatedRMSNorm(8, 1e-6, backend="cuda")


needs_fla = needs_cuda("fla's kernels need CUDA and fla", fla=True)


def outputs_and_grads(run, module, inputs: dict, upstream: torch.Tensor):
    """The output of `run(**inputs)`, and the gradients of sum(out * upstream) for every input and parameter."""
    module.zero_grad()
    inputs = {name: x.detach().clone().requires_grad_() for name, x in inputs.items()}
    out = run(**inputs)
    (out.float() * upstream).sum().backward()
    grads = {name: x.grad for name, x in inputs.items()}
    grads.update({name: p.grad for name, p in module.named_parameters()})
    return out, grads


@needs_fla
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fla_short_convolution_matches_the_reference(dtype):
    """fla's causal_conv1d against the reference: a prefill from a carried state (state out too), one decode step
    from that state, a packed row; outputs and every gradient (input, incoming state, weight, bias). fp32 to 1e-5;
    bf16 within fla's gradient tolerance (relative RMS 0.008; the weight's sums every token, 0.02)."""
    torch.manual_seed(0)
    fast = ShortConvolution(96, 4, bias=True).cuda().to(dtype)
    reference = ShortConvolution(96, 4, bias=True, backend="torch").cuda().to(dtype)
    reference.load_state_dict(fast.state_dict())
    x = torch.randn(2, 37, 96, device="cuda", dtype=dtype)
    state = torch.randn(2, 96, 4, device="cuda", dtype=dtype)
    upstream = torch.randn(2, 38, 96, device="cuda")
    packed = torch.tensor([0, 3, 20, 37], dtype=torch.int32, device="cuda")

    def prefill_then_step(conv):
        def run(x, state):
            out, carried = conv(x, state)
            step, _ = conv(x[:, -1:] * 0.5, carried)
            row, _ = conv(x[:1], cu_seqlens=packed)
            return torch.cat([out + row, step], dim=1)

        return run

    limits = {"float32": (1e-5, 1e-5), "bfloat16": (0.008, 0.02)}[str(dtype).split(".")[1]]
    out, grads = outputs_and_grads(prefill_then_step(fast), fast, {"x": x, "state": state}, upstream)
    with torch.backends.cudnn.flags(allow_tf32=False):  # the reference's fp32 conv in fp32
        expected, expected_grads = outputs_and_grads(
            prefill_then_step(reference), reference, {"x": x, "state": state}, upstream
        )
    assert relative_rms(expected, out) < limits[0]
    for name, grad in expected_grads.items():
        assert relative_rms(grad, grads[name]) < limits[name in ("weight", "bias")], name


@needs_fla
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fla_gated_rms_norm_matches_the_reference(dtype):
    """fla's fused norm-and-gate against the reference, output and gradients (x, gate, weight); the
    norm-after-gate order and grouped norms stay on the reference."""
    torch.manual_seed(0)
    fast, reference = GatedRMSNorm(256, 1e-5).cuda(), GatedRMSNorm(256, 1e-5, backend="torch").cuda()
    with torch.no_grad():
        fast.weight.normal_(1.0, 0.1)
    reference.load_state_dict(fast.state_dict())
    inputs = {name: torch.randn(2, 19, 4, 256, device="cuda", dtype=dtype) for name in ("x", "gate")}
    upstream = torch.randn(2, 19, 4, 256, device="cuda")
    limits = {"float32": 1e-5, "bfloat16": 0.008}[str(dtype).split(".")[1]]
    out, grads = outputs_and_grads(fast, fast, inputs, upstream)
    expected, expected_grads = outputs_and_grads(reference, reference, inputs, upstream)
    assert out.dtype == expected.dtype == dtype
    assert relative_rms(expected, out) < limits
    for name, grad in expected_grads.items():
        assert relative_rms(grad, grads[name]) < limits * (2 if name == "weight" else 1), name
    assert not GatedRMSNorm(256, 1e-5, norm_before_gate=False).cuda()._on_fla(inputs["x"])
    assert not GatedRMSNorm(256, 1e-5, group_size=64).cuda()._on_fla(inputs["x"])


@needs_fla
@pytest.mark.parametrize(
    "name, options", [("gated_deltanet", {}), ("gla", {"use_short_conv": True}), ("mamba2", {})]
)
def test_mixers_on_fla_kernels_prefill_and_decode_as_the_reference(name, options):
    """A whole bf16 mixer with a cache, every fast path on (fla's scans, conv and fused norm), against the same
    weights with backend="torch": a left-padded 70-token prefill and three decode steps, outputs and the states
    left in the cache, within a whole bf16 mixer's tolerance (DESIGN.md: ~1e-2)."""
    spec = AttentionSpec(hidden_size=256, num_heads=4, num_kv_heads=2, head_dim=64)
    torch.manual_seed(0)
    fast = build_mixer(name, {"backend": "auto", **options}, spec, layer_idx=0).cuda().bfloat16()
    reference = build_mixer(name, {"backend": "torch", **options}, spec, layer_idx=0).cuda().bfloat16()
    reference.load_state_dict(fast.state_dict())
    x = torch.randn(2, 73, 256, device="cuda", dtype=torch.bfloat16)
    mask = torch.ones(2, 70, dtype=torch.long, device="cuda")
    mask[1, :9] = 0  # row 1 is left-padded
    results = {}
    with torch.no_grad():
        for label, mixer in (("fast", fast), ("reference", reference)):
            cache = DynamicCache()
            pieces = [mixer(x[:, :70], attention_mask=mask, cache=cache)[0] * mask[..., None]]
            pieces += [mixer(x[:, t : t + 1], cache=cache)[0] for t in range(70, 73)]
            results[label] = torch.cat(pieces, dim=1), cache.layers[0].states
    (out, states), (expected, expected_states) = results["fast"], results["reference"]
    assert relative_rms(expected, out) < 1e-2
    assert states.keys() == expected_states.keys()
    for key, state in expected_states.items():
        assert states[key].shape == state.shape, key
        assert relative_rms(state, states[key]) < 1e-2, key

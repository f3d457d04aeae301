"""The shared building blocks: the short causal convolution and the gated RMSNorm."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hybridize.mixers.modules import GatedRMSNorm, ShortConvolution


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

"""Small building blocks shared by the linear mixers: the short causal convolution and the gated RMSNorm."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hybridize.mixers.ops.backends import fla_available
from hybridize.mixers.ops.dtypes import compute_dtype
from hybridize.mixers.ops.varlen import positions_in_sequence


class ShortConvolution(nn.Conv1d):
    """Causal depthwise convolution over time, followed by SiLU. Weight (channels, 1, kernel) as in fla and
    mamba-ssm; the state carried between calls is the last kernel-1 inputs, so decode is one step of it."""

    def __init__(self, channels: int, kernel_size: int, bias: bool = False):
        super().__init__(channels, channels, kernel_size, groups=channels, bias=bias)

    def forward(
        self, x: torch.Tensor, state: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x (B, T, D); state (B, D, kernel-1), the inputs before x. Returns silu(conv(x)) and the new state.

        cu_seqlens (N+1,): x is N sequences packed in one row (B = 1, ops/varlen.py); the convolution restarts
        at every boundary, as if each sequence came alone, and no state goes in or out (None is returned).
        """
        if cu_seqlens is not None:
            if state is not None or x.shape[0] != 1:
                raise ValueError(
                    f"A packed row (cu_seqlens) is one row of sequences that each start without a conv state; "
                    f"got batch size {x.shape[0]} and a state of shape "
                    f"{None if state is None else tuple(state.shape)}."
                )
            return self._forward_packed(x, cu_seqlens), None
        x = x.transpose(1, 2)  # (B, D, T)
        if state is None:
            state = x.new_zeros(x.shape[0], x.shape[1], self.kernel_size[0] - 1)
        window = torch.cat([state.to(x.dtype), x], dim=-1)  # (B, D, kernel-1+T)
        if x.device.type == "cpu" or torch.compiler.is_compiling():
            # A depthwise causal conv is `taps` shifted multiply-adds. On CPU F.conv1d's depthwise path is two
            # orders of magnitude slower than that in fp64 (the exactness tests' dtype); under torch.compile the
            # multiply-adds fuse with the SiLU and the state shift (a decode step's conv is then no kernel of its
            # own). Eager on GPU, cuDNN's one kernel is faster.
            length, taps = x.shape[-1], self.kernel_size[0]
            out = sum(window[..., j : j + length] * self.weight[:, 0, j, None] for j in range(taps))
            out = out if self.bias is None else out + self.bias[:, None]
        else:
            out = F.conv1d(window, self.weight, self.bias, groups=self.groups)
        return F.silu(out).transpose(1, 2), window[..., window.shape[-1] - state.shape[-1] :]

    def _forward_packed(self, x: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
        """fla's varlen kernel (forward and backward in one launch each) on CUDA; elsewhere the shifted
        multiply-adds, each tap dropped where it would reach back past the start of the token's sequence."""
        if x.device.type == "cuda" and fla_available():
            from fla.modules.convolution import causal_conv1d

            out, _ = causal_conv1d(
                x, self.weight[:, 0], self.bias, activation="silu", cu_seqlens=cu_seqlens
            )  # weight (D, 1, W) -> (D, W), fla's layout
            return out
        length, taps = x.shape[1], self.kernel_size[0]
        position = positions_in_sequence(cu_seqlens, length)  # (T,)
        window = F.pad(x.transpose(1, 2), (taps - 1, 0))  # (1, D, kernel-1+T), zeros before the row
        # tap j reads the input taps-1-j steps back: only tokens at least that far into their sequence have it
        out = sum(
            window[..., j : j + length] * self.weight[:, 0, j, None] * (position >= taps - 1 - j).to(x.dtype)
            for j in range(taps)
        )
        out = out if self.bias is None else out + self.bias[:, None]
        return F.silu(out).transpose(1, 2)

    @torch.no_grad()
    def set_identity(self) -> None:
        """Taps that pass the current input through (before the SiLU): conv(x)_t = x_t."""
        self.weight.zero_()
        self.weight[..., -1] = 1.0
        if self.bias is not None:
            self.bias.zero_()


class GatedRMSNorm(nn.Module):
    """RMSNorm combined with a silu(gate), one weight per channel.

    norm_before_gate=True: RMSNorm(x) * silu(gate) (fla's FusedRMSNormGated, Gated DeltaNet and GLA);
    False: RMSNorm(x * silu(gate)) (mamba-ssm's RMSNormGated, Mamba-2). The mean square is taken over each
    group of `group_size` channels (default: the whole last dimension), as mamba-ssm's `group_size`.
    """

    def __init__(self, dim: int, eps: float, norm_before_gate: bool = True, group_size: int | None = None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.norm_before_gate = norm_before_gate
        self.group_size = group_size or dim

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x, gate = x.to(compute_dtype(x)), F.silu(gate.to(compute_dtype(x)))
        if not self.norm_before_gate:
            x = x * gate
        # (..., D) -> (..., D / group_size, group_size): one mean square per group
        x = F.rms_norm(x.unflatten(-1, (-1, self.group_size)), (self.group_size,), eps=self.eps).flatten(-2)
        if self.norm_before_gate:
            x = x * gate
        return (self.weight.to(x.dtype) * x).to(dtype)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

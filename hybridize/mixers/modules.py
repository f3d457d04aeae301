"""Small building blocks shared by the linear mixers: the short causal convolution and the gated RMSNorm."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hybridize.mixers.ops.backends import check_backend, resolve_backend
from hybridize.mixers.ops.dtypes import compute_dtype
from hybridize.mixers.ops.varlen import positions_in_sequence


class ShortConvolution(nn.Conv1d):
    """Causal depthwise convolution over time, followed by SiLU. Weight (channels, 1, kernel) as in fla and
    mamba-ssm, and their state: the last `kernel` inputs (B, D, kernel), of which the next step reads all but
    the oldest.

    backend: "auto" runs fla's `causal_conv1d` (one kernel forward, one backward, reading (B, T, D) as it lies)
    on CUDA when fla is installed, outside torch.compile; "torch" always runs the reference below.
    """

    def __init__(self, channels: int, kernel_size: int, bias: bool = False, backend: str = "auto"):
        super().__init__(channels, channels, kernel_size, groups=channels, bias=bias)
        check_backend(backend, ("fla",), "short convolution")
        self.backend = backend

    def _on_fla(self, x: torch.Tensor) -> bool:
        if torch.compiler.is_compiling():  # the reference's multiply-adds fuse with their neighbours there
            return False
        return resolve_backend(self.backend, x.device, "short convolution") == "fla"

    def forward(
        self,
        x: torch.Tensor,
        state: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        output_state: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x (B, T, D); state (B, D, kernel), the inputs before x. Returns silu(conv(x)) and the new state
        (None unless `output_state`).

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
            if self._on_fla(x):
                return self._fla(x, None, False, cu_seqlens)
            return self._forward_packed(x, cu_seqlens), None
        if self._on_fla(x):
            return self._fla(x, state, output_state)
        taps = self.kernel_size[0]
        x = x.transpose(1, 2)  # (B, D, T)
        past = x.new_zeros(x.shape[0], x.shape[1], taps - 1) if state is None else state[..., 1:].to(x.dtype)
        window = torch.cat([past, x], dim=-1)  # (B, D, kernel-1+T)
        if x.device.type == "cpu" or torch.compiler.is_compiling():
            # A depthwise causal conv is `taps` shifted multiply-adds. On CPU F.conv1d's depthwise path is two
            # orders of magnitude slower than that in fp64 (the exactness tests' dtype); under torch.compile the
            # multiply-adds fuse with the SiLU and the state shift (a decode step's conv is then no kernel of its
            # own). Eager on GPU, cuDNN's one kernel is faster.
            length = x.shape[-1]
            out = sum(window[..., j : j + length] * self.weight[:, 0, j, None] for j in range(taps))
            out = out if self.bias is None else out + self.bias[:, None]
        else:
            out = F.conv1d(window, self.weight, self.bias, groups=self.groups)
        return F.silu(out).transpose(1, 2), window[..., -taps:] if output_state else None

    def _fla(
        self,
        x: torch.Tensor,
        state: torch.Tensor | None,
        output_state: bool,
        cu_seqlens: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        from fla.modules.causal_conv1d import causal_conv1d

        return causal_conv1d(
            x,
            self.weight[:, 0],  # (D, 1, W) -> (D, W), fla's layout
            self.bias,
            initial_state=None if state is None else state.to(x.dtype),
            output_final_state=output_state,
            activation="silu",
            cu_seqlens=cu_seqlens,
        )

    def _forward_packed(self, x: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
        """The reference of a packed row: the shifted multiply-adds, each tap dropped where it would reach back
        past the start of the token's sequence."""
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


def convolve_qkv(mixer: nn.Module, q, k, v, states: dict, cu_seqlens, keep: bool) -> tuple:
    """q, k, v (B, T, D) through `mixer`'s q_conv1d, k_conv1d and v_conv1d (fla's layer names) from the conv
    states of its cache slot ("conv_q", "conv_k", "conv_v"); returns them and, when `keep`, the new states by
    the same names for `slot.store` (else {})."""
    mixed, new_states = [], {}
    for name, x in zip("qkv", (q, k, v), strict=True):
        conv = getattr(mixer, f"{name}_conv1d")
        x, state = conv(x, states.get(f"conv_{name}"), cu_seqlens, output_state=keep)
        mixed.append(x)
        if keep:
            new_states[f"conv_{name}"] = state
    return (*mixed, new_states)


class GatedRMSNorm(nn.Module):
    """RMSNorm combined with a silu(gate), one weight per channel.

    norm_before_gate=True: RMSNorm(x) * silu(gate) (fla's FusedRMSNormGated, Gated DeltaNet and GLA);
    False: RMSNorm(x * silu(gate)) (mamba-ssm's RMSNormGated, Mamba-2). The mean square is taken over each
    group of `group_size` channels (default: the whole last dimension), as mamba-ssm's `group_size`.
    backend: "auto" runs fla's fused kernel (forward and backward one launch each, no fp32 copies) for the
    norm-before-gate order over whole rows on CUDA when fla is installed, outside torch.compile; "torch" always
    runs the reference.
    """

    def __init__(
        self,
        dim: int,
        eps: float,
        norm_before_gate: bool = True,
        group_size: int | None = None,
        backend: str = "auto",
    ):
        super().__init__()
        check_backend(backend, ("fla",), "gated RMSNorm")
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.norm_before_gate = norm_before_gate
        self.group_size = group_size or dim
        self.backend = backend

    def _on_fla(self, x: torch.Tensor) -> bool:
        if torch.compiler.is_compiling() or not self.norm_before_gate or self.group_size != x.shape[-1]:
            return False
        return resolve_backend(self.backend, x.device, "gated RMSNorm") == "fla"

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        if self._on_fla(x):
            from fla.modules.norm.fused_norm_gate import rms_norm_gated

            return rms_norm_gated(x, gate, self.weight, None, activation="swish", eps=self.eps)
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

"""Linear layers that read the same input, computed as one matrix product at inference.

At batch 1 a decode step is a chain of matrix-vector products, each reading its weight once: many small ones
(a Gated DeltaNet layer has six input projections, two of them 16 rows tall) pay a kernel launch and a ragged
tail each. `fuse_projections(model)` lays sibling weights out side by side in one tensor and makes each layer's
parameter a view of its rows, so memory does not grow and the checkpoint names do not change; under
`torch.no_grad()` the fused layers then run as one product:

- every token mixer's `input_projections` (Gated DeltaNet: q, k, v, a, b, g; GLA: q, k, v, g), through
  `TokenMixer.project_inputs`;
- every gated MLP (`gate_proj`, `up_proj`, `down_proj`, `act_fn`, as in Llama, Qwen2 and Qwen2.5-VL): gate and
  up in one product, and a down projection whose input size is not a multiple of 8 over zero-padded operands
  (`AlignedLinear`). Its forward is checked against the original on a random input before it is kept;
- every patch embedding's convolution (`nn.Conv2d`/`nn.Conv3d` without padding or dilation, called on exactly one
  patch, as Qwen2-VL's and Qwen2.5-VL's ViTs call theirs): one matrix product over the flattened patches with the
  weight viewed as a matrix (on an H100, cuDNN ran Qwen2.5-VL's in a generic `implicit_convolveNd_sgemm` kernel,
  0.27 ms of a 448x448 frame's 4.1 ms ViT, for 3 GFLOP).

A fused product with biases gets zero rows up to a multiple of 128 bytes per output row (`ROW_BYTES`), so that
the bias stays in cuBLASLt's epilogue when torch.compile pads its output rows.

With autograd on, every layer runs as before (gradients reach the parameters, not the fused tensor). The fused
tensor shares the parameters' storage, so in-place updates (an optimiser step, `load_state_dict`) reach it; moving
or casting the model afterwards (`.to()`) gives the parameters storage of their own: the layers then run apart
again (eager), and `fuse_projections` fuses them anew.

Fusion is a step the caller asks for (`StaticDecoder(fuse=True)`, `StreamingSession(fuse=True)`, the CLI's
generate and stream, or `fuse_projections` itself) and `unfuse_projections(model)` undoes it: every parameter gets
storage of its own again and the mixers' hook and the MLPs' forwards are the originals. `restore_model(model)`
also undoes the torch.compile of modules compiled in place (a streaming session's `compile=True` vision blocks).
"""

from __future__ import annotations

import types
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from hybridize.compat import uncompile_module
from hybridize.mixers.base import TokenMixer

MLP_PARTS = ("gate_proj", "up_proj", "down_proj")
COUNTS = ("mixers", "mlps", "patch_convs")
# A fused product's rows are padded to a multiple of this many bytes. Compiled, inductor pads the row stride of the
# buffers it allocates to 128 bytes (`comprehensive_padding`, CUDA, rows over 1,024 elements); a biased product
# writing into such a non-contiguous buffer misses cuBLASLt's bias epilogue, and aten runs a broadcast copy of the
# bias and a beta=1 product instead (on an H100: 32 copies of 14 MB per 448x448 frame in Qwen2.5-VL's ViT, whose
# gate and up projections give 6,840 columns, 0.40 ms of its 3.84).
ROW_BYTES = 128


class _WeightViews:
    """Linear layers whose weights were made views of a tensor this object owns."""

    def _remember(self, linears: Sequence[nn.Linear]) -> None:
        self.linears = list(linears)
        self.pointers = self._pointers()

    def _pointers(self) -> list[int]:
        return [linear.weight.data_ptr() for linear in self.linears]

    def current(self) -> bool:
        """Whether the layers' weights are still views of the owned tensor (`.to()` or assigning new data to a
        parameter gives it storage of its own). Host-side pointer checks; under torch.compile they are not
        traceable, and the caller that compiled just fused (see `StaticDecoder`)."""
        return torch.compiler.is_compiling() or self._pointers() == self.pointers

    @torch.no_grad()
    def release(self) -> None:
        """Give the layers' parameters storage of their own again (the same Parameter objects, so optimisers and
        references keep working); the owned tensor is then nobody's."""
        if self._pointers() != self.pointers:
            return  # moved or cast since: they have their own already
        for linear in self.linears:
            for parameter in (linear.weight, linear.bias):
                if parameter is not None:
                    parameter.data = parameter.data.clone()


class FusedLinear(_WeightViews):
    """nn.Linear layers with one input, computed by one matrix product; each layer's weight (and bias) becomes a
    view of its rows in the fused tensor, whose rows are padded with zeros to a multiple of `ROW_BYTES` when the
    layers have biases. Calling it returns the layers' outputs in order (views of the product's columns)."""

    def __init__(self, linears: Sequence[nn.Linear]):
        if not linears or not all(type(linear) is nn.Linear for linear in linears):
            raise TypeError("FusedLinear fuses plain nn.Linear layers.")
        first = linears[0].weight
        if any(
            linear.in_features != linears[0].in_features
            or linear.weight.dtype != first.dtype
            or linear.weight.device != first.device
            or (linear.bias is None) != (linears[0].bias is None)
            for linear in linears
        ):
            raise ValueError(
                "Fused linear layers need one input size, dtype and device, and biases on all or none."
            )
        self.sizes = [linear.out_features for linear in linears]
        biased = linears[0].bias is not None  # products without a bias write strided outputs at no cost
        self.pad = -sum(self.sizes) % max(1, ROW_BYTES // first.element_size()) if biased else 0
        self.weight = self._share([linear.weight for linear in linears])
        self.bias = None
        if biased:
            self.bias = self._share([linear.bias for linear in linears])
        self._remember(linears)

    def _share(self, parameters: list[nn.Parameter]) -> torch.Tensor:
        tail = parameters[0].new_zeros(self.pad, *parameters[0].shape[1:])
        fused = torch.cat([*(parameter.detach() for parameter in parameters), tail])
        for parameter, rows in zip(parameters, fused.split([*self.sizes, self.pad]), strict=False):
            parameter.data = rows  # the same Parameter object (optimisers keep it), now a view of its rows
        return fused

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return F.linear(x, self.weight, self.bias).split([*self.sizes, self.pad], dim=-1)[: len(self.sizes)]


class AlignedLinear(_WeightViews):
    """An nn.Linear whose input size is not a multiple of 8 (Qwen2.5-VL's ViT MLP: 3420), computed over a
    zero-padded input and weight: cuBLAS then takes its 16-byte-aligned kernels (on an H100 the ViT's down
    projection ran a 2-element-aligned one at a third of the speed). The layer's weight becomes a view of the
    padded one; the zeros add nothing to the products."""

    def __init__(self, linear: nn.Linear, multiple: int = 8):
        self.pad = -linear.in_features % multiple
        weight = linear.weight.detach()
        self.weight = weight.new_zeros(weight.shape[0], weight.shape[1] + self.pad)
        self.weight[:, : weight.shape[1]] = weight
        linear.weight.data = self.weight[:, : weight.shape[1]]  # the same Parameter object, a view now
        self._remember([linear])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.pad(x, (0, self.pad)), self.weight, self.linears[0].bias)


def _fused_mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    down = self.aligned_down_proj
    if torch.is_grad_enabled() or not self.fused_gate_up.current() or not (down is None or down.current()):
        return type(self).forward(self, x)
    gate, up = self.fused_gate_up(x)
    hidden = self.act_fn(gate) * up
    return self.down_proj(hidden) if down is None else down(hidden)


@torch.no_grad()
def _fuse_mlp(mlp: nn.Module) -> bool:
    """Fuse a gated MLP's gate and up projections when its forward is down(act(gate(x)) * up(x))."""
    linears = [getattr(mlp, name, None) for name in MLP_PARTS]
    if not all(type(linear) is nn.Linear for linear in linears):
        return False
    fused = vars(mlp).get("fused_gate_up")
    if fused is not None and fused.current():
        return False
    if not callable(getattr(mlp, "act_fn", None)):
        return False
    weight = linears[0].weight
    probe = torch.randn(2, linears[0].in_features, generator=torch.Generator().manual_seed(0))
    probe = probe.to(weight.device, weight.dtype)
    expected = mlp(probe)
    mlp.fused_gate_up = FusedLinear(linears[:2])
    mlp.aligned_down_proj = AlignedLinear(linears[2]) if linears[2].in_features % 8 else None
    mlp.forward = types.MethodType(_fused_mlp_forward, mlp)
    got = mlp(probe)
    error = (got.float() - expected.float()).norm() / expected.float().norm().clamp(min=1e-12)
    if error > 1e-2:  # another formula: keep the original forward (the parameters stay views, harmlessly)
        del mlp.forward, mlp.fused_gate_up, mlp.aligned_down_proj
        return False
    return True


def _patch_conv_forward(self, x: torch.Tensor) -> torch.Tensor:
    if torch.is_grad_enabled() or x.shape[2:] != self.kernel_size:
        return type(self).forward(self, x)
    out = F.linear(x.flatten(1), self.weight.flatten(1), self.bias)  # (patches, channels out)
    return out.view(*out.shape, *(1 for _ in self.kernel_size))


def _fuse_patch_conv(conv: nn.Module) -> bool:
    """Compute a convolution as one matrix product whenever its input is exactly one kernel-sized patch (no
    padding or dilation, one group: each output is the weight's rows against the flattened patch)."""
    if type(conv) not in (nn.Conv2d, nn.Conv3d) or "forward" in vars(conv):
        return False
    unpadded = conv.padding in ("valid", (0,) * len(conv.kernel_size))
    if conv.groups != 1 or not unpadded or any(step != 1 for step in conv.dilation):
        return False
    conv.forward = types.MethodType(_patch_conv_forward, conv)
    return True


@torch.no_grad()
def fuse_projections(model: nn.Module) -> dict[str, int]:
    """Fuse every mixer's input projections and every gated MLP's gate/up projections of `model`, and compute its
    patch embeddings' convolutions as matrix products (in place; idempotent). Returns how many of each."""
    counts = dict.fromkeys(COUNTS, 0)
    for module in model.modules():
        if isinstance(module, TokenMixer) and module.input_projections:
            fused = module.fused_input_projection
            if fused is None or not fused.current():
                linears = [module.get_submodule(name) for name in module.input_projections]
                module.fused_input_projection = FusedLinear(linears)
                counts["mixers"] += 1
        elif all(hasattr(module, name) for name in MLP_PARTS):
            counts["mlps"] += _fuse_mlp(module)
        else:
            counts["patch_convs"] += _fuse_patch_conv(module)
    return counts


@torch.no_grad()
def unfuse_projections(model: nn.Module) -> dict[str, int]:
    """Undo `fuse_projections` (in place; idempotent): every fused parameter gets storage of its own, the mixers'
    `fused_input_projection` hook is cleared and the MLPs and convolutions run their class's forward. Returns how
    many of each."""
    counts = dict.fromkeys(COUNTS, 0)
    for module in model.modules():
        if isinstance(module, TokenMixer) and module.fused_input_projection is not None:
            module.fused_input_projection.release()
            module.fused_input_projection = None
            counts["mixers"] += 1
        elif "fused_gate_up" in vars(module):
            module.fused_gate_up.release()
            if module.aligned_down_proj is not None:
                module.aligned_down_proj.release()
            del module.forward, module.fused_gate_up, module.aligned_down_proj
            counts["mlps"] += 1
        elif getattr(vars(module).get("forward"), "__func__", None) is _patch_conv_forward:
            del module.forward
            counts["patch_convs"] += 1
    return counts


def restore_model(model: nn.Module) -> dict[str, int]:
    """The model as loaded: `unfuse_projections`, and every submodule compiled in place (`module.compile()`, as
    a streaming session's `compile=True` does to the vision blocks) back to eager. Returns the counts."""
    counts = unfuse_projections(model)
    counts["compiled"] = sum(uncompile_module(module) for module in model.modules())
    return counts

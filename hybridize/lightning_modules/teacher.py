"""The teacher inside the student: distillation without a second copy of the shared weights.

A hybrid keeps every teacher weight except the attention of its converted layers. Putting each of those
attention modules back beside the mixer that replaced it (`DistilledLayer`) turns the hybrid itself into
the teacher: with every converted layer in "teacher" mode its forward is the teacher's forward, and the
embeddings, MLPs, norms, vision tower and head exist once. Modes:

- "teacher": the layer returns the teacher attention's output (the whole model is the teacher);
- "student": the layer returns the mixer's output (the whole model is the hybrid);
- "layerwise": the layer returns the teacher's output, so every later layer sees the teacher's activations,
  and records the mixer's MSE against it on the same input (stage 1a). With `eager_backward` the layer takes
  its mixer's gradients at once and frees that graph (`GradientsTaken`): one mixer's activations are alive at a
  time instead of every mixer's until the step's backward.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch
from torch import nn

from hybridize.compat import without_native_windows
from hybridize.converters.discovery import find_decoder_layout
from hybridize.converters.hybrid_model import layer_plan
from hybridize.lightning_modules.losses import masked_mse
from hybridize.mixers.base import TokenMixer
from hybridize.mixers.masks import key_padding_mask
from hybridize.mixers.sliding_window import SlidingWindowMixer

MODES = ("teacher", "student", "layerwise")


class GradientsTaken(torch.autograd.Function):
    """A loss whose gradients were taken already (and its graph freed): its backward hands the stored gradients,
    times the gradient that reaches the loss (a loss weight, 1/accumulation, a precision plugin's scale), to the
    parameters, as the loss's own graph would have."""

    @staticmethod
    def forward(ctx, value: torch.Tensor, gradients: tuple, *parameters: torch.Tensor) -> torch.Tensor:
        ctx.gradients = gradients
        return value.detach().clone()

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        gradients, ctx.gradients = ctx.gradients, None
        return None, None, *(None if grad is None else grad * grad_output for grad in gradients)


def take_gradients_now(loss: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """`loss` as a `GradientsTaken`: the gradients of `module`'s trainable parameters are computed now."""
    parameters = [parameter for parameter in module.parameters() if parameter.requires_grad]
    gradients = torch.autograd.grad(loss, parameters, allow_unused=True)
    return GradientsTaken.apply(loss.detach(), gradients, *parameters)


class DistilledLayer(nn.Module):
    """A converted layer's mixer (`student`, trainable) beside the frozen teacher attention it replaced."""

    def __init__(self, student: TokenMixer, teacher: nn.Module):
        super().__init__()
        self.student = student
        self.teacher = teacher.requires_grad_(False).eval()
        self.mode = "student"
        self.eager_backward = False
        self.loss: torch.Tensor | None = None

    def train(self, mode: bool = True) -> DistilledLayer:
        super().train(mode)
        self.teacher.eval()  # the teacher never drops out (Lightning notes these modules in eval mode)
        return self

    def forward(self, hidden_states: torch.Tensor, **kwargs) -> tuple[torch.Tensor, None]:
        if self.mode == "student":
            return self.student(hidden_states, **kwargs)
        with torch.no_grad():
            target = self.teacher(hidden_states=hidden_states, **kwargs)[0]
        if self.mode == "layerwise":
            packed = kwargs.get("cu_seq_lens_q") is not None  # block-diagonal mask, every token real
            valid = None if packed else key_padding_mask(kwargs.get("attention_mask"), hidden_states.shape[1])
            with torch.enable_grad():  # the rest of the model runs without gradients
                output = self.student(hidden_states.detach(), **kwargs)[0]
                self.loss = masked_mse(output, target, valid)
                if self.eager_backward and self.loss.requires_grad:
                    self.loss = take_gradients_now(self.loss, self.student)
        return target, None


def attach_teacher(hybrid: nn.Module, teacher: nn.Module) -> list[DistilledLayer]:
    """Wrap every converted layer of `hybrid` with a frozen copy of `teacher`'s attention for that layer.

    Only the attention modules are copied (the teacher itself can be freed afterwards); layers converted by a
    config change (native sliding window) and kept layers are left alone. Returns the wrappers in layer order.
    """
    plan = layer_plan(hybrid.config)
    student_layout, teacher_layout = find_decoder_layout(hybrid), find_decoder_layout(teacher)
    if len(student_layout.layers) != len(teacher_layout.layers):
        raise ValueError(
            f"The teacher has {len(teacher_layout.layers)} decoder layers but the hybrid has "
            f"{len(student_layout.layers)}: it is not this hybrid's teacher."
        )
    wrapped = []
    for idx in range(len(student_layout.layers)):
        student = student_layout.attention(idx)
        if idx in plan.native_layers or not isinstance(student, TokenMixer) or student.wraps_attention:
            continue  # the teacher's own attention (native or wrapped sliding window, kept layers)
        teacher_attention = copy.deepcopy(teacher_layout.attention(idx)).to(
            device=next(student.parameters()).device
        )
        layer = DistilledLayer(student, teacher_attention)
        student_layout.set_attention(idx, layer)
        wrapped.append(layer)
    if not wrapped:
        raise ValueError("The hybrid has no converted (mixer) layer to distil.")
    return wrapped


def detach_teacher(hybrid: nn.Module) -> None:
    """Put the trained mixers back in place of their DistilledLayer wrappers (before saving the hybrid)."""
    layout = find_decoder_layout(hybrid)
    for idx in range(len(layout.layers)):
        module = layout.attention(idx)
        if isinstance(module, DistilledLayer):
            layout.set_attention(idx, module.student)


@contextmanager
def teacher_detached(hybrid: nn.Module):
    """The hybrid without its teacher attention for the duration (to save or export it), then re-attached."""
    layout = find_decoder_layout(hybrid)
    attached = {idx: layout.attention(idx) for idx in range(len(layout.layers))}
    attached = {idx: module for idx, module in attached.items() if isinstance(module, DistilledLayer)}
    detach_teacher(hybrid)
    try:
        yield hybrid
    finally:
        for idx, module in attached.items():
            layout.set_attention(idx, module)


@contextmanager
def full_attention(hybrid: nn.Module) -> Iterator[None]:
    """Every sliding-window layer attends to the whole sequence for the duration, as in the teacher.

    Wrapped layers (the `sliding_window` mixer) hand over to the teacher attention they wrap; native ones
    (Qwen2 family: a per-layer type in the text config) become "full_attention" layers, whose mask the model
    builds from `layer_types` at every forward, and their attention module forgets its window (which only the
    flash-attention path reads)."""
    layout = find_decoder_layout(hybrid)
    text_config = layout.text_config
    native = layer_plan(hybrid.config).native_layers
    wrapped = {
        idx: layout.attention(idx)
        for idx in range(len(layout.layers))
        if isinstance(layout.attention(idx), SlidingWindowMixer)
    }
    try:
        for idx, mixer in wrapped.items():
            layout.set_attention(idx, mixer.attention)
        with without_native_windows(text_config, {idx: layout.attention(idx) for idx in native}):
            yield
    finally:
        for idx, mixer in wrapped.items():
            layout.set_attention(idx, mixer)


def distilled_layers(hybrid: nn.Module) -> list[DistilledLayer]:
    return [module for module in hybrid.modules() if isinstance(module, DistilledLayer)]


@contextmanager
def distillation_mode(hybrid: nn.Module, mode: str, *, eager_backward: bool = False):
    """Run the hybrid as the teacher, the student, or the layer-wise pair (see the module docstring);
    `eager_backward`: layer-wise losses take their gradients at once."""
    if mode not in MODES:
        raise ValueError(f"mode {mode!r} is not one of {MODES}.")
    layers = distilled_layers(hybrid)
    if not layers:
        raise ValueError("The hybrid has no teacher attached; call attach_teacher(hybrid, teacher) first.")
    previous = [layer.mode for layer in layers]
    for layer in layers:
        layer.mode, layer.loss, layer.eager_backward = mode, None, eager_backward
    try:
        # As the teacher, sliding-window layers attend to everything: beyond the window the teacher's logits
        # (1b) and the inputs each mixer learns from (1a) are the full-attention model's.
        with full_attention(hybrid) if mode != "student" else nullcontext():
            yield layers
    finally:
        for layer, mode_before in zip(layers, previous, strict=True):
            layer.mode, layer.eager_backward = mode_before, False

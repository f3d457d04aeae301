"""Each decoder layer of a teacher in one of three forms, chosen per layer: the probe behind layer selection.

`attach_probes` turns an all-linear hybrid with its teacher attached (`teacher.attach_teacher`, as the
distillation stages leave it) into a model whose every layer is a `ProbeLayer`, holding
- `linear`: the mixer (after stage 1a's alignment, when one ran),
- `full`: the teacher's attention, as the teacher computes it,
- `window`: the same attention limited to the plan's window (the `sliding_window` mixer wrapping it), which
  is what a layer that keeps softmax attention becomes in the hybrid.
`layer_forms(model, forms)` runs the model with some layers in another form; `measure_residuals` runs the
teacher and records, per layer and on the teacher's own input to it, how far the linear and the window forms
land from the teacher's output.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn

from hybridize.converters.discovery import attention_spec, find_decoder_layout
from hybridize.evaluation.metrics import answer_positions
from hybridize.lightning_modules.losses import masked_mse, token_cross_entropy
from hybridize.lightning_modules.teacher import DistilledLayer
from hybridize.mixers.masks import key_padding_mask
from hybridize.mixers.sliding_window import SlidingWindowConfig, SlidingWindowMixer

FORMS = ("full", "window", "linear")


class ProbeLayer(nn.Module):
    """One layer's attention in three forms (see the module docstring); `form` says which one runs."""

    def __init__(self, linear: nn.Module, full: nn.Module, window: nn.Module):
        super().__init__()
        self.linear, self.full, self.window = linear, full, window
        self.form = "full"
        self.measuring = False
        # Summed over measured tokens: squared error of each form against the teacher, and the values compared.
        self.residuals = {"linear": 0.0, "window": 0.0, "elements": 0}

    def forward(self, hidden_states: torch.Tensor, **kwargs) -> tuple[torch.Tensor, None]:
        if not self.measuring:
            return getattr(self, self.form)(hidden_states=hidden_states, **kwargs)
        target = self.full(hidden_states=hidden_states, **kwargs)[0]
        valid = key_padding_mask(kwargs.get("attention_mask"), hidden_states.shape[1])
        for name in ("linear", "window"):
            output = getattr(self, name)(hidden_states=hidden_states, **kwargs)[0]
            self.residuals[name] += float(masked_mse(output.float(), target.float(), valid)) * self._elements(
                target, valid
            )
        self.residuals["elements"] += self._elements(target, valid)
        return target, None

    @staticmethod
    def _elements(target: torch.Tensor, valid: torch.Tensor | None) -> int:
        return target.numel() if valid is None else int(valid.sum()) * target.shape[-1]


def attach_probes(hybrid: nn.Module, window: int) -> list[ProbeLayer]:
    """Replace every `DistilledLayer` of `hybrid` (all layers: an all-linear hybrid with its teacher attached)
    by a `ProbeLayer` built from its mixer and teacher attention. Returns the probes in layer order."""
    layout = find_decoder_layout(hybrid)
    probes = []
    for idx in range(len(layout.layers)):
        layer = layout.attention(idx)
        if not isinstance(layer, DistilledLayer):
            raise ValueError(
                f"Layer {idx} of the probed hybrid is {type(layer).__name__}, not a mixer with its teacher attached; "
                "probe an all-linear hybrid (ratio 0) after attach_teacher."
            )
        spec = attention_spec(layer.teacher, layout.text_config)
        windowed = SlidingWindowMixer(
            SlidingWindowConfig(window=window, implementation="mixer"), spec, idx, layer.teacher
        )
        probe = ProbeLayer(layer.student, layer.teacher, windowed)
        layout.set_attention(idx, probe)
        probes.append(probe)
    return probes


def probes_of(model: nn.Module) -> list[ProbeLayer]:
    return [module for module in model.modules() if isinstance(module, ProbeLayer)]


@contextmanager
def layer_forms(model: nn.Module, forms: Mapping[int, str]) -> Iterator[None]:
    """Run `model` with layer idx in form `forms[idx]` and every other layer as the teacher ("full")."""
    probes = probes_of(model)
    bad = {idx: form for idx, form in forms.items() if form not in FORMS or not 0 <= idx < len(probes)}
    if bad:
        raise ValueError(f"layer forms {bad}: layers must be 0..{len(probes) - 1} and forms one of {FORMS}.")
    try:
        for idx, probe in enumerate(probes):
            probe.form = forms.get(idx, "full")
        yield
    finally:
        for probe in probes:
            probe.form = "full"


def model_inputs(batch: Mapping, device: torch.device) -> dict:
    return {
        key: value.to(device) for key, value in batch.items() if key != "labels" and torch.is_tensor(value)
    }


def token_count(batch: Mapping) -> int:
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else batch["input_ids"].numel()


@torch.no_grad()
def answer_nll(model: nn.Module, batches: Iterable[Mapping], device: torch.device) -> float:
    """Mean next-token NLL of the labelled (answer) tokens over `batches`, weighted by their counts."""
    total, count = 0.0, 0
    for batch in batches:
        labels = batch["labels"].to(device)
        tokens = int(answer_positions(labels).sum())
        if tokens:
            logits = model(**model_inputs(batch, device), use_cache=False).logits
            total += float(token_cross_entropy(logits, labels)) * tokens
            count += tokens
    if not count:
        raise ValueError("The selection data has no labelled (answer) tokens to score layers by NLL.")
    return total / count


@torch.no_grad()
def measure_residuals(model: nn.Module, batches: Iterable[Mapping], device: torch.device) -> list[dict]:
    """Per layer, on the teacher's own input to it: the mean squared error of the linear and the window form
    against the teacher attention's output over real tokens (stage 1a's loss, unscaled)."""
    probes = probes_of(model)
    for probe in probes:
        probe.residuals = dict.fromkeys(probe.residuals, 0.0)
        probe.measuring = True
    try:
        for batch in batches:
            model(**model_inputs(batch, device), use_cache=False)
    finally:
        for probe in probes:
            probe.measuring = False
    return [
        {name: probe.residuals[name] / max(probe.residuals["elements"], 1) for name in ("linear", "window")}
        for probe in probes
    ]

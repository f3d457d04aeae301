"""Model surgery: build the hybrid of a loaded teacher model following a layer plan."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from hybridize.compat import no_init_weights
from hybridize.converters.discovery import attention_spec, find_decoder_layout
from hybridize.converters.hybrid_model import PLAN_KEY, hybrid_config_class, hybrid_model_class
from hybridize.converters.plan import LayerPlan
from hybridize.mixers.registry import get_mixer_class, mixer_config


@dataclass
class LayerConversion:
    layer: int
    mixer: str
    native: bool
    params_removed: int
    params_added: int


@dataclass
class ConversionReport:
    teacher_params: int
    hybrid_params: int
    layers: list[LayerConversion] = field(default_factory=list)

    @property
    def params_removed(self) -> int:
        return sum(layer.params_removed for layer in self.layers)

    @property
    def params_added(self) -> int:
        return sum(layer.params_added for layer in self.layers)

    def table(self) -> str:
        rows = [f"{'layer':>5}  {'mixer':<16} {'how':<8} {'params removed':>15} {'params added':>13}"]
        for item in self.layers:
            how = "config" if item.native else "module"
            rows.append(
                f"{item.layer:>5}  {item.mixer:<16} {how:<8} {item.params_removed:>15,} {item.params_added:>13,}"
            )
        rows.append(
            f"teacher {self.teacher_params:,} - removed {self.params_removed:,} + added {self.params_added:,}"
            f" = hybrid {self.hybrid_params:,} parameters"
        )
        return "\n".join(rows)


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def build_hybrid_config(teacher_config, plan: LayerPlan, specs, base_model: str | None = None):
    """The teacher's config as a hybrid config: native layers configured, mixer options resolved against the
    teacher's head layout (`specs`, one per layer), plan stored. Needs no weights, so it is also the check
    that a plan fits a model before anything is loaded."""
    if len(plan.layers) != len(specs):
        raise ValueError(f"The plan covers {len(plan.layers)} layers but the model has {len(specs)}.")
    values = teacher_config.to_dict()
    values.pop("model_type", None)
    values.pop(PLAN_KEY, None)
    config = hybrid_config_class(type(teacher_config))(**values)
    text_config = config.get_text_config(decoder=True)
    mixers, native = {}, []
    for name in dict.fromkeys(plan.layers):
        layers = plan.layers_with(name)
        try:
            # Every distinct head layout the mixer replaces must fit its options (one resolved config per mixer).
            resolved, *_ = [
                mixer_config(name, plan.mixers.get(name), spec)
                for spec in dict.fromkeys(specs[i] for i in layers)
            ]
        except ValueError as error:
            raise ValueError(f"mixer {name!r} (layers {layers}): {error}") from None
        mixers[name] = resolved.to_dict()
        if get_mixer_class(name).native_config_support:
            native += [
                idx for idx in layers if get_mixer_class(name).configure_natively(text_config, idx, resolved)
            ]
    stored = LayerPlan(
        layers=list(plan.layers), mixers=mixers, native_layers=sorted(native), ratio=plan.ratio
    )
    setattr(config, PLAN_KEY, {**stored.to_dict(), "base_model": base_model})
    return config


def convert(
    model: nn.Module, plan: LayerPlan, *, progress: bool = True
) -> tuple[nn.Module, ConversionReport]:
    """Return the hybrid of `model` (which is left untouched) and a report of what changed.

    Weights outside converted attention modules are copied; each new mixer is initialised from the
    teacher attention it replaces with its config's init policy.
    """
    layout = find_decoder_layout(model)
    if len(plan.layers) != len(layout.layers):
        raise ValueError(
            f"The plan covers {len(plan.layers)} layers but {type(model).__name__} has {len(layout.layers)}."
        )
    specs = [attention_spec(layout.attention(idx), layout.text_config) for idx in range(len(layout.layers))]
    config = build_hybrid_config(model.config, plan, specs, base_model=getattr(model, "name_or_path", None))
    stored = LayerPlan.from_dict(getattr(config, PLAN_KEY))
    parameter = next(model.parameters())
    with no_init_weights(), torch.device(parameter.device):
        hybrid = hybrid_model_class(type(model))._from_config(config, dtype=parameter.dtype)

    converted = [idx for idx in range(len(plan.layers)) if idx not in stored.native_layers]
    # The converted attention modules' own state-dict prefixes: a name pattern such as "layers.N.self_attn."
    # would also match a vision tower's encoder layers (LLaVA's CLIP) and silently drop their weights.
    module_names = {id(module): name for name, module in model.named_modules()}
    replaced = tuple(f"{module_names[id(layout.attention(idx))]}." for idx in converted)
    kept = {key: value for key, value in model.state_dict().items() if not key.startswith(replaced)}
    missing, unexpected = hybrid.load_state_dict(kept, strict=False)
    hybrid.tie_weights()  # built without init, so untied: a tied teacher (Qwen2.5-VL-3B's lm_head) stays tied
    stray = [key for key in missing + unexpected if not key.startswith(replaced)]
    if stray:  # keys may only differ inside converted attention modules; anything else is a surgery bug
        raise RuntimeError(f"Conversion changed weights outside the converted attention modules: {stray[:8]}")
    hybrid_buffers = dict(hybrid.named_buffers())
    for name, buffer in model.named_buffers():  # non-persistent buffers (rotary tables) are not in state_dict
        if name in hybrid_buffers and hybrid_buffers[name].shape == buffer.shape:
            hybrid_buffers[name].copy_(buffer)

    hybrid_layout = find_decoder_layout(hybrid)
    report = ConversionReport(teacher_params=_count(model), hybrid_params=_count(hybrid))
    for idx in tqdm(range(len(plan.layers)), desc="converting layers", disable=not progress):
        name = stored.layers[idx]
        teacher_attention = layout.attention(idx)
        if idx in converted:
            mixer = hybrid_layout.attention(idx)
            mixer.initialize_from_teacher(teacher_attention, stored.mixers[name].get("init", "mimic"))
            removed, added = _count(teacher_attention), _count(mixer)
        else:
            removed = added = 0
        report.layers.append(LayerConversion(idx, name, idx not in converted, removed, added))
    hybrid.train(model.training)
    hybrid.generation_config = copy.deepcopy(model.generation_config)
    return hybrid, report

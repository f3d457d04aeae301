"""Hybrid model classes: a subclass of the base model class that applies the layer plan in its config.

`Hybrid<Base>` is built by the base class's own `__init__` and then swaps the planned layers' attention
for mixers, so `from_pretrained`, `generate`, `save_pretrained` and the Auto classes work unchanged. Its
config class has model_type "hybrid_<base model_type>" and carries the plan under the `hybridize` key;
both are registered with transformers' Auto classes (no trust_remote_code) and with the base class's
checkpoint conversion mapping (without it, Qwen2.5-VL weights saved in the legacy layout would all
load as "missing").
"""

from __future__ import annotations

import functools

import transformers
from torch import nn
from transformers import (
    CONFIG_MAPPING,
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    PreTrainedConfig,
)

from hybridize.compat import auto_model_class, copy_checkpoint_conversion
from hybridize.converters.discovery import attention_spec, find_decoder_layout
from hybridize.converters.plan import LayerPlan
from hybridize.mixers.base import TokenMixer
from hybridize.mixers.registry import build_mixer, get_mixer_class

HYBRID_PREFIX = "hybrid_"
PLAN_KEY = "hybridize"
AUTO_CLASSES = (AutoModelForImageTextToText, AutoModelForCausalLM)


def layer_plan(config: PreTrainedConfig) -> LayerPlan:
    """The plan stored in a hybrid model's config."""
    data = getattr(config, PLAN_KEY, None)
    if not isinstance(data, dict):
        raise ValueError(
            f"{type(config).__name__} has no `{PLAN_KEY}` layer plan: this is not a hybridize checkpoint "
            "(convert a model first with `hybridize convert`)."
        )
    return LayerPlan.from_dict(data)


def apply_layer_plan(model: nn.Module) -> None:
    """Swap the attention of every planned, non-native layer for its mixer (default-initialised)."""
    plan = layer_plan(model.config)
    layout = find_decoder_layout(model)
    if len(plan.layers) != len(layout.layers):
        raise ValueError(
            f"The layer plan has {len(plan.layers)} layers but the model has {len(layout.layers)}."
        )
    for idx, name in enumerate(plan.layers):
        if idx in plan.native_layers:
            continue
        attention = layout.attention(idx)
        spec = attention_spec(attention, layout.text_config)
        layout.set_attention(
            idx, build_mixer(name, plan.mixers.get(name), spec, idx, _wrapped(name, attention))
        )


def _wrapped(name: str, attention: nn.Module) -> nn.Module | None:
    return attention if get_mixer_class(name).wraps_attention else None


@functools.cache
def hybrid_config_class(base_config_class: type[PreTrainedConfig]) -> type[PreTrainedConfig]:
    model_type = HYBRID_PREFIX + base_config_class.model_type
    config_class = type(
        f"Hybrid{base_config_class.__name__}", (base_config_class,), {"model_type": model_type}
    )
    config_class.__module__ = __name__
    globals()[config_class.__name__] = config_class  # found by name, as pickle looks classes up
    AutoConfig.register(model_type, config_class, exist_ok=True)
    return config_class


@functools.cache
def hybrid_model_class(base_model_class: type[nn.Module]) -> type[nn.Module]:
    """The hybrid subclass of a transformers model class, registered with the Auto classes."""
    config_class = hybrid_config_class(base_model_class.config_class)

    def __init__(self, config, *args, **kwargs):
        base_model_class.__init__(self, config, *args, **kwargs)
        apply_layer_plan(self)

    def _init_weights(self, module):
        # Mixer parameters missing from a checkpoint (A_log, dt_bias, ...) are unknown to the base class.
        if isinstance(module, TokenMixer):
            module.reset_parameters()
        else:
            base_model_class._init_weights(self, module)

    name = f"Hybrid{base_model_class.__name__}"
    model_class = type(
        name,
        (base_model_class,),
        {
            "config_class": config_class,
            "__init__": __init__,
            "_init_weights": _init_weights,
            "__module__": __name__,
        },
    )
    globals()[name] = model_class
    copy_checkpoint_conversion(base_model_class, name)
    for auto_class in AUTO_CLASSES:
        if auto_model_class(auto_class, base_model_class.config_class) is base_model_class:
            auto_class.register(config_class, model_class, exist_ok=True)
    return model_class


def __getattr__(name: str):
    """`Hybrid<transformers class>` made on first lookup: a process that unpickles a hybrid (a spawned training
    worker) finds its class here by name before anything in it has converted a model."""
    base = getattr(transformers, name.removeprefix("Hybrid"), None) if name.startswith("Hybrid") else None
    if isinstance(base, type) and issubclass(base, PreTrainedConfig):
        return hybrid_config_class(base)
    if isinstance(base, type) and issubclass(base, nn.Module) and hasattr(base, "config_class"):
        return hybrid_model_class(base)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def register_hybrid_family(base_model_type: str):
    """Register the hybrid config/model classes of a transformers model type; return the Auto class for them."""
    if base_model_type not in CONFIG_MAPPING:
        raise ValueError(
            f"transformers {transformers.__version__} does not know the model type {base_model_type!r}."
        )
    base_config_class = CONFIG_MAPPING[base_model_type]
    auto_class = generation_auto_class(base_config_class)
    hybrid_model_class(auto_model_class(auto_class, base_config_class))
    return auto_class


def generation_auto_class(config_class: type[PreTrainedConfig]):
    """The Auto class that builds the generation model (ForConditionalGeneration / ForCausalLM) of a config class."""
    for auto_class in AUTO_CLASSES:
        if auto_model_class(auto_class, config_class) is not None:
            return auto_class
    raise ValueError(
        f"No image-text-to-text or causal-LM model class is registered for {config_class.model_type!r}."
    )

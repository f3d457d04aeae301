"""Find the text decoder of a Hugging Face model, its layers and what each attention module looks like."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from hybridize.compat import auto_model_class, set_attention_implementation
from hybridize.mixers.base import AttentionSpec, TokenMixer

ATTENTION_ATTRIBUTE = "self_attn"


@dataclass
class DecoderLayout:
    """The parts of a model that conversion touches."""

    text_config: object
    decoder: nn.Module
    layers: nn.ModuleList

    def attention(self, layer_idx: int) -> nn.Module:
        return getattr(self.layers[layer_idx], ATTENTION_ATTRIBUTE)

    def set_attention(self, layer_idx: int, module: nn.Module) -> None:
        setattr(self.layers[layer_idx], ATTENTION_ATTRIBUTE, module)


def find_decoder_layout(model: nn.Module) -> DecoderLayout:
    """Locate the text decoder through `get_decoder()` and check every layer has an attention module."""
    name = type(model).__name__
    get_decoder = getattr(model, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) else None
    if decoder is None:
        raise ValueError(f"{name} has no text decoder (get_decoder() is missing or returned None).")
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise ValueError(
            f"The decoder of {name} ({type(decoder).__name__}) has no `layers` list of decoder layers."
        )
    for idx, layer in enumerate(layers):
        if not isinstance(getattr(layer, ATTENTION_ATTRIBUTE, None), nn.Module):
            raise ValueError(
                f"Decoder layer {idx} of {name} has no `{ATTENTION_ATTRIBUTE}` attention module."
            )
    text_config = model.config.get_text_config(decoder=True)
    return DecoderLayout(text_config=text_config, decoder=decoder, layers=layers)


def attention_configs(model: nn.Module) -> list:
    """The config objects the text decoder's attention reads its implementation from: the text config and the
    decoder's (the masks it builds) and every one inside its layers (a kept layer, a mixer's wrapped attention, a
    distillation teacher's copy, which may carry their own). The vision tower keeps its own."""
    layout = find_decoder_layout(model)
    configs = [layout.text_config, getattr(layout.decoder, "config", layout.text_config)]
    for layer in layout.layers:
        for module in layer.modules():
            config = getattr(module, "config", None)
            if config is not None and hasattr(config, "_attn_implementation"):
                configs.append(config)
    return list({id(config): config for config in configs}.values())


def use_attention_implementation(model: nn.Module, name: str) -> None:
    """Point the text decoder's attention (`attention_configs`) at the implementation `name`."""
    for config in attention_configs(model):
        set_attention_implementation(config, name)


def attention_spec(attention: nn.Module, text_config) -> AttentionSpec:
    """Head layout, biases, q/k norms and rotary kind of one teacher attention module."""
    if isinstance(attention, TokenMixer):
        return attention.spec
    missing = [
        p
        for p in ("q_proj", "k_proj", "v_proj", "o_proj")
        if not isinstance(getattr(attention, p, None), nn.Linear)
    ]
    if missing:
        raise ValueError(
            f"{type(attention).__name__} has no separate {', '.join(missing)} projection(s); "
            "hybridize converts attention modules with q_proj, k_proj, v_proj and o_proj linear layers."
        )
    head_dim = getattr(attention, "head_dim", None) or getattr(text_config, "head_dim", None)
    head_dim = head_dim or text_config.hidden_size // text_config.num_attention_heads
    num_heads, rest_q = divmod(attention.q_proj.out_features, head_dim)
    num_kv_heads, rest_k = divmod(attention.k_proj.out_features, head_dim)
    if rest_q or rest_k or num_kv_heads == 0 or num_heads % num_kv_heads:
        raise ValueError(
            f"{type(attention).__name__}'s q_proj ({attention.q_proj.out_features}) and k_proj "
            f"({attention.k_proj.out_features}) outputs are not whole heads of {head_dim} in groups of query "
            "heads per key/value head; hybridize needs standard multi-head or grouped-query attention."
        )
    return AttentionSpec(
        hidden_size=attention.q_proj.in_features,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        qkv_bias=attention.q_proj.bias is not None,
        qk_norm=hasattr(attention, "q_norm"),
        rope=rotary_kind(text_config),
        rms_norm_eps=getattr(text_config, "rms_norm_eps", 1e-6),
    )


def rotary_kind(text_config) -> str:
    """ "mrope" for Qwen-VL multimodal rotary (3-D positions, plain or interleaved sections), else "rope"."""
    rope = getattr(text_config, "rope_parameters", None) or {}
    # Families with several layer types keep one rotary setting per type.
    settings = rope.values() if all(isinstance(value, dict) for value in rope.values()) and rope else [rope]
    return "mrope" if any("mrope_section" in setting for setting in settings) else "rope"


def layer_specs(config) -> list[AttentionSpec]:
    """The attention layout of every decoder layer of a model config, read from a weightless (meta-device)
    instance: the check that a model can be converted, before any weights are loaded."""
    from hybridize.converters.hybrid_model import generation_auto_class

    model_class = auto_model_class(generation_auto_class(type(config)), type(config))
    with torch.device("meta"):
        model = model_class._from_config(config)
    layout = find_decoder_layout(model)
    return [attention_spec(layout.attention(idx), layout.text_config) for idx in range(len(layout.layers))]

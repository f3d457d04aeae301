"""Find the text decoder of a Hugging Face model, its layers and what each attention module looks like."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

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
    rope = getattr(text_config, "rope_parameters", None) or {}
    return AttentionSpec(
        hidden_size=attention.q_proj.in_features,
        num_heads=attention.q_proj.out_features // head_dim,
        num_kv_heads=attention.k_proj.out_features // head_dim,
        head_dim=head_dim,
        qkv_bias=attention.q_proj.bias is not None,
        qk_norm=hasattr(attention, "q_norm"),
        rope="mrope" if "mrope_section" in rope else "rope",
        rms_norm_eps=getattr(text_config, "rms_norm_eps", 1e-6),
    )

"""The mixer contract: what a token mixer receives from the decoder layer and what it knows of its teacher.

A mixer takes the place of a decoder layer's `self_attn`. Transformers 5.x decoder layers call
`self_attn(hidden_states=..., attention_mask=..., position_ids=..., past_key_values=..., use_cache=...,
position_embeddings=(cos, sin), **kwargs)` with keywords only and use the first returned value, so a mixer
returns `(output, None)` with output shaped like hidden_states.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from hybridize.mixers.cache import mixer_cache_layer
from hybridize.mixers.masks import key_padding_mask

INIT_POLICIES = ("mimic", "attention_transfer")


@dataclass(frozen=True)
class AttentionSpec:
    """What a mixer needs to know about the teacher attention it replaces."""

    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    qkv_bias: bool = False
    qk_norm: bool = False
    rope: str = "rope"  # "rope" (1-D) or "mrope" (Qwen-VL multimodal rotary)
    rms_norm_eps: float = 1e-6

    @property
    def kv_groups(self) -> int:
        return self.num_heads // self.num_kv_heads


@dataclass
class MixerConfig:
    """Base of every mixer's config. Fields left as None are derived from the teacher by `resolve`."""

    def resolve(self, spec: AttentionSpec) -> MixerConfig:
        """Return a copy with every teacher-derived default filled in and the values checked."""
        return dataclasses.replace(self)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class TokenMixer(nn.Module):
    """Base of every mixer that replaces a decoder layer's attention module.

    Subclasses set `config_class`, build their parameters from a resolved config and an `AttentionSpec`,
    and implement `forward`, `reset_parameters` (the default initialisation, also used by
    `from_pretrained` for missing weights) and `initialize_from_teacher` (the weight-transfer policy).
    Buffers must be persistent (saved with the weights): `from_pretrained` builds the model on the meta
    device and does not recompute the non-persistent buffers of modules it does not know.
    """

    name: ClassVar[str] = ""
    config_class: ClassVar[type[MixerConfig]] = MixerConfig
    # A mixer whose conversion is a config change on families that support it natively (sliding window on
    # Qwen2-family models) says so here; the converter then edits the config instead of swapping modules.
    native_config_support: ClassVar[bool] = False
    # A mixer that wraps the layer's own attention module (instead of replacing it) receives it as `attention`.
    wraps_attention: ClassVar[bool] = False
    # Kernel libraries with a fast path for this mixer, in order of preference (see ops/backends.py); the
    # pure-PyTorch reference ("torch") is always there.
    kernels: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self, config: MixerConfig, spec: AttentionSpec, layer_idx: int, attention: nn.Module | None = None
    ):
        super().__init__()
        self.config = config
        self.spec = spec
        self.layer_idx = layer_idx

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: Any = None,
        use_cache: bool | None = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        raise NotImplementedError

    def reset_parameters(self) -> None:
        """Default initialisation of the mixer's own parameters (no teacher)."""
        raise NotImplementedError

    @torch.no_grad()
    def initialize_from_teacher(self, teacher_attention: nn.Module, policy: str) -> None:
        """Initialise from the teacher attention module this mixer replaces, following `policy`."""
        raise NotImplementedError

    def begin_recurrent_forward(self, hidden_states, attention_mask, past_key_values):
        """The common start of a recurrent mixer's forward: recover padding from the attention mask and zero
        the padded positions' inputs, and find this layer's state slot in the cache.

        Returns (hidden_states, valid (B, T) bool or None when nothing is padded, cache slot or None, its
        states dict, empty without a cache). The mixer must also neutralise its decay/write at invalid
        positions, so that (left) padding leaves its states exactly as without it.
        """
        valid = key_padding_mask(attention_mask, hidden_states.shape[1])
        if valid is not None:
            hidden_states = hidden_states * valid[..., None].to(hidden_states.dtype)
        cache = mixer_cache_layer(past_key_values, self.layer_idx)
        return hidden_states, valid, cache, (cache.states if cache is not None else {})

    @classmethod
    def configure_natively(cls, text_config: Any, layer_idx: int, config: MixerConfig) -> bool:
        """Edit `text_config` so the model builds this layer itself; return False when it cannot."""
        return False

    def extra_repr(self) -> str:
        return f"layer_idx={self.layer_idx}, {self.config}"

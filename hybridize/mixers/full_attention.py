"""The teacher's attention layer kept as it is (`full_attention`), so any layer map can be written out in full.

Conversion is a no-op for these layers (the converter keeps the module and its weights, `native` in the
plan); built on its own, the mixer is a transparent wrapper around the attention module it is given.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from hybridize.compat import cache_argument
from hybridize.mixers.base import MixerConfig, TokenMixer
from hybridize.mixers.registry import register_mixer


@dataclass
class FullAttentionConfig(MixerConfig):
    """No options: the layer is the teacher's."""


@register_mixer("full_attention")
class FullAttentionMixer(TokenMixer):
    config_class = FullAttentionConfig
    native_config_support = True
    wraps_attention = True

    def __init__(self, config: FullAttentionConfig, spec, layer_idx: int, attention: nn.Module):
        super().__init__(config, spec, layer_idx, attention)
        self.attention = attention

    @classmethod
    def configure_natively(cls, text_config, layer_idx: int, config: FullAttentionConfig) -> bool:
        return True  # nothing to change: the model builds this layer's attention itself

    def reset_parameters(self) -> None:
        """The wrapped teacher attention keeps its own weights."""

    @torch.no_grad()
    def initialize_from_teacher(self, teacher_attention: nn.Module, policy: str) -> None:
        self.attention.load_state_dict(teacher_attention.state_dict())

    def forward(self, hidden_states: torch.Tensor, cache=None, **kwargs) -> tuple[torch.Tensor, None]:
        return self.attention(hidden_states=hidden_states, **cache_argument(cache), **kwargs)[0], None

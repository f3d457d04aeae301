"""Token mixers that take the place of a decoder layer's attention, and their registry."""

from hybridize.mixers.base import INIT_POLICIES, AttentionSpec, MixerConfig, TokenMixer
from hybridize.mixers.cache import MixerCacheLayer
from hybridize.mixers.full_attention import FullAttentionConfig, FullAttentionMixer
from hybridize.mixers.gated_deltanet import GatedDeltaNetConfig, GatedDeltaNetMixer
from hybridize.mixers.registry import (
    available_mixers,
    build_mixer,
    get_mixer_class,
    mixer_config,
    register_mixer,
)
from hybridize.mixers.sliding_window import SlidingWindowConfig, SlidingWindowMixer

__all__ = [
    "INIT_POLICIES",
    "AttentionSpec",
    "FullAttentionConfig",
    "FullAttentionMixer",
    "GatedDeltaNetConfig",
    "GatedDeltaNetMixer",
    "MixerCacheLayer",
    "MixerConfig",
    "SlidingWindowConfig",
    "SlidingWindowMixer",
    "TokenMixer",
    "available_mixers",
    "build_mixer",
    "get_mixer_class",
    "mixer_config",
    "register_mixer",
]

"""Token mixers that take the place of a decoder layer's attention, and their registry."""

from hybridize.mixers.base import INIT_POLICIES, AttentionSpec, MixerConfig, TokenMixer
from hybridize.mixers.cache import MixerCacheLayer, mixer_cache_layer
from hybridize.mixers.full_attention import FullAttentionConfig, FullAttentionMixer
from hybridize.mixers.gated_deltanet import GatedDeltaNetConfig, GatedDeltaNetMixer
from hybridize.mixers.gla import GLAConfig, GLAMixer
from hybridize.mixers.mamba2 import Mamba2Config, Mamba2Mixer
from hybridize.mixers.masks import key_padding_mask
from hybridize.mixers.registry import (
    available_mixers,
    build_mixer,
    get_mixer_class,
    mixer_config,
    register_mixer,
)
from hybridize.mixers.sliding_window import SlidingWindowConfig, SlidingWindowMixer
from hybridize.mixers.transfer import TeacherProjections, teacher_projections

__all__ = [
    "INIT_POLICIES",
    "AttentionSpec",
    "FullAttentionConfig",
    "FullAttentionMixer",
    "GatedDeltaNetConfig",
    "GatedDeltaNetMixer",
    "GLAConfig",
    "GLAMixer",
    "Mamba2Config",
    "Mamba2Mixer",
    "MixerCacheLayer",
    "MixerConfig",
    "SlidingWindowConfig",
    "SlidingWindowMixer",
    "TeacherProjections",
    "TokenMixer",
    "available_mixers",
    "build_mixer",
    "get_mixer_class",
    "key_padding_mask",
    "mixer_cache_layer",
    "mixer_config",
    "register_mixer",
    "teacher_projections",
]

"""Sliding-window attention (SWA): the teacher's softmax attention, restricted to the last `window` tokens.

Where the model family supports per-layer sliding windows (the Qwen2 family: `layer_types` and
`sliding_window` in the text config), conversion is a config change and the model's own attention, masks
and `DynamicSlidingWindowLayer` cache slot do the work. Elsewhere this mixer wraps the teacher's attention
module, hands it a sliding causal mask and keeps only `window - 1` past keys in the cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from hybridize.compat import cache_argument, configured_attention
from hybridize.mixers.base import AttentionSpec, MixerConfig, TokenMixer
from hybridize.mixers.cache import SlidingWindowSlot, WindowSlot
from hybridize.mixers.flash_window import FLASH_WINDOW
from hybridize.mixers.masks import band_mask, key_padding_mask
from hybridize.mixers.registry import register_mixer

IMPLEMENTATIONS = ("auto", "native", "mixer")


@dataclass
class SlidingWindowConfig(MixerConfig):
    window: int = 8192
    implementation: str = "auto"  # "auto" (native where supported), "native" or "mixer"

    def resolve(self, spec: AttentionSpec) -> SlidingWindowConfig:
        if not isinstance(self.window, int) or self.window <= 0:
            raise ValueError(f"window must be a positive number of tokens, got {self.window!r}.")
        if self.implementation not in IMPLEMENTATIONS:
            raise ValueError(f"implementation={self.implementation!r} is not one of {IMPLEMENTATIONS}.")
        return SlidingWindowConfig(**self.to_dict())


def supports_native_sliding_window(text_config) -> bool:
    """Families whose attention reads a per-layer window from `layer_types` (Qwen2, Qwen2/2.5-VL, Qwen3)."""
    return isinstance(getattr(text_config, "layer_types", None), list) and hasattr(
        text_config, "sliding_window"
    )


@register_mixer("sliding_window")
class SlidingWindowMixer(TokenMixer):
    config_class = SlidingWindowConfig
    native_config_support = True
    wraps_attention = True

    def __init__(
        self, config: SlidingWindowConfig, spec: AttentionSpec, layer_idx: int, attention: nn.Module
    ):
        super().__init__(config, spec, layer_idx, attention)
        self.attention = attention
        self.window = config.window
        if hasattr(attention, "sliding_window"):  # Qwen2-family modules hand it to flash implementations
            attention.sliding_window = config.window

    @classmethod
    def configure_natively(cls, text_config, layer_idx: int, config: SlidingWindowConfig) -> bool:
        if config.implementation == "mixer":
            return False
        if not supports_native_sliding_window(text_config):
            if config.implementation == "native":
                raise ValueError(
                    f"{type(text_config).__name__} has no per-layer sliding window; use implementation='mixer'."
                )
            return False
        current = text_config.sliding_window if "sliding_attention" in text_config.layer_types else None
        if current is not None and current != config.window:
            raise ValueError(
                f"The config already has sliding-window layers with window {current}; a native window of "
                f"{config.window} for layer {layer_idx} would change them. Use one window per model."
            )
        if hasattr(text_config, "use_sliding_window"):
            # Without it Qwen2-family configs silently drop the window when they are loaded again.
            text_config.use_sliding_window = True
        text_config.sliding_window = config.window
        text_config.layer_types[layer_idx] = "sliding_attention"
        return True

    def reset_parameters(self) -> None:
        """The wrapped teacher attention keeps its own weights."""

    @torch.no_grad()
    def initialize_from_teacher(self, teacher_attention: nn.Module, policy: str) -> None:
        self.attention.load_state_dict(teacher_attention.state_dict())

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache=None,
        use_cache: bool | None = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, None]:
        slot = self._cache_slot(cache)
        decode_mask = slot.decode_mask() if slot is not None else None
        if decode_mask is not None:
            # A static cache's decode step (hybridize.inference.static_cache): its ring buffer of `window` slots
            # says which hold real tokens with device tensors alone, so that the step can be a CUDA graph.
            mask = decode_mask
        elif slot is None and configured_attention(self.attention.config) == FLASH_WINDOW:
            # The flash-window implementation applies the window itself to the model's key-padding mask.
            mask = attention_mask
            if not hasattr(self.attention, "sliding_window"):  # modules that have it pass it on themselves
                kwargs = {**kwargs, "sliding_window": self.window}
        else:
            mask = self._prefill_mask(hidden_states, attention_mask, slot)
        out, _ = self.attention(
            hidden_states=hidden_states,
            attention_mask=mask,
            position_ids=position_ids,
            use_cache=use_cache,
            **cache_argument(cache),
            position_embeddings=position_embeddings,
            **kwargs,
        )
        return out, None

    def _prefill_mask(self, hidden_states: torch.Tensor, attention_mask, slot):
        """The mask for these tokens: the model's causal mask while every key is inside the window, else a
        sliding mask built from the padding of the cached keys (tracked on the slot) and of these tokens."""
        batch, length, _ = hidden_states.shape
        valid = key_padding_mask(attention_mask, length)
        if valid is None:
            valid = torch.ones(batch, length, dtype=torch.bool, device=hidden_states.device)
        if slot is None:
            kv_length, kv_offset, seen, keys_valid = length, 0, 0, valid
        else:
            kv_length, kv_offset = slot.get_mask_sizes(length)
            seen = slot.get_seq_length()
            keys_valid = torch.cat([slot.past_key_padding(valid), valid], dim=1)[:, -kv_length:]
            slot.record_key_padding(keys_valid[:, -(self.window - 1) :] if self.window > 1 else valid[:, :0])
        # Every key inside the window: the model's causal mask is right if it spans these queries and keys (a
        # static cache hands mixers only the new tokens' padding).
        spans = attention_mask is None or (
            attention_mask.shape[-1] == kv_length
            and (attention_mask.dim() != 4 or attention_mask.shape[-2] == length)
        )
        if seen + length <= self.window and spans:
            return attention_mask
        return self._sliding_mask(keys_valid, seen, length, kv_offset, hidden_states)

    def _cache_slot(self, cache):
        if cache is None:
            return None
        layers = cache.layers
        while len(layers) <= self.layer_idx:
            layers.append(cache.layer_class_to_replicate())
        slot = layers[self.layer_idx]
        if isinstance(slot, WindowSlot):  # ours from an earlier call, or a static cache's ring buffer
            return slot
        if slot.get_seq_length() > 0:
            raise RuntimeError(
                f"Cache slot {self.layer_idx} holds a {type(slot).__name__} that another layer filled; the "
                "sliding_window mixer keeps its keys in a WindowSlot (check that the cache was built for this model)."
            )
        layers[self.layer_idx] = SlidingWindowSlot(self.window)
        return layers[self.layer_idx]

    def _sliding_mask(self, keys_valid, seen: int, length: int, kv_offset: int, like: torch.Tensor):
        """(B, 1, length, kv) mask in the form the attention implementation expects."""
        device = like.device
        query_pos = torch.arange(seen, seen + length, device=device)
        key_pos = torch.arange(kv_offset, kv_offset + keys_valid.shape[1], device=device)
        allowed = band_mask(query_pos, key_pos, self.window)[None, None] & keys_valid[:, None, None, :]
        # A padding query with no real key in reach would give NaN in SDPA; let it see everything instead.
        allowed = allowed | ~allowed.any(-1, keepdim=True)
        implementation = configured_attention(self.attention.config)
        if implementation == "sdpa":
            return allowed
        if implementation == "eager":
            return torch.zeros(allowed.shape, dtype=like.dtype, device=device).masked_fill(
                ~allowed, torch.finfo(like.dtype).min
            )
        raise NotImplementedError(
            f"The sliding_window mixer builds its own mask for 'sdpa' and 'eager' attention (and, without a cache, "
            f"{FLASH_WINDOW!r}), not {implementation!r}; load the model with attn_implementation='sdpa'."
        )

"""Recurrent and convolution state of a mixer, kept in its layer's slot of the transformers cache.

`generate()` builds a `DynamicCache` with one slot per decoder layer. A mixer swaps its slot for a
`MixerCacheLayer` the first time it runs with a cache. The slot subclasses `DynamicLayer` (a regular
attention slot to transformers) so that `get_seq_length()` and the mask sizes keep working whichever
layers are linear, including a model with no attention layer left; its tensors are the mixer's states
instead of keys and values. (Marking the layer type "linear_attention" in the config instead breaks the
Qwen2-family mask lookup, and transformers' own linear-attention slots cannot report a sequence length.)
"""

from __future__ import annotations

import torch

from hybridize.compat import DynamicLayer, DynamicSlidingWindowLayer


class MixerCacheLayer(DynamicLayer):
    """One layer's mixer states (name -> tensor, batch first) and the number of tokens they have seen.

    `in_place=True` (static caches, see `hybridize.inference.static_cache`): once a state exists, new values are
    copied into it, so its address never changes and a CUDA graph captured over it stays valid; the cache keeps
    `seen_tokens` for all its layers.
    """

    is_croppable = False

    def __init__(self, in_place: bool = False) -> None:
        super().__init__()
        self.states: dict[str, torch.Tensor] = {}
        self.seen_tokens = 0
        self.in_place = in_place

    def store(self, **states: torch.Tensor) -> None:
        """Keep a mixer's new states: they replace the old ones, or are copied into them when `in_place`."""
        for name, value in states.items():
            held = self.states.get(name)
            if not self.in_place:
                self.states[name] = value
            elif held is None:
                self.states[name] = value.clone(memory_format=torch.contiguous_format)
            else:
                held.copy_(value)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        raise RuntimeError(
            "A MixerCacheLayer holds a token mixer's recurrent state, not keys and values; an attention module "
            "was given a linear mixer's cache slot (check that the layer plan matches the model)."
        )

    def get_seq_length(self) -> int:
        return self.seen_tokens

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen_tokens + query_length, 0

    def advance(self, num_tokens: int) -> None:
        # A static cache counts tokens for all its layers (and not inside a captured step).
        if not self.in_place:
            self.seen_tokens += num_tokens

    def reset(self) -> None:
        for state in self.states.values():
            state.zero_()
        self.seen_tokens = 0

    def crop(self, tokens_to_remove: int) -> None:
        raise RuntimeError("A recurrent mixer state cannot be cropped back to an earlier token.")

    def _map_states(self, fn) -> None:
        self.states = {name: fn(state) for name, state in self.states.items()}

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_states(lambda s: s.index_select(0, beam_idx.to(s.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_states(lambda s: s.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_states(lambda s: s[indices])

    def offload(self) -> None:
        self._map_states(lambda s: s.to("cpu", non_blocking=True))

    def prefetch(self) -> None:
        if self.states:
            device = next(iter(self.states.values())).device
            if device != getattr(self, "device", device):
                self._map_states(lambda s: s.to(self.device, non_blocking=True))


def mixer_cache_layer(cache, layer_idx: int) -> MixerCacheLayer | None:
    """This layer's mixer slot in the model's `cache`, swapped in on first use; None without a cache."""
    if cache is None:
        return None
    layers = cache.layers
    while len(layers) <= layer_idx:  # caches built without a config grow their slots lazily
        layers.append(cache.layer_class_to_replicate())
    if not isinstance(layers[layer_idx], MixerCacheLayer):
        if layers[layer_idx].get_seq_length() > 0:
            raise RuntimeError(
                f"Cache slot {layer_idx} already holds attention keys/values but layer {layer_idx} is a linear "
                "mixer: the cache was filled by a model with a different layer plan."
            )
        layers[layer_idx] = MixerCacheLayer()
    return layers[layer_idx]


class WindowSlot:
    """What the `sliding_window` mixer asks of its layer's cache slot, beside transformers' cache-layer methods: the
    mask of a static decode step, and the padding of the cached keys that the next tokens can reach (the model's
    masks cover only the new tokens once a window has slid). Cache layers mix it in: `SlidingWindowSlot` for
    generate()'s DynamicCache, `hybridize.inference.static_cache.StaticAttentionLayer` for static decoding."""

    def decode_mask(self) -> torch.Tensor | None:
        """(B, 1, 1, slots) bool, True at slots that hold real tokens, during a static decode step; else None."""
        return None

    def past_key_padding(self, like: torch.Tensor) -> torch.Tensor:
        """(B, kept) bool: which of the cached keys the next tokens get are real tokens (`like`: a (B, T) bool
        tensor of the new tokens, for the empty case)."""
        raise NotImplementedError

    def record_key_padding(self, keys_valid: torch.Tensor) -> None:
        """Keep the padding of the last window - 1 keys, (B, kept) bool, for the next call. A slot whose cache
        tracks which slots are real (the static cache) has it already and ignores this."""


class SlidingWindowSlot(WindowSlot, DynamicSlidingWindowLayer):
    """transformers' growing sliding-window cache layer, plus the padding of the keys it keeps."""

    def __init__(self, sliding_window: int):
        super().__init__(sliding_window=sliding_window)
        self.key_padding: torch.Tensor | None = None

    def past_key_padding(self, like: torch.Tensor) -> torch.Tensor:
        return like[:, :0] if self.key_padding is None else self.key_padding

    def record_key_padding(self, keys_valid: torch.Tensor) -> None:
        self.key_padding = keys_valid

    # Batch edits (beam search, contrastive search) apply to the padding rows as to the keys.
    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self.key_padding is not None:
            self.key_padding = self.key_padding.index_select(0, beam_idx.to(self.key_padding.device))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.key_padding is not None:
            self.key_padding = self.key_padding.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        if self.key_padding is not None:
            self.key_padding = self.key_padding[indices]

"""A preallocated cache with fixed tensor addresses, so that a decode step can be captured in a CUDA graph.

Each decoder layer gets a slot by what it computes:
- softmax attention keeps keys and values in a buffer of `capacity` slots, token i (counting left padding)
  in slot i % capacity: a ring of `window` slots for sliding-window layers, `max_length` slots for full
  attention;
- a linear mixer keeps its states (recurrent in fp32, conv) in a `MixerCacheLayer` that overwrites them in
  place (`in_place=True`); they are allocated by the first prefill.

The cache works in two modes. Prefill (eager, any number of tokens): each attention layer gets the cached
keys in order followed by the new ones and reports the mask sizes of transformers' dynamic layers
(`DynamicSlidingWindowLayer`, `DynamicLayer`), so the model's own masks apply. Decode (`decoding`, one
token): everything that changes from step to step lives in device tensors updated in place - the slot the
new token is written to (`length % capacity`), which slots hold real tokens (`valid`: left padding never
does, until a real token overwrites it) and the next token's position ids - so the step can be replayed.
`hybridize.inference.decode.StaticDecoder` drives both.

Rows can also come and go while the others decode: `load_row` puts a sequence prefilled alone (in a one-row cache)
into a free row, `release_row` frees one. All rows write to the same slot at each step, so an admitted row's
tokens are laid into the slots just before it, and every capacity behaves as a ring for each row: a full-attention
row stays exact while it holds at most `max_length` tokens of its own (`row_tokens`).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from hybridize.compat import Cache, DynamicLayer
from hybridize.converters.discovery import attention_spec, find_decoder_layout
from hybridize.mixers.base import TokenMixer
from hybridize.mixers.cache import MixerCacheLayer, WindowSlot
from hybridize.mixers.full_attention import FullAttentionMixer
from hybridize.mixers.sliding_window import SlidingWindowMixer

LINEAR, SLIDING, FULL = "linear", "sliding", "full"


@dataclass(frozen=True)
class LayerLayout:
    """What one decoder layer keeps: `kind` is "linear" (mixer states), "sliding" (a ring of `capacity` =
    window slots) or "full" (`capacity` = max_length slots); attention layers also give their key/value heads."""

    kind: str
    capacity: int = 0
    kv_heads: int = 0
    head_dim: int = 0


def layer_layouts(model: nn.Module, max_length: int) -> list[LayerLayout]:
    """The layout of every decoder layer of `model` (a hybrid or a stock transformers decoder)."""
    layout = find_decoder_layout(model)
    text_config = layout.text_config
    layer_types = getattr(text_config, "layer_types", None)
    layouts = []
    for idx in range(len(layout.layers)):
        module = layout.attention(idx)
        if isinstance(module, TokenMixer) and not module.wraps_attention:
            layouts.append(LayerLayout(LINEAR))
            continue
        spec = attention_spec(module, text_config)
        if isinstance(module, SlidingWindowMixer):
            kind, capacity = SLIDING, module.window
        elif (
            isinstance(module, FullAttentionMixer) or not layer_types or layer_types[idx] == "full_attention"
        ):
            kind, capacity = FULL, max_length
        elif layer_types[idx] == "sliding_attention":
            kind, capacity = SLIDING, text_config.sliding_window
        else:
            raise NotImplementedError(
                f"Layer {idx} has layer type {layer_types[idx]!r}; the static cache keeps 'full_attention' and "
                "'sliding_attention' layers and hybridize's mixers."
            )
        layouts.append(LayerLayout(kind, capacity, spec.num_kv_heads, spec.head_dim))
    return layouts


class StaticAttentionLayer(WindowSlot, DynamicLayer):
    """Keys and values of one softmax attention layer in a buffer of `capacity` slots (B, heads, capacity, D).

    A `DynamicLayer` to transformers (an ordinary attention slot); `is_sliding` for ring buffers, which the mask
    functions look for; a `WindowSlot` to the sliding-window mixer (its decode mask, the padding of its keys).
    """

    is_croppable = False

    @property
    def cache(self) -> StaticHybridCache:
        return self._cache()

    def __init__(self, cache: StaticHybridCache, layout: LayerLayout):
        super().__init__()
        # weakly: a strong reference back would make every cache a reference cycle, its GPU buffers freed only
        # when Python's cycle collector happens to run, not when the last user lets go of it
        self._cache = weakref.ref(cache)
        self.capacity = layout.capacity
        self.window = layout.capacity if layout.kind == SLIDING else None
        self.is_sliding = self.window is not None
        shape = (cache.batch_size, layout.kv_heads, layout.capacity, layout.head_dim)
        self.keys = torch.zeros(shape, dtype=cache.dtype, device=cache.device)
        self.values = torch.zeros(shape, dtype=cache.dtype, device=cache.device)
        self.dtype, self.device = cache.dtype, cache.device
        self.is_initialized = True

    def decode_mask(self) -> torch.Tensor | None:
        """(B, 1, 1, capacity) bool, True at slots that hold real tokens, while the cache decodes; else None."""
        return self.cache.decode_masks[self.capacity] if self.cache.decoding else None

    def past_key_padding(self, like: torch.Tensor) -> torch.Tensor:
        """(B, kept) bool: which of the cached keys a prefill gets (see `update`) are real tokens, from the cache's
        `valid` (so `record_key_padding` has nothing to keep)."""
        return self.cache.valid[self.capacity][:, self._past_slots()]

    def _reach(self) -> int:
        """How many cached keys new tokens can reach: window - 1, or every slot of a full-attention buffer."""
        return self.capacity if self.window is None else self.window - 1

    def _past_slots(self) -> torch.Tensor:
        """The slots of the cached keys a prefill hands attention, oldest first: those of the tokens it can reach
        or, under `StaticHybridCache.fixed_window_prefill`, the `window - 1` most recent slots whether they hold a
        token yet or not (a fixed shape, found from the device-side count alone)."""
        if self.cache.fixed_window:
            return self.cache.slots(-self._reach(), 0, self.capacity)
        seen = self.cache.seen_tokens
        kept = min(seen, self._reach())
        return torch.arange(seen - kept, seen, device=self.device) % self.capacity

    def empty_slots(self) -> torch.Tensor:
        """() int32 device tensor: how many of the `window - 1` slots a fixed-window prefill hands attention hold no
        token yet (they come first)."""
        return (self.window - 1 - self.cache.length).clamp(min=0).to(torch.int32)

    def kept(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values (B, heads, kept, D) of the tokens new ones can reach, oldest first."""
        past = self.cache.slots(-min(self.cache.seen_tokens, self._reach()), 0, self.capacity)
        return self.keys.index_select(2, past), self.values.index_select(2, past)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self.cache.decoding:  # (B, heads, 1, D) into the step's slot; attention reads the whole buffer
            slot = self.cache.write_slots[self.capacity]
            self.keys.index_copy_(2, slot, key_states)
            self.values.index_copy_(2, slot, value_states)
            return self.keys, self.values
        length = key_states.shape[-2]
        past = self._past_slots()
        keys = torch.cat([self.keys.index_select(2, past), key_states], dim=-2)
        values = torch.cat([self.values.index_select(2, past), value_states], dim=-2)
        written = min(length, self.capacity)  # only the newest `capacity` tokens stay
        slots = self.cache.slots(length - written, length, self.capacity)
        self.keys.index_copy_(2, slots, key_states[:, :, length - written :])
        self.values.index_copy_(2, slots, value_states[:, :, length - written :])
        return keys, values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        seen = self.cache.seen_tokens
        if self.cache.fixed_window:
            return self.window - 1 + query_length, seen - self.window + 1
        if self.window is None:
            return seen + query_length, 0
        kv_offset = max(seen - self.window + 1, 0)
        return min(seen, self.window - 1) + query_length, kv_offset

    def get_seq_length(self) -> int:
        return self.cache.seen_tokens

    def get_max_length(self) -> int:
        return -1 if self.window is not None else self.capacity

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Allocated up front: nothing to do."""

    def reset(self) -> None:
        self.keys.zero_()
        self.values.zero_()

    def crop(self, tokens_to_remove: int) -> None:
        raise RuntimeError(
            "A static cache cannot be cropped; copy an earlier state back with copy_from instead."
        )

    def _unsupported(self, *args, **kwargs) -> None:
        raise RuntimeError(
            "A static cache keeps a fixed batch; build one per batch size (beam search is not supported)."
        )

    reorder_cache = batch_repeat_interleave = batch_select_indices = offload = _unsupported


class StaticHybridCache(Cache):
    """Preallocated per-layer state for decoding `batch_size` sequences of up to `max_length` tokens (the
    bound only matters for full-attention layers; sliding-window and linear layers take any length).

    Build it with `StaticHybridCache.for_model(model, batch_size, max_length)`. Device state: `length` (tokens
    written, padding included), `position` (the next token's position ids, shaped as the model takes them for
    one token: (B, 1), or (3|4, B, 1) for Qwen-VL M-RoPE), `valid` (per capacity, (B, capacity) bool).
    `seen_tokens` mirrors `length` on the host for the eager prefill; `row_tokens` (host, one int per row) counts
    the slots each row has written since it began (0: a free row, see `load_row`).
    """

    def __init__(
        self, layouts: list[LayerLayout], batch_size: int, dtype: torch.dtype, device: torch.device | str
    ):
        self.layouts = list(layouts)
        self._batch_size, self.dtype, self.device = batch_size, dtype, torch.device(device)
        self.seen_tokens = 0
        self.row_tokens = [0] * batch_size
        self.decoding = False
        self.fixed_window = False  # see fixed_window_prefill
        self.length = torch.zeros((), dtype=torch.long, device=self.device)
        self.position: torch.Tensor | None = None
        capacities = sorted({layout.capacity for layout in layouts if layout.kind != LINEAR})
        self.valid = {c: torch.zeros(batch_size, c, dtype=torch.bool, device=self.device) for c in capacities}
        self.decode_masks = {c: valid[:, None, None, :] for c, valid in self.valid.items()}
        self.write_slots = {c: torch.zeros(1, dtype=torch.long, device=self.device) for c in capacities}
        super().__init__(
            layers=[
                MixerCacheLayer(in_place=True)
                if layout.kind == LINEAR
                else StaticAttentionLayer(self, layout)
                for layout in layouts
            ]
        )

    @classmethod
    def for_model(
        cls,
        model: nn.Module,
        batch_size: int,
        max_length: int,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> StaticHybridCache:
        """A cache laid out for `model`'s decoder layers, in the model's dtype and on its device by default."""
        if batch_size < 1 or max_length < 1:
            raise ValueError(
                f"batch_size and max_length must be positive, got {batch_size} and {max_length}."
            )
        parameter = next(model.parameters())
        return cls(
            layer_layouts(model, max_length),
            batch_size,
            dtype or parameter.dtype,
            device if device is not None else parameter.device,
        )

    # --- what transformers asks of a cache -------------------------------------------------------------

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def is_compileable(self) -> bool:
        return False  # transformers' compiled-decode shortcuts assume its own static layers

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        return self.layers[layer_idx].get_mask_sizes(query_length)

    # --- bookkeeping, used by StaticDecoder ------------------------------------------------------------

    def layer_indices(self, kind: str) -> list[int]:
        return [idx for idx, layout in enumerate(self.layouts) if layout.kind == kind]

    @property
    def full_capacity(self) -> int | None:
        """Tokens the full-attention layers can hold (None without full-attention layers)."""
        full = [self.layouts[idx].capacity for idx in self.layer_indices(FULL)]
        return min(full) if full else None

    def check_room(self, new_tokens: int, held: int | None = None) -> None:
        """Fail before any work if `new_tokens` more tokens after `held` (default: all the cache has written, as a
        prefill of every row appends) would overflow the full-attention buffers."""
        capacity = self.full_capacity
        held = self.seen_tokens if held is None else held
        if capacity is not None and held + new_tokens > capacity:
            raise ValueError(
                f"The cache holds {held} tokens and {new_tokens} more were asked for, but its "
                f"full-attention layers keep {capacity} (max_length); build the cache with max_length >= "
                f"{held + new_tokens}."
            )

    def slots(self, start: int, stop: int, capacity: int) -> torch.Tensor:
        """The slots of a `capacity` buffer that tokens start..stop-1 counted from the next one go to (negative:
        tokens already written), from the device-side count: no host value, so a CUDA graph can hold it."""
        return (self.length + torch.arange(start, stop, device=self.device)) % capacity

    @contextlib.contextmanager
    def fixed_window_prefill(self) -> Iterator[None]:
        """Prefill forwards inside hand each sliding-window layer its `window - 1` most recent slots, whether they
        hold a token yet or not, followed by the new tokens: shapes that never change and slots found on the
        device, so that the forward (and `record_tokens`) can be captured in a CUDA graph. Attention must mask the
        leading slots that hold no token yet (`hybridize.inference.window_attention.WindowKeys`)."""
        if self.layer_indices(FULL):
            raise ValueError(
                "A fixed-window prefill needs a cache of sliding-window and linear layers only; this one has "
                f"full-attention layers {self.layer_indices(FULL)}."
            )
        self.fixed_window = True
        try:
            yield
        finally:
            self.fixed_window = False

    def record_tokens(self, valid: torch.Tensor, next_position: torch.Tensor) -> None:
        """After a prefill forward of T tokens: mark which were real (`valid`, (B, T) bool), count them and set the
        next token's position ids (copied into the same tensor every time, so a captured step keeps reading it).
        The device-side part reads no host count: a CUDA graph can hold it (`advance_host` is the host's part)."""
        length = valid.shape[1]
        for capacity, slots_valid in self.valid.items():
            written = min(length, capacity)
            slots = self.slots(length - written, length, capacity)
            slots_valid.index_copy_(1, slots, valid[:, length - written :].to(self.device))
        self.length += length
        self.advance_host(length)
        # every row took these tokens; a row that was free begins here, its stale slots counted in
        self.row_tokens = [held or self.seen_tokens for held in self.row_tokens]
        if self.position is None or self.position.shape != next_position.shape:
            self.position = next_position.to(self.device, torch.long).clone()
        else:
            self.position.copy_(next_position)

    def padding_history(self) -> torch.Tensor:
        """(B, seen_tokens) bool: which tokens so far were real, as far as the buffers remember (older tokens,
        out of every window, count as real; no layer reads them)."""
        history = torch.ones(self.batch_size, self.seen_tokens, dtype=torch.bool, device=self.device)
        if self.seen_tokens and self.valid:
            capacity = max(self.valid)
            kept = min(self.seen_tokens, capacity)
            slots = torch.arange(self.seen_tokens - kept, self.seen_tokens, device=self.device) % capacity
            history[:, self.seen_tokens - kept :] = self.valid[capacity][:, slots]
        return history

    def begin_decode_step(self) -> None:
        """Device ops at the start of a decode step: the new token's slot in each buffer, now holding a real token."""
        for capacity, slot in self.write_slots.items():
            slot.copy_(self.length % capacity)
            self.valid[capacity].index_fill_(1, slot, True)

    def end_decode_step(self) -> None:
        """Device ops at the end of a decode step: one more token, and the next one's positions."""
        self.length += 1
        self.position += 1

    def advance_host(self, num_tokens: int) -> None:
        """Count `num_tokens` more tokens on the host (a replayed step runs no Python)."""
        self.seen_tokens += num_tokens
        self.row_tokens = [held + num_tokens if held else 0 for held in self.row_tokens]
        for idx in self.layer_indices(LINEAR):
            self.layers[idx].seen_tokens = self.seen_tokens

    @property
    def mixer_states_ready(self) -> bool:
        return all(self.layers[idx].states for idx in self.layer_indices(LINEAR))

    def reset(self) -> None:
        """Back to no tokens, keeping every buffer (and so any CUDA graph captured over them)."""
        for layer in self.layers:
            layer.reset()
        for valid in self.valid.values():
            valid.zero_()
        self.length.zero_()
        if self.position is not None:
            self.position.zero_()
        self.seen_tokens = 0
        self.row_tokens = [0] * self.batch_size
        self.advance_host(0)

    # --- rows that come and go ---------------------------------------------------------------------------

    @property
    def free_rows(self) -> list[int]:
        return [row for row, held in enumerate(self.row_tokens) if not held]

    def check_free_row(self, row: int) -> None:
        """Fail unless `row` is a row of this cache that holds no sequence."""
        if not 0 <= row < self.batch_size:
            raise ValueError(
                f"Row {row} is out of range for a cache of batch_size={self.batch_size}; admit into one of the "
                f"free rows {self.free_rows}."
            )
        if self.row_tokens[row]:
            raise ValueError(
                f"Row {row} is decoding a sequence ({self.row_tokens[row]} tokens); release it first "
                f"(StaticDecoder.release({row})) or admit into one of the free rows {self.free_rows}."
            )

    def release_row(self, row: int) -> None:
        """Mark `row` free; its slots keep their contents (a replayed step still computes the row) until
        `load_row` overwrites them."""
        if not 0 <= row < self.batch_size:
            raise ValueError(f"Row {row} is out of range for a cache of batch_size={self.batch_size}.")
        self.row_tokens[row] = 0

    def load_row(self, row: int, source: StaticHybridCache) -> None:
        """Replace free row `row` by the one sequence of `source` (a batch-1 cache of this layout, filled by a
        prefill), leaving the other rows and every buffer's address as they are (a captured step stays valid).

        Source token i goes to slot (i + seen_tokens - source.seen_tokens) % capacity, so its last token sits just
        before the slot the next step writes, and the source's empty slots mark the rest of the row as padding.
        An idle cache (no row holding a sequence) first restarts at the source's length.
        """
        self.check_free_row(row)
        if source.layouts != self.layouts or source.batch_size != 1:
            raise ValueError(
                f"load_row takes a batch_size=1 cache of this cache's layout, got batch_size={source.batch_size}"
                "; build it with StaticHybridCache(cache.layouts, 1, cache.dtype, cache.device)."
            )
        if not any(self.row_tokens):
            self.reset()
            self.length.fill_(source.seen_tokens)
            self.advance_host(source.seen_tokens)
        shift = self.seen_tokens - source.seen_tokens
        for capacity, valid in self.valid.items():
            # (capacity,) this cache's slot of each source slot
            slots = (torch.arange(capacity, device=self.device) + shift) % capacity
            valid[row].index_copy_(0, slots, source.valid[capacity][0])
            for idx, layout in enumerate(self.layouts):
                if layout.kind != LINEAR and layout.capacity == capacity:
                    mine, theirs = self.layers[idx], source.layers[idx]
                    mine.keys[row].index_copy_(1, slots, theirs.keys[0])  # (heads, capacity, D)
                    mine.values[row].index_copy_(1, slots, theirs.values[0])
        for idx in self.layer_indices(LINEAR):
            states = self.layers[idx].states
            for name, state in source.layers[idx].states.items():  # (1, ...) -> row of (B, ...)
                if name not in states:  # nothing prefilled yet: the other rows start from zeros
                    states[name] = state.new_zeros(self.batch_size, *state.shape[1:])
                states[name][row].copy_(state[0])
        if self.position is None:  # (..., 1, 1) -> (..., B, 1)
            self.position = source.position.new_zeros(*source.position.shape[:-2], self.batch_size, 1)
        self.position[..., row, :] = source.position[..., 0, :]
        self.row_tokens[row] = source.seen_tokens

    # --- branching ---------------------------------------------------------------------------------------

    def save_for_tokens(self, count: int) -> Callable[[], None]:
        """Keep what `count` more tokens will overwrite and return the function that puts it back: the buffer slots
        they go to (not the windows: a question answered on a stream's cache copies no window), the linear mixers'
        states (updated in place), the counts and the positions. Buffers keep their addresses."""
        attention = [
            (layer, self.slots(0, min(count, layer.capacity), layer.capacity))
            for layer in self.layers
            if isinstance(layer, StaticAttentionLayer)
        ]
        kept = [
            (layer, slots, layer.keys.index_select(2, slots), layer.values.index_select(2, slots))
            for layer, slots in attention
        ]
        valid = {
            capacity: (slots := self.slots(0, min(count, capacity), capacity), flags.index_select(1, slots))
            for capacity, flags in self.valid.items()
        }
        states = [
            {name: state.clone() for name, state in self.layers[idx].states.items()}
            for idx in self.layer_indices(LINEAR)
        ]
        length, position = self.length.clone(), None if self.position is None else self.position.clone()
        host = self.seen_tokens, list(self.row_tokens)

        def restore() -> None:
            for layer, slots, keys, values in kept:
                layer.keys.index_copy_(2, slots, keys)
                layer.values.index_copy_(2, slots, values)
            for capacity, (slots, flags) in valid.items():
                self.valid[capacity].index_copy_(1, slots, flags)
            for idx, saved in zip(self.layer_indices(LINEAR), states, strict=True):
                for name, state in saved.items():
                    self.layers[idx].states[name].copy_(state)
            self.length.copy_(length)
            if position is not None:
                self.position.copy_(position)
            self.seen_tokens, self.row_tokens = host[0], list(host[1])
            self.advance_host(0)

        return restore

    def _state(self) -> list[tuple[str, torch.Tensor]]:
        named = [("length", self.length), *((f"valid[{c}]", v) for c, v in self.valid.items())]
        for idx, layer in enumerate(self.layers):
            if isinstance(layer, MixerCacheLayer):
                named += [(f"layers[{idx}].{name}", layer.states[name]) for name in sorted(layer.states)]
            else:
                named += [(f"layers[{idx}].keys", layer.keys), (f"layers[{idx}].values", layer.values)]
        return named

    def copy_from(self, other: StaticHybridCache) -> StaticHybridCache:
        """Copy `other`'s whole state into this cache's own tensors (their addresses stay, so a CUDA graph
        captured over this cache decodes from `other`'s state). Both must have one layout and batch size."""
        if self.layouts != other.layouts or self.batch_size != other.batch_size:
            raise ValueError(
                "copy_from needs two caches of one layout and batch size (build both with the same model, "
                f"batch_size and max_length); got batch {other.batch_size} into batch {self.batch_size}."
            )
        for idx in self.layer_indices(LINEAR):  # mixer states exist once a prefill ran
            mine, theirs = self.layers[idx].states, other.layers[idx].states
            for name, state in theirs.items():
                if name not in mine:
                    mine[name] = torch.empty_like(state)
            for name in set(mine) - set(theirs):
                mine[name].zero_()
        for (_, mine), (_, theirs) in zip(self._state(), other._state(), strict=True):
            mine.copy_(theirs)
        if other.position is None:
            self.position = None
        elif self.position is None or self.position.shape != other.position.shape:
            self.position = other.position.clone()
        else:
            self.position.copy_(other.position)
        self.seen_tokens = other.seen_tokens
        self.row_tokens = list(other.row_tokens)
        self.advance_host(0)
        return self

    def clone(self) -> StaticHybridCache:
        """A new cache with its own buffers holding a copy of this one's state (e.g. to branch a stream)."""
        return StaticHybridCache(self.layouts, self.batch_size, self.dtype, self.device).copy_from(self)

    def nbytes(self) -> int:
        return sum(tensor.numel() * tensor.element_size() for _, tensor in self._state())

    def __repr__(self) -> str:
        kinds = ", ".join(f"{kind}: {len(self.layer_indices(kind))}" for kind in (SLIDING, FULL, LINEAR))
        return f"StaticHybridCache(batch_size={self.batch_size}, seen_tokens={self.seen_tokens}, layers {{{kinds}}})"

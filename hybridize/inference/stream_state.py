"""A stream's model state (`StreamState`: its cache, next M-RoPE position and last hidden state) and its
per-frame prefill replayed from CUDA graphs (`CapturedPrefill`).

Memory: native sliding-window layers keep `window - 1` keys/values, allocated in full when the stream starts
(`hybridize.inference.window_attention.FixedWindowLayer`, under SDPA or eager attention; the cache's
`DynamicSlidingWindowLayer`, which grows until the window is full, under other implementations), linear mixers
a fixed state (`MixerCacheLayer`); the state itself keeps ints and the last hidden state. Full attention
layers (and the sliding-window *mixer*, whose mask spans every past token) grow with the stream
(`growing_layers`); a session refuses a model with any unless `allow_growing_cache=True`.

CUDA graphs: the per-frame prefill is captured once the cache has stopped changing shape: at the second frame
with fixed windows (a graph for the window filling and one for the full window, both captured then), else once
the sliding window is full. The prefill graph reads and writes the cache's own tensors: before capture they are
replaced by fixed buffers, and the captured step copies each new state back into its buffer.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any

import torch
from transformers import DynamicCache

from hybridize.compat import attention_implementation, cache_argument, causal_mask, sliding_window_causal_mask
from hybridize.converters.discovery import find_decoder_layout
from hybridize.inference.cuda_graphs import capture_cuda_graph
from hybridize.inference.frames import text_positions
from hybridize.inference.window_attention import WINDOW_ATTENTION, FixedWindowLayer, WindowKeys
from hybridize.mixers.base import TokenMixer
from hybridize.mixers.ops.flash import flash_kernel_usable
from hybridize.mixers.sliding_window import SlidingWindowMixer


def growing_layers(model) -> dict[int, str]:
    """Decoder layers whose cache (or per-frame work) grows with the stream: index -> why."""
    layout = find_decoder_layout(model)
    layer_types = getattr(layout.text_config, "layer_types", None) or ["full_attention"] * len(layout.layers)
    growing = {}
    for idx, layer_type in enumerate(layer_types):
        module = layout.attention(idx)
        if layer_type == "sliding_attention" or (
            isinstance(module, TokenMixer) and not module.wraps_attention
        ):
            continue
        if isinstance(module, SlidingWindowMixer):
            growing[idx] = "sliding-window mixer (its mask spans every past token)"
        else:
            growing[idx] = "full attention (keeps every key and value)"
    return growing


class StreamState:
    """A stream's model state: its `DynamicCache`, the next M-RoPE position and the last token's hidden state.

    What a session asks of it: `prefill` a chunk of embeddings, `branch` an independent copy for a question,
    `decode` one token on that copy. On CUDA the per-frame prefill is replayed by `CapturedPrefill` over the
    same cache, and answers are decoded over a static cache (`StaticAnswers`) loaded from it.

    window_cache: the sliding-window layers keep their keys in a `FixedWindowLayer` (allocated here, the same
    shapes at every frame) and attend through `window_attention` (PyTorch's flash kernel with its window on
    CUDA); for models with sliding-window and linear layers only, under SDPA or eager attention. Otherwise the
    cache's own `DynamicSlidingWindowLayer`, which grows until the window is full, and the model's masks.
    """

    def __init__(self, model, full_attention_mask: bool, window_cache: bool = False):
        self.model = model
        self.decoder = find_decoder_layout(model).decoder
        self.text_config = model.config.get_text_config(decoder=True)
        layer_types = getattr(self.text_config, "layer_types", None) or ["full_attention"]
        self.layer_types = sorted(set(layer_types))
        self.full_attention_mask = full_attention_mask
        self.cache = DynamicCache(config=self.text_config)
        self.window_index: int | None = None  # one of the fixed windows: they all hold the same tokens
        self.flash = False
        if window_cache:
            config = self.text_config
            head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
            shape = dict(batch_size=1, num_heads=config.num_key_value_heads, head_dim=head_dim)
            for idx, layer_type in enumerate(layer_types):
                if layer_type == "sliding_attention":
                    self.cache.layers[idx] = FixedWindowLayer(
                        config.sliding_window, **shape, dtype=model.dtype, device=model.device
                    )
                    self.window_index = idx
            self.flash = flash_kernel_usable(model.device, model.dtype, head_dim)
        self.position = 0  # next M-RoPE position
        self.last_hidden: torch.Tensor | None = None  # (1, hidden) final-norm hidden state of the last token

    @property
    def window_layer(self) -> FixedWindowLayer | None:
        return None if self.window_index is None else self.cache.layers[self.window_index]

    def window_full(self) -> bool | None:
        """Whether every slot of the fixed windows holds a token (None without fixed windows)."""
        layer = self.window_layer
        return None if layer is None else layer.cumulative_length >= layer.sliding_window - 1

    def masks(self, embeds: torch.Tensor, full: bool | None = None) -> dict[str, Any]:
        """Masks by layer type, built once per chunk: `WindowKeys` for fixed windows (`full` overrides whether
        they are full). Without attention layers that need one, the full-attention mask is left out: its size
        grows with every token seen, and linear mixers read it only for padding, which a stream does not have."""
        masks = {}
        for layer_type in self.layer_types:
            if layer_type == "sliding_attention" and self.window_layer is not None:
                masks[layer_type] = WindowKeys(
                    window=self.window_layer.sliding_window,
                    empty=self.window_layer.empty,
                    full=self.window_full() if full is None else full,
                    flash=self.flash,
                )
                continue
            if layer_type == "sliding_attention":
                build = sliding_window_causal_mask
            elif self.full_attention_mask:
                build = causal_mask
            else:
                masks[layer_type] = None
                continue
            masks[layer_type] = build(
                config=self.text_config,
                inputs_embeds=embeds,
                attention_mask=None,
                cache=self.cache,
                position_ids=None,
            )
        return masks

    def attention(self) -> contextlib.AbstractContextManager:
        """The attention implementation a forward runs under (the window attention with fixed windows)."""
        if self.window_layer is None:
            return contextlib.nullcontext()
        return attention_implementation(self.text_config, WINDOW_ATTENTION)

    def run(self, embeds: torch.Tensor, positions: torch.Tensor, masks: dict[str, Any]) -> torch.Tensor:
        """The decoder over (1, L, hidden) embeddings at (3, 1, L) positions into the cache, under `attention()`;
        the last token's hidden state."""
        out = self.decoder(
            inputs_embeds=embeds,
            position_ids=positions,
            attention_mask=masks,
            use_cache=True,
            **cache_argument(self.cache),
        )
        return out.last_hidden_state[:, -1]

    def forward(self, embeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        with self.attention():
            return self.run(embeds, positions, self.masks(embeds))

    def prefill(self, embeds: torch.Tensor, positions: torch.Tensor, span: int) -> None:
        self.last_hidden = self.forward(embeds, positions)
        self.position += span

    def prefill_text(self, token_ids: list[int]) -> None:
        ids = torch.tensor([token_ids], device=self.model.device)
        embeds = self.model.get_input_embeddings()(ids)
        self.prefill(embeds, text_positions(self.position, len(token_ids), ids.device), len(token_ids))

    def decode(self, token_id: int) -> torch.Tensor:
        """Feed one token; the next token's (1, vocab) logits in fp32."""
        self.prefill_text([token_id])
        return self.logits()

    def logits(self) -> torch.Tensor:
        return self.model.lm_head(self.last_hidden).float()

    def branch(self) -> StreamState:
        """An independent copy: what the copy does never reaches this state."""
        other = copy.copy(self)
        other.cache = copy.deepcopy(self.cache)
        other.last_hidden = None if self.last_hidden is None else self.last_hidden.clone()
        return other

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor the state holds between chunks."""
        held = [tensor for _, _, tensor in cache_tensor_slots(self.cache)]
        return held + ([] if self.last_hidden is None else [self.last_hidden])


def layer_tensor_slots(layer) -> list[tuple[dict, str, torch.Tensor]]:
    """(container, key, tensor) for every tensor a cache layer holds: its attributes (keys, values, ...) and
    the entries of its dict attributes (a mixer's states). Read through `vars` because a captured prefill must
    put a buffer in place of every tensor a forward rebinds, whatever the layer's class (transformers' own
    `DynamicSlidingWindowLayer` included), and a class that gained a tensor would otherwise break the graph."""
    slots = []
    for key, value in vars(layer).items():
        if isinstance(value, torch.Tensor):
            slots.append((vars(layer), key, value))
        elif isinstance(value, dict):
            slots += [(value, k, v) for k, v in value.items() if isinstance(v, torch.Tensor)]
    return slots


def cache_tensor_slots(cache) -> list[tuple[dict, str, torch.Tensor]]:
    return [slot for layer in cache.layers for slot in layer_tensor_slots(layer)]


def cache_shapes(cache) -> list[tuple]:
    """Which tensors the cache holds and their shapes: a captured step stays valid while these do not change."""
    return [
        (idx, key, tuple(tensor.shape), tensor.dtype)
        for idx, layer in enumerate(cache.layers)
        for _, key, tensor in layer_tensor_slots(layer)
    ]


def counters(cache) -> list[dict[str, int]]:
    """Each layer's int attributes (tokens seen, ...): its Python code advances them on every forward."""
    return [
        {key: value for key, value in vars(layer).items() if type(value) is int} for layer in cache.layers
    ]


class LayerSnapshot:
    """A layer's attributes and the contents of its dict attributes, to put back after a capture."""

    def __init__(self, layer):
        self.layer = layer
        self.attributes = dict(vars(layer))
        self.dicts = {key: dict(value) for key, value in self.attributes.items() if isinstance(value, dict)}

    def restore(self) -> None:
        for key, contents in self.dicts.items():
            self.attributes[key].clear()
            self.attributes[key].update(contents)
        vars(self.layer).clear()
        vars(self.layer).update(self.attributes)


class CapturedPrefill:
    """A `StreamState`'s prefill of one fixed-size chunk, replayed from CUDA graphs.

    Before capture every cache tensor is replaced by a compact copy (a fixed buffer); a captured step runs the
    forward (which reads the buffers and makes new tensors from the graph's pool) and copies each new tensor
    back into its buffer. Only the kernels replay, so the layers' Python-side token counters are advanced by
    hand by what one forward added to them. Needs a cache whose tensors keep their shapes from one chunk to the
    next (`cache_shapes`); anything else raises before the state is touched.

    phases: one graph per value of `StreamState.masks`'s `full` (with fixed windows: False while they fill,
    True once full, both captured at once over the same buffers and memory pool, so that nothing is allocated
    when the window fills); (None,) for a single graph. A replay picks the graph of `state.window_full()`.
    """

    def __init__(
        self,
        state: StreamState,
        embeds: torch.Tensor,
        positions: torch.Tensor,
        compile: bool = False,
        phases: tuple[bool | None, ...] = (None,),
    ):
        self.state = state
        # compile: the captured forward through torch.compile for this chunk's shapes (it fuses the small
        # kernels between the matrix products and the mixers' kernels); it is traced on the warm-up runs.
        self.run = torch.compile(StreamState.run, dynamic=False) if compile else StreamState.run
        cache = state.cache
        self.slots = []
        for container, key, tensor in cache_tensor_slots(cache):
            container[key] = tensor.clone()  # a sliding-window slot holds a view of a larger tensor
            self.slots.append((container, key, container[key]))
        self.embeds, self.positions = embeds.clone(), positions.clone()
        snapshots = [LayerSnapshot(layer) for layer in cache.layers]
        shapes, before = cache_shapes(cache), counters(cache)
        self.graphs: dict[bool | None, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.deltas: dict[bool | None, list[dict[str, int]]] = {}
        pool = None
        for phase in phases:
            if compile:
                # The compiled forward is traced for this state object (its guards): warm it up on the stream's
                # own state, then put the state back (a forward writes into no cache tensor, it rebinds them).
                def warmup(phase=phase):
                    self.forward(state, phase)
                    for snapshot in snapshots:
                        snapshot.restore()
            else:
                warmup_state = state.branch()  # warm-up forwards must not advance the stream

                def warmup(phase=phase, warmup_state=warmup_state):
                    self.forward(warmup_state, phase)

            try:
                self.graphs[phase] = capture_cuda_graph(lambda phase=phase: self.step(phase), warmup, pool)
                after = counters(cache)
                unchanged = len(cache.layers) == len(snapshots) and cache_shapes(cache) == shapes
                held = cache_tensor_slots(cache)
                in_buffers = len(held) == len(self.slots) and all(
                    tensor is buffer for (_, _, tensor), (_, _, buffer) in zip(held, self.slots, strict=True)
                )
            finally:
                for (
                    snapshot
                ) in snapshots:  # capture runs no kernel: the buffers still hold the state before it
                    snapshot.restore()
            if not (unchanged and in_buffers):
                raise RuntimeError(
                    "the forward replaced cache tensors that the captured step cannot copy back"
                )
            self.deltas[phase] = [
                {key: a[key] - b[key] for key in b} for a, b in zip(after, before, strict=True)
            ]
            pool = self.graphs[phase][0].pool()

    def forward(self, state: StreamState, phase: bool | None) -> torch.Tensor:
        masks = state.masks(self.embeds, full=phase)
        with state.attention():
            return self.run(state, self.embeds, self.positions, masks)

    def step(self, phase: bool | None) -> torch.Tensor:
        hidden = self.forward(self.state, phase)
        for container, key, buffer in self.slots:
            buffer.copy_(container[key])
            container[key] = buffer
        return hidden

    def phase(self) -> bool | None:
        return None if None in self.graphs else self.state.window_full()

    def __call__(self, embeds: torch.Tensor, positions: torch.Tensor) -> None:
        phase = self.phase()
        graph, hidden = self.graphs[phase]
        self.embeds.copy_(embeds)
        self.positions.copy_(positions)
        graph.replay()
        for layer, deltas in zip(self.state.cache.layers, self.deltas[phase], strict=True):
            for key, delta in deltas.items():
                setattr(layer, key, getattr(layer, key) + delta)
        self.state.last_hidden = hidden

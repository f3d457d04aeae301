"""A stream's model state (`StreamState`: its cache, next M-RoPE position and last hidden state) and its
per-frame prefill replayed from CUDA graphs (`CapturedPrefill`).

Memory: a model of sliding-window and linear layers under SDPA or eager attention streams into a
`StaticHybridCache` (batch 1): each sliding-window layer keeps a ring of `window` key/value slots and each linear
mixer its states, all allocated once and written in place. A frame's prefill runs under the cache's
`fixed_window_prefill` (every sliding-window layer reads its `window - 1` most recent slots and the frame's tokens,
shapes that never change) with `window_attention` (PyTorch's flash kernel with its window on CUDA), so from the
second frame on it is replayed from CUDA graphs over the cache's own buffers. A question is answered on the same
cache and the stream put back after it (`StaticHybridCache.save_for_tokens`): only the slots the answer writes and
the mixers' states are copied, not the windows.

Other models stream into a `DynamicCache`: full attention layers (and the sliding-window *mixer*, whose mask spans
every past token) grow with the stream (`growing_layers`; a session refuses a model with any unless
`allow_growing_cache=True`), and other attention implementations keep transformers' own sliding-window layers.
Those prefill eagerly, and a question runs on a copy of the cache (`StreamState.branch`).
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any

import torch
from transformers import DynamicCache

from hybridize.compat import attention_implementation, cache_argument, causal_mask, sliding_window_causal_mask
from hybridize.converters.discovery import find_decoder_layout
from hybridize.inference.cuda_graphs import capture_cuda_graph, compile_options
from hybridize.inference.frames import text_positions
from hybridize.inference.static_cache import SLIDING, StaticHybridCache
from hybridize.inference.window_attention import WINDOW_ATTENTION, WindowKeys
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
    """A stream's model state: its cache, the next M-RoPE position and the last token's hidden state.

    What a session asks of it: `prefill` a chunk of embeddings, answer a question on it and put it back
    (`saved_for_answer`, on a static cache) or on a `branch` (a copy, on a DynamicCache), `decode` one token.

    static: the cache is a `StaticHybridCache` (see the module docstring; `cache` may be one from an earlier
    stream of the same model, reused so that graphs captured over its buffers stay valid); else a `DynamicCache`
    and the model's own masks.
    """

    def __init__(self, model, full_attention_mask: bool, static: bool = False, cache=None):
        self.model = model
        self.decoder = find_decoder_layout(model).decoder
        self.text_config = model.config.get_text_config(decoder=True)
        layer_types = getattr(self.text_config, "layer_types", None) or ["full_attention"]
        self.layer_types = sorted(set(layer_types))
        self.full_attention_mask = full_attention_mask
        self.static = static
        self.window: int | None = None  # the sliding-window layers' window, on a static cache that has them
        self.flash = False
        if static:
            self.cache = cache if cache is not None else StaticHybridCache.for_model(model, 1, max_length=1)
            self.cache.reset()
            sliding = self.cache.layer_indices(SLIDING)
            if sliding:
                layout = self.cache.layouts[sliding[0]]
                self.window = layout.capacity
                self.flash = flash_kernel_usable(model.device, model.dtype, layout.head_dim)
        else:
            self.cache = DynamicCache(config=self.text_config)
        self.position = 0  # next M-RoPE position
        self.last_hidden: torch.Tensor | None = None  # (1, hidden) final-norm hidden state of the last token

    @property
    def seen_tokens(self) -> int:
        return self.cache.get_seq_length()

    def window_full(self) -> bool | None:
        """Whether every slot a fixed-window prefill reads holds a token (None without such windows)."""
        return None if self.window is None else self.cache.seen_tokens >= self.window - 1

    def masks(self, embeds: torch.Tensor, full: bool | None = None) -> dict[str, Any]:
        """Masks by layer type, built once per chunk: `WindowKeys` for a static cache's windows (`full` overrides
        whether they are full; the count of empty slots comes from the cache's device-side length). Without
        attention layers that need one, the full-attention mask is left out: its size grows with every token seen,
        and linear mixers read it only for padding, which a stream does not have."""
        masks = {}
        for layer_type in self.layer_types:
            if layer_type == "sliding_attention" and self.window is not None:
                empty = self.cache.layers[self.cache.layer_indices(SLIDING)[0]].empty_slots()
                full = self.window_full() if full is None else full
                masks[layer_type] = WindowKeys(self.window, empty, full, self.flash)
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
        """What a prefill forward runs under: on a static cache, the fixed-window prefill and the window
        attention."""
        if not self.static:
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        stack.enter_context(self.cache.fixed_window_prefill())
        if self.window is not None:
            stack.enter_context(attention_implementation(self.text_config, WINDOW_ATTENTION))
        return stack

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

    def forward(
        self, embeds: torch.Tensor, positions: torch.Tensor, full: bool | None = None
    ) -> torch.Tensor:
        """Prefill the chunk; on a static cache also its device-side bookkeeping (`record_device`)."""
        with self.attention():
            hidden = self.run(embeds, positions, self.masks(embeds, full))
        if self.static:
            self.record_device(embeds.shape[1], positions)
        return hidden

    def record_device(self, length: int, positions: torch.Tensor) -> None:
        """A static cache's record of `length` new real tokens, device side only (what a graph replays)."""
        host = self.cache.seen_tokens, list(self.cache.row_tokens)
        valid = torch.ones(1, length, dtype=torch.bool, device=self.cache.device)
        self.cache.record_tokens(valid, positions[..., -1:] + 1)
        self.cache.seen_tokens, self.cache.row_tokens = host[0], host[1]
        self.cache.advance_host(0)

    def advance(self, length: int) -> None:
        """The host's count of a static cache's tokens, after a forward (or a replay) of `length` of them."""
        if self.static:
            self.cache.advance_host(length)
            self.cache.row_tokens = [self.cache.seen_tokens]

    def prefill(self, embeds: torch.Tensor, positions: torch.Tensor, span: int) -> None:
        self.last_hidden = self.forward(embeds, positions)
        self.advance(embeds.shape[1])
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

    @contextlib.contextmanager
    def saved_for_answer(self, tokens: int):
        """Answer on this state and have it back after (a static cache): what `tokens` more tokens overwrite is
        kept and put back, with the position and the last hidden state."""
        restore = self.cache.save_for_tokens(tokens)
        position, last_hidden = self.position, self.last_hidden
        try:
            yield self
        finally:
            restore()
            self.position, self.last_hidden = position, last_hidden

    def branch(self) -> StreamState:
        """An independent copy (a DynamicCache stream): what the copy does never reaches this state."""
        other = copy.copy(self)
        other.cache = copy.deepcopy(self.cache)
        other.last_hidden = None if self.last_hidden is None else self.last_hidden.clone()
        return other

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor the state holds between chunks."""
        if self.static:
            held = [tensor for _, tensor in self.cache._state()]
            held += [t for t in (self.cache.position,) if t is not None]
        else:
            held = [t for layer in self.cache.layers for t in vars(layer).values() if torch.is_tensor(t)]
            held += [t for layer in self.cache.layers for t in getattr(layer, "states", {}).values()]
        return held + ([] if self.last_hidden is None else [self.last_hidden])


class CapturedPrefill:
    """A static-cache `StreamState`'s prefill of one fixed-size chunk, replayed from CUDA graphs.

    The forward and the cache's device-side bookkeeping read and write the cache's own buffers, so a replay is
    the whole step but for the host's token count, advanced after it (`StreamState.advance`). The warm-up runs
    (and the capture's one Python run) go through the stream's own state, which is put back after each: a
    compiled forward is traced for the very objects it replays over.

    phases: one graph per value of `StreamState.masks`'s `full` (False while the windows fill, True once full,
    both captured at once over the same buffers and memory pool, so that nothing is allocated when the windows
    fill); (None,) for a single graph. A replay picks the graph of `state.window_full()`.
    """

    def __init__(
        self,
        state: StreamState,
        embeds: torch.Tensor,
        positions: torch.Tensor,
        compile: bool | str = False,
        phases: tuple[bool | None, ...] = (None,),
    ):
        compile_kwargs = compile_options(compile)
        if not state.static or not state.cache.mixer_states_ready:
            raise ValueError("A captured prefill needs a static-cache stream that has prefilled once.")
        self.state = state
        # compile: the captured forward through torch.compile for this chunk's shapes (it fuses the small
        # kernels between the matrix products and the mixers' kernels); it is traced on the warm-up runs.
        self.run = StreamState.run
        if compile_kwargs is not None:
            self.run = torch.compile(StreamState.run, dynamic=False, **compile_kwargs)
        self.embeds, self.positions = embeds.clone(), positions.clone()
        self.length = embeds.shape[1]
        saved = state.cache.clone()  # what the stream was: warm-ups and the capture run on it

        def put_back() -> None:
            state.cache.copy_from(saved)

        self.graphs: dict[bool | None, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        pool = None
        try:
            for phase in phases:

                def warmup(phase=phase) -> None:
                    self.step(phase)
                    put_back()

                self.graphs[phase] = capture_cuda_graph(lambda phase=phase: self.step(phase), warmup, pool)
                put_back()  # the capture ran the host's side of the step once
                pool = self.graphs[phase][0].pool()
        finally:
            put_back()

    def step(self, phase: bool | None) -> torch.Tensor:
        state = self.state
        with state.attention():
            hidden = self.run(state, self.embeds, self.positions, state.masks(self.embeds, phase))
        state.record_device(self.length, self.positions)
        return hidden

    def phase(self) -> bool | None:
        return None if None in self.graphs else self.state.window_full()

    def __call__(self, embeds: torch.Tensor, positions: torch.Tensor) -> None:
        self.load(embeds, positions)
        self.replay()

    def load(self, embeds: torch.Tensor, positions: torch.Tensor) -> None:
        """Copy the next chunk's embeddings and positions into the graphs' inputs (`replay` then runs it); once
        this is queued, the caller's `embeds` may be overwritten by work ordered after it."""
        self.embeds.copy_(embeds)
        self.positions.copy_(positions)

    def replay(self) -> None:
        graph, hidden = self.graphs[self.phase()]
        graph.replay()
        self.state.advance(self.length)
        self.state.last_hidden = hidden

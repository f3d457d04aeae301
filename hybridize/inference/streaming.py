"""Streaming video: a (hybrid) Qwen2.5-VL takes frames one at a time in constant memory and answers questions
at any time.

Token layout: what the model's chat template renders for one user turn that holds the frames as images and
then the question, so a session asked after N frames sees exactly the prompt `generate()` would get:

    <|im_start|>system\\n{system prompt}<|im_end|>\\n<|im_start|>user\\n      prefix, prefilled by reset()
    <|vision_start|><|image_pad|> x N<|vision_end|>                       per frame (N = 256 at 448x448)
    {question}<|im_end|>\\n<|im_start|>assistant\\n                        per question, on a branch

Qwen2.5-VL's chat format has no text timestamps; time enters through M-RoPE. Each frame is one image (a
single-frame video gets the same positions), so its positions are those the model's `get_rope_index` gives the
whole sequence: the vision tokens share one temporal index, height/width indices count up from it, and the
next token starts after the largest (18 positions per 448x448 frame). Temporal indices thus increase frame by
frame. A question's branch is dropped after the answer: answers never enter the stream's context.

Memory: native sliding-window layers keep `window - 1` keys/values, allocated in full when the stream starts
(`hybridize.inference.window_attention.FixedWindowLayer`, under SDPA or eager attention; the cache's
`DynamicSlidingWindowLayer`, which grows until the window is full, under other implementations), linear mixers
a fixed state (`MixerCacheLayer`); the session itself keeps ints and the last hidden state. Full attention
layers (and the sliding-window *mixer*, whose mask spans every past token) grow with the stream; a model with
any is refused unless `allow_growing_cache=True`.

CUDA graphs (`cuda_graphs=True`, the default on CUDA): the frame encoder (pixels -> ViT -> token embeddings)
is captured on the first frame, and the per-frame prefill once the cache has stopped changing shape: at the
second frame with fixed windows (a graph for the window filling and one for the full window, both captured
then), else once the sliding window is full. The prefill graph reads and writes the cache's own tensors:
before capture they are replaced by fixed buffers, and the captured step copies each new state back into its
buffer. A capture that fails falls back to eager with a warning.
"""

from __future__ import annotations

import contextlib
import copy
import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import DynamicCache
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from hybridize.compat import (
    attention_implementation,
    cache_argument,
    causal_mask,
    configured_attention,
    is_qwen2_5_vision,
    qwen2_5_vision_index_tensors,
    sliding_window_causal_mask,
)
from hybridize.converters.discovery import find_decoder_layout
from hybridize.inference.cuda_graphs import capture_cuda_graph
from hybridize.inference.decode import SUPPORTED_ATTENTION, StaticDecoder
from hybridize.inference.flash import flash_kernel_usable
from hybridize.inference.fusion import fuse_projections
from hybridize.inference.static_cache import StaticHybridCache
from hybridize.inference.vision_attention import BlockDiagonalMasks, packed_attention_on
from hybridize.inference.window_attention import WINDOW_ATTENTION, FixedWindowLayer, WindowKeys
from hybridize.media import import_av
from hybridize.mixers.base import TokenMixer
from hybridize.mixers.cache import MixerCacheLayer
from hybridize.mixers.sliding_window import SlidingWindowMixer

QUESTION_MARKER = "\x00question\x00"  # stands in for the question while the chat template is split


# ----------------------------------------------------------------------------------------------- prompt


@dataclass(frozen=True)
class FramePrompt:
    """The token pieces of a stream and the M-RoPE positions of one frame relative to its first token."""

    prefix_ids: list[int]  # system turn and the start of the user turn
    frame_ids: torch.Tensor  # (L,) <|vision_start|> <|image_pad|> * N <|vision_end|>
    vision_tokens: slice  # where the N vision features go in frame_ids
    frame_positions: torch.Tensor  # (3, L) M-RoPE positions, the frame's first token at 0
    frame_span: int  # positions one frame advances the stream
    suffix: str  # closes the user turn and opens the assistant's


def build_frame_prompt(model, processor, grid_thw: torch.Tensor, system_prompt: str | None) -> FramePrompt:
    """Split the chat template around one image and a question; frame positions from the model's get_rope_index."""
    tokenizer = getattr(processor, "tokenizer", processor)
    system = [] if system_prompt is None else [{"role": "system", "content": system_prompt}]

    def render(content: list[dict]) -> str:
        messages = [*system, {"role": "user", "content": content}]
        return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    question = {"type": "text", "text": QUESTION_MARKER}
    prefix, suffix = render([question]).split(QUESTION_MARKER)
    with_image = render([{"type": "image"}, question]).split(QUESTION_MARKER)[0]
    if not with_image.startswith(prefix):
        raise ValueError("The chat template puts an image somewhere other than the start of the user turn.")
    frame_text = with_image[len(prefix) :]

    image_token_id = model.config.image_token_id
    merge = model.config.vision_config.spatial_merge_size
    num_vision_tokens = int(grid_thw.prod()) // merge**2
    text_ids = tokenizer(frame_text, add_special_tokens=False)["input_ids"]
    if text_ids.count(image_token_id) != 1:
        raise ValueError(
            f"The chat template renders an image as {frame_text!r}, which holds {text_ids.count(image_token_id)} "
            f"image tokens (id {image_token_id}); expected one placeholder."
        )
    first = text_ids.index(image_token_id)
    frame_ids = text_ids[:first] + [image_token_id] * num_vision_tokens + text_ids[first + 1 :]
    frame_ids = torch.tensor(frame_ids)
    token_types = (frame_ids == image_token_id).long()  # 0 text, 1 image
    positions, _ = model.model.get_rope_index(
        frame_ids[None], mm_token_type_ids=token_types[None], image_grid_thw=grid_thw
    )
    positions = positions[:, 0]  # (3, L)
    return FramePrompt(
        prefix_ids=tokenizer(prefix, add_special_tokens=False)["input_ids"],
        frame_ids=frame_ids,
        vision_tokens=slice(first, first + num_vision_tokens),
        frame_positions=positions,
        frame_span=int(positions.max()) + 1,
        suffix=suffix,
    )


def text_positions(start: int, length: int, device) -> torch.Tensor:
    """(3, 1, length) M-RoPE positions of text tokens: the same index on every axis."""
    return torch.arange(start, start + length, device=device).view(1, 1, -1).expand(3, 1, -1)


# ----------------------------------------------------------------------------------------------- frames


def frame_tensor(frame) -> torch.Tensor:
    """A PIL image, an (H, W, 3) uint8 array or tensor -> (H, W, 3) uint8 tensor."""
    if isinstance(frame, Image.Image):
        frame = np.array(frame.convert("RGB"))
    if isinstance(frame, np.ndarray):
        frame = torch.from_numpy(np.ascontiguousarray(frame))
    if not isinstance(frame, torch.Tensor):
        raise TypeError(f"A frame must be a PIL image, numpy array or tensor, got {type(frame).__name__}.")
    if frame.dim() != 3 or frame.shape[-1] != 3 or frame.dtype != torch.uint8:
        raise ValueError(
            f"A frame must be (height, width, 3) uint8 RGB, got shape {tuple(frame.shape)} and {frame.dtype}."
        )
    return frame


def parse_frame_size(frame_size: int | tuple[int, int], factor: int) -> tuple[int, int]:
    """448 or (448, 448) -> (height, width), both multiples of the ViT's patch x merge size."""
    height, width = (frame_size, frame_size) if isinstance(frame_size, int) else tuple(frame_size)
    if not all(isinstance(side, int) and side > 0 and side % factor == 0 for side in (height, width)):
        raise ValueError(
            f"frame_size {frame_size!r} must be positive multiples of {factor} (the ViT's patch size times its "
            f"merge size), e.g. {16 * factor} for {16 * 16} tokens per frame."
        )
    return height, width


class FrameEncoder:
    """One frame of the configured size -> the (1, L, hidden) input embeddings of its tokens.

    Pixels are rescaled, normalised and cut into patches as the model's image processor does (bit for bit on a
    frame of the configured size; other sizes are resized on the device first, bicubic), the ViT runs with its
    grid-dependent index tensors computed once, and the vision features are placed between the frame's
    <|vision_start|>/<|vision_end|> embeddings. `use_graph` replays all of it from a CUDA graph.

    `packed_attention` (default on): a Qwen2.5-VL vision tower under SDPA runs each layer's attention as one
    call over all windows (`hybridize.inference.vision_attention`): PyTorch's varlen flash kernel where it runs,
    else SDPA with a block-diagonal mask built once per frame size, rather than one call per window; its config
    names the packed attention only while a frame is encoded.
    Other attention implementations (a real flash one included) are left as they are.
    `compile`: each vision block through torch.compile (fuses the norms, rotary and MLP elementwise kernels).
    """

    def __init__(
        self,
        model,
        processor,
        prompt: FramePrompt,
        size: tuple[int, int],
        use_graph: bool,
        packed_attention: bool = True,
        compile: bool = False,
    ):
        vision_config = model.config.vision_config
        image_processor = processor.image_processor
        visual = model.model.visual
        self.model, self.size, self.use_graph = model, size, use_graph
        self.patch, self.merge = vision_config.patch_size, vision_config.spatial_merge_size
        self.temporal = vision_config.temporal_patch_size
        device = model.device
        self.rescale = image_processor.rescale_factor if image_processor.do_rescale else None
        self.mean = self.std = None
        if image_processor.do_normalize:  # (3, 1, 1) per channel
            self.mean, self.std = (
                torch.tensor(values, dtype=torch.float32, device=device).view(3, 1, 1)
                for values in (image_processor.image_mean, image_processor.image_std)
            )
        self.grid_thw = torch.tensor([[1, size[0] // self.patch, size[1] // self.patch]], device=device)
        self.packed_attention = (
            packed_attention and is_qwen2_5_vision(visual) and configured_attention(visual.config) == "sdpa"
        )
        self.vision_kwargs = qwen2_5_vision_index_tensors(
            visual, self.grid_thw, varlen=True if self.packed_attention else None
        )
        if self.packed_attention:
            head_dim = vision_config.hidden_size // vision_config.num_heads
            flash = flash_kernel_usable(device, visual.dtype, head_dim)
            self.vision_kwargs["block_diagonal_masks"] = BlockDiagonalMasks(flash=flash)
        if compile and hasattr(visual, "blocks"):
            for block in visual.blocks:  # one shape per frame size; the blocks share their compiled graph
                block.compile(dynamic=False)
        embeddings = model.get_input_embeddings()(prompt.frame_ids.to(device))  # (L, hidden)
        self.before = embeddings[: prompt.vision_tokens.start]
        self.after = embeddings[prompt.vision_tokens.stop :]
        self.graph: torch.cuda.CUDAGraph | None = None

    def prepare(self, frame) -> torch.Tensor:
        """(3, H, W) float32 pixel values 0..255 on the model's device, at the configured size."""
        pixels = frame_tensor(frame).to(self.model.device, non_blocking=True).permute(2, 0, 1).float()
        if tuple(pixels.shape[1:]) != self.size:
            pixels = F.interpolate(pixels[None], size=self.size, mode="bicubic", antialias=True)[0]
            pixels = pixels.round().clamp(0, 255)  # as a uint8 frame of this size would hold
        return pixels

    def patches(self, pixels: torch.Tensor) -> torch.Tensor:
        """(3, H, W) -> (h * w, 3 * temporal * patch * patch) rows in the image processor's order."""
        if self.rescale is not None:
            pixels = (pixels.double() * self.rescale).float()  # the processor rescales in float64
        if self.mean is not None:
            pixels = (pixels - self.mean) / self.std
        channels, p, m, t = 3, self.patch, self.merge, self.temporal
        grid_h, grid_w = self.size[0] // p, self.size[1] // p
        # A still image fills every temporal slot of a patch: (t, 3, H, W), then merge blocks of m x m patches.
        pixels = pixels[None].expand(t, -1, -1, -1)
        pixels = pixels.reshape(t, channels, grid_h // m, m, p, grid_w // m, m, p)
        pixels = pixels.permute(2, 5, 3, 6, 1, 0, 4, 7)  # (h/m, w/m, m, m, 3, t, p, p)
        return pixels.reshape(grid_h * grid_w, channels * t * p * p)

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        visual = self.model.model.visual
        rows = self.patches(pixels).to(visual.dtype)
        attention = packed_attention_on(visual.config) if self.packed_attention else contextlib.nullcontext()
        with attention:
            features = visual(rows, grid_thw=self.grid_thw, **self.vision_kwargs).pooler_output
        return torch.cat([self.before, features.to(self.before.dtype), self.after])[None]

    def __call__(self, frame) -> torch.Tensor:
        """The frame's token embeddings; from the graph, a buffer that the next frame overwrites."""
        pixels = self.prepare(frame)
        if not self.use_graph:
            return self.encode(pixels)
        if self.graph is None:
            try:
                self.input = pixels.clone()
                self.graph, self.output = capture_cuda_graph(lambda: self.encode(self.input))
            except Exception as error:  # a capture can fail in many ways; eager always works
                warnings.warn(
                    f"CUDA graph capture of the frame encoder failed ({error}); running it eagerly.",
                    stacklevel=3,
                )
                self.use_graph, self.graph = False, None
                return self.encode(pixels)
        self.input.copy_(pixels)
        self.graph.replay()
        return self.output


# ----------------------------------------------------------------------------------------------- cache


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
    the entries of its dict attributes (a mixer's states)."""
    slots = []
    for key, value in vars(layer).items():
        if isinstance(value, torch.Tensor):
            slots.append((vars(layer), key, value))
        elif isinstance(value, dict):
            slots += [(value, k, v) for k, v in value.items() if isinstance(v, torch.Tensor)]
    return slots


def cache_tensor_slots(cache) -> list[tuple[dict, str, torch.Tensor]]:
    return [slot for layer in cache.layers for slot in layer_tensor_slots(layer)]


def held_window(layer) -> tuple[torch.Tensor, torch.Tensor]:
    """The keys and values of the tokens a sliding-window cache layer holds, oldest first (a fixed window's
    occupied slots)."""
    return layer.kept() if isinstance(layer, FixedWindowLayer) else (layer.keys, layer.values)


def held_states(cache) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) of the tokens' states a cache holds, comparable between cache kinds: each sliding-window
    layer's keys and values (of a fixed window, its occupied slots), each other layer's tensors (a mixer's
    states)."""
    held = []
    for layer in cache.layers:
        if getattr(layer, "is_sliding", False):
            held += list(zip(("keys", "values"), held_window(layer), strict=True))
        else:
            held += [(key, tensor) for _, key, tensor in layer_tensor_slots(layer)]
    return held


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


class StaticAnswers:
    """Answers decoded over a `StaticHybridCache` by a `StaticDecoder` (its one-token step a CUDA graph on CUDA).

    Each question starts by copying the stream's state into the static cache's own buffers, so that the step
    captured over them stays valid from one question to the next; the stream's cache is only read.
    """

    def __init__(self, model):
        # max_length bounds full-attention layers only, and a stream has none
        self.cache = StaticHybridCache.for_model(model, batch_size=1, max_length=1)
        self.decoder = StaticDecoder(model, self.cache)

    def start(
        self, state: StreamState, token_ids: list[int]
    ) -> tuple[torch.Tensor, Callable[[int], torch.Tensor]]:
        """Prefill the question after the stream's state: the next (1, vocab) fp32 logits, and the step function."""
        load_static_cache(self.cache, state.cache)
        device = self.cache.device
        ids = torch.tensor([token_ids], device=device)
        logits = self.decoder.prefill(
            ids, position_ids=text_positions(state.position, len(token_ids), device)
        )
        return logits.float(), self.step

    def step(self, token_id: int) -> torch.Tensor:
        return self.decoder.step(torch.tensor([token_id], device=self.cache.device)).float()


def load_static_cache(static, cache: DynamicCache) -> None:
    """Copy a stream's `DynamicCache` into a `StaticHybridCache` (same model, batch 1, no full attention):
    mixer states as they are; the keys and values a sliding-window layer holds (its last `window - 1` at most)
    into the ring slots of their tokens (token i in slot i % window), which become the only valid slots."""
    seen = cache.get_seq_length()
    for valid in static.valid.values():
        valid.zero_()
    for target, source in zip(static.layers, cache.layers, strict=True):
        if isinstance(target, MixerCacheLayer):
            target.store(**source.states)
            continue
        keys, values = held_window(source)
        kept = keys.shape[-2]
        slots = torch.arange(seen - kept, seen, device=static.device) % target.capacity
        target.keys.index_copy_(2, slots, keys)
        target.values.index_copy_(2, slots, values)
        static.valid[target.capacity].index_fill_(1, slots, True)
    static.length.fill_(seen)
    static.seen_tokens = seen
    static.advance_host(0)


# ----------------------------------------------------------------------------------------------- video


def video_duration(path) -> float:
    """Seconds of the first video stream, read from the container header."""
    av = import_av()
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            if stream.duration is not None:
                return float(stream.duration * stream.time_base)
            if container.duration is not None:
                return container.duration / 1e6
    except (av.FFmpegError, IndexError, OSError) as error:
        raise ValueError(f"Cannot read video {str(path)!r}: {error}") from None
    raise ValueError(f"Video {str(path)!r} has no duration in its header.")


def sample_video(path, fps: float) -> Iterator[tuple[float, np.ndarray]]:
    """(seconds from the start, (H, W, 3) uint8 RGB) of the first frame at or after each multiple of 1 / fps;
    a video with fewer frames than that gives each frame once."""
    av = import_av()
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        start, due = None, 0.0
        for index, frame in enumerate(container.decode(stream)):
            time = frame.time if frame.time is not None else index / float(stream.average_rate or 1)
            start = time if start is None else start
            time -= start
            if time + 1e-6 < due:
                continue
            yield time, frame.to_ndarray(format="rgb24")
            due = (math.floor(time * fps + 1e-6) + 1) / fps


# ----------------------------------------------------------------------------------------------- session


class StreamingSession:
    """Feed video frames one at a time into a (hybrid) Qwen2.5-VL in constant memory; ask questions any time.

        session = StreamingSession(model, processor, frame_size=448)
        for frame in frames:            # PIL images, (H, W, 3) uint8 arrays or tensors
            session.add_frame(frame)
            if ...:
                print(session.ask("What just happened?", max_new_tokens=64))

    frame_size: 448 or (height, width), multiples of the ViT's patch x merge size (28 for Qwen2.5-VL); frames
    of another size are resized on the device. system_prompt: None keeps the chat template's default.
    cuda_graphs: capture the frame encoder and the per-frame prefill in CUDA graphs (default: on CUDA).
    static_decode: decode answers over a static hybrid cache (`hybridize.inference.decode.StaticDecoder`, its
    decode step a CUDA graph on CUDA) instead of a branch of the stream's DynamicCache (default: on CUDA, for
    models without growing layers and with SDPA or eager attention).
    allow_growing_cache: stream into a model with full-attention layers, whose cache grows with every frame.
    compile: torch.compile the vision blocks and the captured per-frame prefill (CUDA graphs only; the first
    frames compile, about a minute for Qwen2.5-VL-3B). The model's vision blocks stay compiled after the session.
    fuse: `hybridize.inference.fusion.fuse_projections(model)` first (sibling projections of the mixers and the
    gated MLPs, ViT included, as one matrix product each; the model computes the same).
    """

    @torch.no_grad()  # not inference mode: its tensors stay usable wherever the caller runs the encoder
    def __init__(
        self,
        model,
        processor,
        *,
        frame_size: int | tuple[int, int] = 448,
        system_prompt: str | None = None,
        cuda_graphs: bool | None = None,
        static_decode: bool | None = None,
        allow_growing_cache: bool = False,
        fuse: bool = True,
        compile: bool = False,
    ):
        inner = getattr(model, "model", None)
        if not all(hasattr(inner, name) for name in ("visual", "get_rope_index")):
            raise ValueError(
                f"StreamingSession needs a Qwen2.5-VL-family model (a vision tower `model.visual` and M-RoPE "
                f"`model.get_rope_index`); {type(model).__name__} has not."
            )
        self.model = model.eval()
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.growing = growing_layers(model)
        if self.growing and not allow_growing_cache:
            layers = ", ".join(f"{idx}: {why}" for idx, why in self.growing.items())
            raise ValueError(
                f"The model's cache would grow with every frame (layers {layers}). Stream into a hybrid with "
                "sliding-window and linear layers only, or pass allow_growing_cache=True."
            )
        vision_config = model.config.vision_config
        factor = vision_config.patch_size * vision_config.spatial_merge_size
        self.frame_size = parse_frame_size(frame_size, factor)
        patches = [side // vision_config.patch_size for side in self.frame_size]
        grid_thw = torch.tensor([[1, *patches]])  # one temporal patch of h x w patches
        self.prompt = build_frame_prompt(model, processor, grid_thw, system_prompt)
        device = model.device
        if cuda_graphs is None:
            cuda_graphs = device.type == "cuda"
        if cuda_graphs and device.type != "cuda":
            raise ValueError(f"cuda_graphs=True needs the model on a CUDA device, it is on {device}.")
        self.cuda_graphs = cuda_graphs
        if compile and not cuda_graphs:
            raise ValueError(
                "compile=True compiles the CUDA-graph-captured steps; it needs cuda_graphs=True."
            )
        self.compile = compile
        self.encoder = FrameEncoder(
            model, processor, self.prompt, self.frame_size, use_graph=cuda_graphs, compile=compile
        )
        # Fixed windows and the static answer cache both need a fixed-size cache and an attention
        # implementation whose masks they can replace.
        implementation = configured_attention(model.config.get_text_config(decoder=True))
        self.window_cache = not self.growing and implementation in SUPPORTED_ATTENTION
        if static_decode is None:
            static_decode = device.type == "cuda" and self.window_cache
        if static_decode and self.growing:
            raise ValueError(
                "static_decode needs a model without growing layers (its cache has a fixed size)."
            )
        self.static_decode = static_decode
        self.static_answers: StaticAnswers | None = None  # built by the first question
        self.frame_positions = self.prompt.frame_positions.to(device)[:, None]  # (3, 1, L)
        if fuse:  # after every input check: it rewrites the model's parameters as views
            fuse_projections(model)
        self.reset()

    @property
    def tokens_per_frame(self) -> int:
        return len(self.prompt.frame_ids)

    @property
    def position(self) -> int:
        """The M-RoPE position the next token gets."""
        return self.state.position

    @torch.inference_mode()
    def reset(self) -> None:
        """Start a new stream: an empty cache with the system turn and the start of the user turn prefilled."""
        self.state = StreamState(
            self.model, full_attention_mask=bool(self.growing), window_cache=self.window_cache
        )
        self.state.prefill_text(self.prompt.prefix_ids)
        self.frames = 0
        self.captured: CapturedPrefill | None = None
        self.capture_prefill = self.cuda_graphs and not self.growing
        self.steady = False  # the last eager frame left the cache's shapes as they were

    @property
    def prefill_graph(self) -> torch.cuda.CUDAGraph | None:
        """The CUDA graph the next frame's prefill replays, if any."""
        return None if self.captured is None else self.captured.graphs[self.captured.phase()][0]

    @torch.inference_mode()
    def add_frame(self, frame) -> None:
        """Encode one frame and prefill its tokens into the stream's state. The work is queued on the GPU and
        not waited for: a frame in pinned host memory must stay unchanged until the GPU has copied it."""
        embeds = self.encoder(frame)
        positions = self.frame_positions + self.state.position
        if self.captured is None and self.capture_prefill and self.steady:
            full = self.state.window_full()
            # With fixed windows, the graph for a full window is captured now too, though it runs later.
            phases = (None,) if full is None else ((True,) if full else (False, True))
            try:
                self.captured = CapturedPrefill(
                    self.state, embeds, positions, compile=self.compile, phases=phases
                )
            except Exception as error:  # a capture can fail in many ways; eager always works
                warnings.warn(
                    f"CUDA graph capture of the frame prefill failed ({error}); running it eagerly.",
                    stacklevel=2,
                )
                self.capture_prefill = False
        if self.captured is not None:
            self.captured(embeds, positions)
            self.state.position += self.prompt.frame_span
        else:
            shapes = cache_shapes(self.state.cache)
            self.state.prefill(embeds, positions, self.prompt.frame_span)
            self.steady = shapes == cache_shapes(self.state.cache)
        self.frames += 1

    @torch.inference_mode()
    def next_token_logits(self) -> torch.Tensor:
        """(1, vocab) fp32 logits after the last token prefilled."""
        return self.state.logits()

    @torch.inference_mode()
    def ask_ids(self, question: str, max_new_tokens: int = 64, do_sample: bool = False) -> list[int]:
        """The answer's token ids, up to and including an end-of-sequence token; the stream is left as it was.

        Greedy by default; do_sample draws with the generation config's temperature, top-k and top-p.
        Repetition penalties are not applied: they need the whole token history, which a stream does not keep.
        """
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}.")
        question_ids = self.tokenizer(question + self.prompt.suffix, add_special_tokens=False)["input_ids"]
        if self.static_decode:
            if self.static_answers is None:
                self.static_answers = StaticAnswers(self.model)
            logits, step = self.static_answers.start(self.state, question_ids)
        else:
            branch = self.state.branch()
            branch.prefill_text(question_ids)
            logits, step = branch.logits(), branch.decode
        pick = sampler(self.model.generation_config) if do_sample else greedy
        stop = end_of_sequence_ids(self.model.generation_config, self.tokenizer)
        tokens = []
        while True:
            tokens.append(pick(logits))
            if tokens[-1] in stop or len(tokens) == max_new_tokens:
                return tokens
            logits = step(tokens[-1])

    def ask(self, question: str, max_new_tokens: int = 64, do_sample: bool = False) -> str:
        """Answer a question about the frames so far, without disturbing the stream."""
        tokens = self.ask_ids(question, max_new_tokens, do_sample)
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def cache_bytes(self) -> int:
        """Bytes of every tensor the stream's state holds (each storage counted once)."""
        storages = {
            tensor.untyped_storage().data_ptr(): tensor.untyped_storage().nbytes()
            for tensor in self.state.tensors()
        }
        return sum(storages.values())


def greedy(logits: torch.Tensor) -> int:
    return int(logits.argmax(-1))


def sampler(generation_config) -> Callable[[torch.Tensor], int]:
    warpers = LogitsProcessorList()
    temperature = generation_config.temperature
    if temperature is not None and temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(temperature))
    if generation_config.top_k:
        warpers.append(TopKLogitsWarper(generation_config.top_k))
    if generation_config.top_p is not None and generation_config.top_p < 1.0:
        warpers.append(TopPLogitsWarper(generation_config.top_p))

    def pick(logits: torch.Tensor) -> int:
        scores = warpers(None, logits)
        return int(torch.multinomial(scores.softmax(-1), 1))

    return pick


def end_of_sequence_ids(generation_config, tokenizer) -> set[int]:
    eos = generation_config.eos_token_id
    if eos is None:
        eos = tokenizer.eos_token_id
    return set([eos] if isinstance(eos, int) else list(eos or []))

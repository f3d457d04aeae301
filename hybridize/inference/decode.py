"""Fast decoding over a static hybrid cache: an eager prefill, then one-token steps replayed as a CUDA graph.

`StaticDecoder(model, cache)` prefills prompts into a `StaticHybridCache` (the model's own forward, chunked for
long text prompts) and runs decode steps. A step is the model's forward on one token whose inputs are all
device tensors at fixed addresses: the token buffer, the cache's next position ids, the masks (views of which
cache slots hold real tokens) and the cache buffers, which the step updates in place. Attention layers run
with `grouped_decode_attention`, in which the query heads sharing a key/value head stand in for query
positions (no repeated keys). On CUDA the step runs eagerly twice (so that kernels are compiled and tuned), is
then captured once and replayed for every later token; optionally its forward goes through torch.compile
first, which fuses the many small elementwise kernels between the matrix products.

Rows can be filled one request at a time: `admit(row, input_ids)` prefills a prompt alone (into a one-row cache
of the same layout, eagerly) and moves it into a free row of the running cache, `release(row)` frees a row whose
sequence ended; neither touches the other rows or the captured step (`hybridize.inference.serving.serve` is a
loop over them).

`generate_fast(model, **inputs, max_new_tokens=...)`, or `model.generate(..., custom_generate=static_generate)`,
is `generate()` with this decoder in place of its token loop: generate prepares the inputs, positions, logits
processors and stopping criteria as usual, so greedy decoding gives generate's tokens and sampling draws from
the same distributions with the same random numbers.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator

import torch
from torch import nn
from transformers import AttentionInterface

from hybridize.compat import (
    GENERATE_LOOP_KWARGS,
    attention_implementation,
    cache_argument,
    causal_mask,
    configured_attention,
    generation_cache,
    generation_position_ids,
    pad_token_tensor,
    sdpa_attention_forward,
    sliding_window_causal_mask,
)
from hybridize.converters.discovery import attention_configs, find_decoder_layout
from hybridize.inference.cuda_graphs import WARMUP_STEPS, capture_cuda_graph, compile_options, on_side_stream
from hybridize.inference.fusion import fuse_projections
from hybridize.inference.sampling import choose_next_tokens
from hybridize.inference.static_cache import FULL, SLIDING, StaticHybridCache
from hybridize.mixers.base import TokenMixer
from hybridize.mixers.flash_window import FLASH_WINDOW
from hybridize.mixers.ops.dtypes import compute_dtype

DECODE_ATTENTION = "hybridize_static_decode"
SUPPORTED_ATTENTION = ("sdpa", "eager")


def grouped_decode_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention of one new token over a static buffer, for transformers' attention interface.

    query (B, Hq, 1, D); key, value (B, Hkv, S, D); attention_mask (B, 1, 1, S) bool. The Hq / Hkv query heads
    of each key/value head are laid along the query-length axis, so every key is read once (no repeated keys).
    Written as two matrix products rather than one SDPA call: a fused attention kernel spreads its work over
    batch x heads x query blocks, a handful of blocks here (on an H100, cuDNN's took 0.16 ms per 8192-key
    window, 1.4 of the 8.8 ms hybrid step). Scores and softmax in fp32 (fp64 stays), the probabilities cast back for the value
    product as flash attention does. Returns (B, 1, Hq, D) like transformers' SDPA attention.
    """
    if query.shape[2] != 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    for unsupported in ("softcap", "s_aux"):
        if kwargs.get(unsupported) is not None:
            raise NotImplementedError(f"Static decoding does not support attention with {unsupported!r}.")
    batch, heads, _, dim = query.shape
    kv_heads = key.shape[1]
    scale = dim**-0.5 if scaling is None else scaling
    dtype = compute_dtype(query)
    # (B, Hq, 1, D) -> (B, Hkv, Hq/Hkv, D): query head h reads key/value head h // (Hq / Hkv)
    grouped = query.reshape(batch, kv_heads, heads // kv_heads, dim)
    if query.is_cuda and query.dtype in (torch.bfloat16, torch.float16) and dtype == torch.float32:
        # bf16 products with fp32 scores out, as flash attention computes them: no fp32 copy of the keys
        scores = torch.bmm(
            grouped.flatten(0, 1), key.flatten(0, 1).transpose(-1, -2), out_dtype=torch.float32
        ).unflatten(0, (batch, kv_heads))
    else:
        scores = torch.matmul(grouped.to(dtype), key.to(dtype).transpose(-1, -2))
    scores = scores * scale  # (B, Hkv, Hq/Hkv, S)
    if attention_mask is not None:
        scores = scores.masked_fill(~attention_mask, float("-inf"))
    probabilities = torch.softmax(scores, dim=-1).to(value.dtype)
    out = torch.matmul(probabilities, value)  # (B, Hkv, Hq/Hkv, D)
    return out.reshape(batch, heads, 1, value.shape[-1]).transpose(1, 2).contiguous(), None


AttentionInterface.register(DECODE_ATTENTION, grouped_decode_attention)


@contextlib.contextmanager
def _attention_in(configs: list, name: str) -> Iterator[None]:
    """Attention modules (and the masks built for them) use implementation `name` inside this block: the decode
    step's `grouped_decode_attention`, the prefill's flash window. Their configs are restored after."""
    with contextlib.ExitStack() as stack:
        for config in configs:
            stack.enter_context(attention_implementation(config, name))
        yield


def _accepts(model: nn.Module, name: str) -> bool:
    return name in inspect.signature(model.forward).parameters


class StaticDecoder:
    """Prefill and one-token decode steps of `model` over `cache` (a `StaticHybridCache` laid out for it).

    cuda_graph: None captures the decode step on CUDA and runs it eagerly elsewhere; True insists on the
    graph, False never captures. The graph is tied to this cache's buffers: to decode from another state,
    `cache.copy_from(saved)` it in (a branch of a stream: `saved = cache.clone()`, decode, copy back).
    compile: run the decode step's forward through `torch.compile` before the capture (fuses the small
    elementwise kernels between the matrix products; the first step compiles, ~30 s for Qwen2.5-VL-3B); True
    or a mode of `hybridize.inference.cuda_graphs.COMPILE_MODES` ("max-autotune-no-cudagraphs" also tunes the
    matrix products' kernels, minutes more).
    fuse: `hybridize.inference.fusion.fuse_projections(model)` first (sibling projections as one matrix product
    under no_grad; the caller's parameters become views of the fused weights, the model computes the same;
    `unfuse_projections(model)` undoes it). Off unless asked for.
    Every row decodes at each step, free rows too (their logits mean nothing): `cache.free_rows` lists them.
    """

    def __init__(
        self,
        model: nn.Module,
        cache: StaticHybridCache,
        *,
        cuda_graph: bool | None = None,
        compile: bool | str = False,
        fuse: bool = False,
    ):
        compile_kwargs = compile_options(compile)
        layout = find_decoder_layout(model)
        self.text_config = layout.decoder.config
        implementation = configured_attention(self.text_config)
        if implementation not in SUPPORTED_ATTENTION:
            raise ValueError(
                f"Static decoding runs models with attn_implementation in {SUPPORTED_ATTENTION}, got "
                f"{implementation!r}; load the model with attn_implementation='sdpa'."
            )
        if cuda_graph and cache.device.type != "cuda":
            raise ValueError(
                f"cuda_graph=True needs the model and cache on a CUDA device, not {cache.device}."
            )
        self.model, self.cache = model, cache
        if fuse:
            fuse_projections(model)
        self._decode_forward = model
        if compile_kwargs is not None:
            self._decode_forward = torch.compile(model, dynamic=False, **compile_kwargs)
        self.cuda_graph = cache.device.type == "cuda" if cuda_graph is None else cuda_graph
        self.tokens = torch.zeros(cache.batch_size, 1, dtype=torch.long, device=cache.device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None  # the captured step's output, overwritten by every replay
        self.eager_steps = 0
        self._admission: StaticDecoder | None = None  # a one-row decoder that prefills admitted prompts
        self._configs = attention_configs(model)
        # Prefill through the flash kernel with each layer's window (`mixers.flash_window`): the static cache hands
        # attention its kept keys oldest first, so the 2-D padding mask of everything so far is all it needs. Not
        # with mixers that wrap an attention module and build their own masks (the fallback sliding window).
        self._flash_prefill = not any(
            isinstance(module, TokenMixer) and module.wraps_attention for module in model.modules()
        )
        self._logits_to_keep = {"logits_to_keep": 1} if _accepts(model, "logits_to_keep") else {}
        self._decode_masks = self._mask_argument(self._decode_mask_by_type())

    # --- masks ------------------------------------------------------------------------------------------

    def _layer_types(self) -> list[str] | None:
        return getattr(self.text_config, "layer_types", None)

    def _mask_argument(self, masks: dict[str, torch.Tensor]):
        """What the model's forward takes: a mask per layer type (families with per-layer windows, which accept
        a prepared dict) or one 4-D mask for every layer."""
        return masks if self._layer_types() else masks["full_attention"]

    def _decode_mask_by_type(self) -> dict[str, torch.Tensor]:
        """Layer type -> (B, 1, 1, capacity) view of the slots holding real tokens. Layers of type
        "full_attention" that are linear mixers ignore it (one token has no padding); sliding-window mixers take
        their ring's mask from their cache slot."""
        cache = self.cache
        full, sliding = cache.layer_indices(FULL), cache.layer_indices(SLIDING)
        dummy = torch.ones(cache.batch_size, 1, 1, 1, dtype=torch.bool, device=cache.device)
        masks = {"full_attention": dummy}
        if full:
            masks["full_attention"] = cache.decode_masks[cache.layouts[full[0]].capacity]
        if sliding:
            masks["sliding_attention"] = cache.decode_masks[cache.layouts[sliding[0]].capacity]
        return masks

    def _prefill_masks(self, attention_mask: torch.Tensor, length: int):
        """Masks for `length` new tokens, given the 2-D padding mask of everything so far."""
        if not self._layer_types():
            return attention_mask  # the model builds its mask with the cache's (dynamic-layer) mask sizes
        cache = self.cache
        embeds = torch.empty(cache.batch_size, length, 0, dtype=cache.dtype, device=cache.device)
        common = dict(config=self.text_config, inputs_embeds=embeds, attention_mask=attention_mask)
        full, sliding = cache.layer_indices(FULL), cache.layer_indices(SLIDING)
        native_sliding = [idx for idx in sliding if self._layer_types()[idx] == "sliding_attention"]
        masks = {}
        if full:
            masks["full_attention"] = causal_mask(**common, cache=cache, layer_idx=full[0])
        else:
            # Only mixers (linear, or sliding-window ones building their own masks) read it, for the new
            # tokens' padding: a (B, 1, 1, T) mask instead of one over the whole context.
            masks["full_attention"] = attention_mask[:, None, None, -length:].bool()
        if native_sliding:
            masks["sliding_attention"] = sliding_window_causal_mask(
                **common, cache=cache, layer_idx=native_sliding[0]
            )
        return masks

    # --- prefill ----------------------------------------------------------------------------------------

    def _check_batch(self, batch_size: int) -> None:
        if batch_size != self.cache.batch_size:
            raise ValueError(
                f"The inputs hold {batch_size} sequences but the static cache was built for batch_size="
                f"{self.cache.batch_size}; build a cache (and decoder) for batch_size={batch_size}."
            )

    def prompt_positions(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **model_inputs
    ) -> torch.Tensor:
        """Position ids of new tokens as `generate()` makes them: from the padding mask on an empty cache (M-RoPE
        models add their vision positions and remember `rope_deltas`), else continuing the cache's positions."""
        if self.cache.seen_tokens == 0:
            return generation_position_ids(self.model, input_ids, attention_mask, **model_inputs)
        if self.cache.position is None:
            raise RuntimeError("The cache holds tokens but no positions; fill it with StaticDecoder.prefill.")
        steps = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        return self.cache.position + steps

    @torch.no_grad()
    def prefill(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        *,
        chunk_size: int | None = None,
        **model_inputs,
    ) -> torch.Tensor:
        """Run the new tokens through the model into the cache (appending to what it holds); returns the last
        token's logits (B, vocab).

        attention_mask: (B, T) padding mask of the new tokens (left padding); position_ids: as the model takes
        them, default `prompt_positions`. chunk_size splits a text prompt into forwards of that many tokens
        (constant memory on hybrids); multimodal inputs (images, video) go in one forward.
        """
        batch, length = input_ids.shape
        self._check_batch(batch)
        if length == 0:
            raise ValueError("prefill needs at least one token.")
        self.cache.check_room(length)
        device = self.cache.device
        input_ids = input_ids.to(device)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        attention_mask = attention_mask.to(device)
        model_inputs = {
            key: value.to(device) if torch.is_tensor(value) else value for key, value in model_inputs.items()
        }
        if position_ids is None:
            position_ids = self.prompt_positions(input_ids, attention_mask, **model_inputs)
        position_ids = position_ids.to(device)
        per_token = {key for key in ("mm_token_type_ids", "token_type_ids") if key in model_inputs}
        if chunk_size is not None and set(model_inputs) - per_token:
            raise ValueError(
                f"chunk_size splits text prompts only; these inputs go in one forward: "
                f"{sorted(set(model_inputs) - per_token)}. Leave chunk_size=None."
            )
        chunk_size = chunk_size or length
        # transformers' masks index the padding mask of every token so far by position
        history = self.cache.padding_history().to(attention_mask.dtype)
        logits = None
        flash = (
            _attention_in(self._configs, FLASH_WINDOW) if self._flash_prefill else contextlib.nullcontext()
        )
        with flash:
            for start in range(0, length, chunk_size):
                stop = min(start + chunk_size, length)
                chunk_mask = attention_mask[:, start:stop]
                so_far = torch.cat([history, attention_mask[:, :stop]], dim=1)
                inputs = {key: model_inputs[key][:, start:stop] for key in per_token}
                if start == 0:
                    inputs = {**model_inputs, **inputs}
                outputs = self.model(
                    input_ids=input_ids[:, start:stop],
                    attention_mask=so_far
                    if self._flash_prefill
                    else self._prefill_masks(so_far, stop - start),
                    position_ids=position_ids[..., start:stop],
                    use_cache=True,
                    **cache_argument(self.cache),
                    **self._logits_to_keep,
                    **inputs,
                )
                self.cache.record_tokens(chunk_mask.bool(), position_ids[..., stop - 1 : stop] + 1)
                logits = outputs.logits[:, -1]
        return logits

    # --- decode -----------------------------------------------------------------------------------------

    def _forward_step(self) -> torch.Tensor:
        """One decode step on the token in `self.tokens`, reading and updating only device tensors."""
        cache = self.cache
        cache.decoding = True
        try:
            with _attention_in(self._configs, DECODE_ATTENTION):
                cache.begin_decode_step()
                logits = self._decode_forward(
                    input_ids=self.tokens,
                    attention_mask=self._decode_masks,
                    position_ids=cache.position,
                    use_cache=True,
                    **cache_argument(cache),
                ).logits
                cache.end_decode_step()
        finally:
            cache.decoding = False
        return logits

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per sequence (B,) and return the next logits (B, vocab) in the model's dtype. With a
        CUDA graph the result is overwritten by the next step: copy it to keep it."""
        if self.cache.position is None or not self.cache.mixer_states_ready:
            raise RuntimeError(
                "The cache is empty: prefill a prompt (StaticDecoder.prefill) before decoding."
            )
        self.cache.check_room(1, held=max(self.cache.row_tokens))
        self.tokens.copy_(tokens.view(-1, 1))
        if self.graph is None and self.cuda_graph and self.eager_steps >= WARMUP_STEPS:
            # the eager steps so far were the warm-up (real steps: they advanced the cache)
            self.graph, self.logits = capture_cuda_graph(self._forward_step, warmup_steps=0)
        if self.graph is not None:
            self.graph.replay()
        elif self.cuda_graph:  # warm-up on a side stream, as graph capture requires
            self.logits = on_side_stream(self._forward_step, self.cache.device)
            self.eager_steps += 1
        else:
            self.logits = self._forward_step()
            self.eager_steps += 1
        self.cache.advance_host(1)
        return self.logits[:, -1]

    # --- rows that come and go --------------------------------------------------------------------------

    @torch.no_grad()
    def admit(
        self,
        row: int,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        chunk_size: int | None = None,
        **model_inputs,
    ) -> torch.Tensor:
        """Start a new sequence in free row `row` while the other rows keep theirs: its prompt (input_ids (1, T),
        model inputs as for `prefill`) is prefilled alone and moved into the row (`StaticHybridCache.load_row`:
        the buffers keep their addresses, so a captured step stays valid). Returns its last logits (1, vocab);
        feed its next token to `step` in that row."""
        self.cache.check_free_row(row)
        if input_ids.dim() != 2 or input_ids.shape[0] != 1:
            raise ValueError(
                f"admit takes one prompt shaped (1, T), got input_ids of shape {tuple(input_ids.shape)}; admit "
                "each sequence into its own row."
            )
        if self._admission is None:
            cache = self.cache
            single = StaticHybridCache(cache.layouts, 1, cache.dtype, cache.device)
            self._admission = StaticDecoder(self.model, single, cuda_graph=False, fuse=False)
        self._admission.cache.reset()
        logits = self._admission.prefill(input_ids, attention_mask, chunk_size=chunk_size, **model_inputs)
        self.cache.load_row(row, self._admission.cache)
        return logits

    def release(self, row: int) -> None:
        """Free `row` (its sequence ended) for a later `admit`; it keeps being computed until then."""
        self.cache.release_row(row)


@torch.no_grad()
def static_generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    logits_processor,
    stopping_criteria,
    generation_config,
    decoder: StaticDecoder | None = None,
    cuda_graph: bool | None = None,
    compile: bool | str = False,
    fuse: bool = False,
    prefill_chunk_size: int | None = None,
    sync_every: int = 16,
    token_streamer=None,
    **model_kwargs,
) -> torch.Tensor:
    """generate()'s token loop over a static hybrid cache: pass it as `model.generate(...,
    custom_generate=static_generate)`; generate prepares everything else as usual.

    decoder: a `StaticDecoder` to reuse (its captured graph and buffers; its batch size must match; its cache is
    reset: to continue from a filled cache, call `decoder.step` yourself), else one
    is built for this call (cache max_length = prompt + max_new_tokens) with `cuda_graph`, `compile` and `fuse`
    (see `StaticDecoder`). sync_every: steps between host checks
    for every sequence having finished (each check waits for the GPU); steps run past that point are cut from
    the output, which is what generate() returns. token_streamer: a transformers streamer (`TextStreamer`) fed
    the prompt and then each new token (generate() keeps its own `streamer` argument from custom loops).
    Returns the token ids (B, prompt + new), as generate().
    """
    if generation_config.num_beams > 1 or generation_config.return_dict_in_generate:
        raise ValueError(
            "static_generate decodes one sequence per row (num_beams=1) and returns token ids; got "
            f"num_beams={generation_config.num_beams}, "
            f"return_dict_in_generate={generation_config.return_dict_in_generate}."
        )
    if sync_every < 1:
        raise ValueError(f"sync_every must be a positive number of steps, got {sync_every}.")
    batch, prompt_length = input_ids.shape
    new_tokens = generation_config.max_length - prompt_length
    user_cache = generation_cache(model_kwargs)
    inputs = {key: value for key, value in model_kwargs.items() if key not in GENERATE_LOOP_KWARGS}
    if decoder is None:
        if isinstance(user_cache, StaticHybridCache):
            cache = user_cache
        else:
            cache = StaticHybridCache.for_model(model, batch, generation_config.max_length)
        decoder = StaticDecoder(model, cache, cuda_graph=cuda_graph, compile=compile, fuse=fuse)
    decoder._check_batch(batch)
    decoder.cache.reset()
    decoder.cache.check_room(prompt_length + max(new_tokens - 1, 0))

    if token_streamer is not None:  # it gets each token on the host: check for the end at every step too
        token_streamer.put(input_ids.cpu())
        sync_every = 1
    logits = decoder.prefill(input_ids, chunk_size=prefill_chunk_size, **inputs)
    pad_token_id = pad_token_tensor(generation_config)
    has_eos_stopping_criteria = any(hasattr(criteria, "eos_token_id") for criteria in stopping_criteria)
    sequences = torch.empty(
        batch, generation_config.max_length, dtype=input_ids.dtype, device=input_ids.device
    )
    sequences[:, :prompt_length] = input_ids
    unfinished = torch.ones(batch, dtype=torch.long, device=input_ids.device)
    all_finished = torch.zeros(max(new_tokens, 1), dtype=torch.bool, device=input_ids.device)
    length = prompt_length
    for step in range(new_tokens):
        next_tokens, scores = choose_next_tokens(
            logits_processor, sequences[:, :length], logits, generation_config.do_sample
        )
        if has_eos_stopping_criteria:
            next_tokens = next_tokens * unfinished + pad_token_id * (1 - unfinished)
        sequences[:, length] = next_tokens
        length += 1
        if token_streamer is not None:  # a host copy per token: only when asked for
            token_streamer.put(next_tokens.cpu())
        unfinished = unfinished & ~stopping_criteria(sequences[:, :length], scores)
        all_finished[step] = unfinished.max() == 0
        last = step == new_tokens - 1
        if (step + 1) % sync_every == 0 or last:
            done = all_finished[: step + 1].nonzero()
            if len(done):
                length = prompt_length + int(done[0]) + 1
                break
        if not last:
            logits = decoder.step(next_tokens)
    if token_streamer is not None:
        token_streamer.end()
    return sequences[:, :length]


def generate_fast(
    model: nn.Module,
    input_ids: torch.Tensor | None = None,
    *,
    max_new_tokens: int | None = None,
    do_sample: bool | None = None,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    decoder: StaticDecoder | None = None,
    cuda_graph: bool | None = None,
    compile: bool | str = False,
    fuse: bool = False,
    prefill_chunk_size: int | None = None,
    sync_every: int = 16,
    streamer=None,
    **inputs,
) -> torch.Tensor:
    """`model.generate(input_ids, ..., **inputs)` decoded over a static hybrid cache with a CUDA-graph step
    (see `static_generate`). Options left as None take the model's generation config, as in generate()."""
    options = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature)
    options.update(top_k=top_k, top_p=top_p)
    options = {key: value for key, value in options.items() if value is not None}
    return model.generate(
        input_ids=input_ids,
        custom_generate=static_generate,
        decoder=decoder,
        cuda_graph=cuda_graph,
        compile=compile,
        fuse=fuse,
        prefill_chunk_size=prefill_chunk_size,
        sync_every=sync_every,
        token_streamer=streamer,
        **options,
        **inputs,
    )

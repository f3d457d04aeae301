"""The transformers boundary (hybridize.compat), run at both ends of the supported range by .ci/run.

A transformers release that renames how the cache reaches the attention module (as 5.24 did: `past_key_values`
became `cache`) would make every mixer run without its state: cached generation would then silently differ from
the uncached forward. These tests fail on exactly that: each cached step must move every mixer's state and give
the uncached forward's logits, for every mixer kind, the fallback sliding window, static decode and streaming.
Our own calls must not use a deprecated name either.
"""

from __future__ import annotations

import copy
import inspect
import logging
import warnings

import pytest
import torch
from transformers import DynamicCache
from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl

from hybridize.compat import CACHE_KEYWORD, cache_argument, output_cache, pop_cache
from hybridize.converters import convert, plan_layers
from hybridize.inference.decode import StaticDecoder
from hybridize.inference.static_cache import StaticHybridCache
from hybridize.mixers.base import TokenMixer
from hybridize.mixers.cache import MixerCacheLayer
from hybridize.testing import greedy_decode_without_cache
from tests.inference.test_streaming import QUESTION, frames, one_shot_inputs, stream_of

pytestmark = pytest.mark.transformers_surface

STEPS = 4
# float64 models, but RoPE tables and some state arithmetic stay fp32 (~1e-8 here); a step that lost its state
# is off by ~1.
TOLERANCE = dict(rtol=1e-6, atol=1e-6)


def test_the_decoder_layer_passes_the_cache_under_our_keyword():
    """The keyword `cache_argument` writes is the one this transformers' layers and models take."""
    for forward in (
        modeling_qwen2_5_vl.Qwen2_5_VLDecoderLayer.forward,
        modeling_qwen2_5_vl.Qwen2_5_VLAttention.forward,
        modeling_qwen2_5_vl.Qwen2_5_VLForConditionalGeneration.forward,
    ):
        assert CACHE_KEYWORD in inspect.signature(forward).parameters, forward.__qualname__


def test_pop_cache_takes_either_name_once():
    cache = DynamicCache()
    for name in ("cache", "past_key_values"):
        kwargs = {name: cache, "use_cache": True}
        assert pop_cache(kwargs) is cache and kwargs == {"use_cache": True}
    assert pop_cache({"past_key_values": cache, "cache": cache}) is cache
    assert pop_cache({"use_cache": True}) is None
    with pytest.raises(ValueError, match="not two different caches"):
        pop_cache({"past_key_values": cache, "cache": DynamicCache()})


PLANS = {
    "gated_deltanet": dict(ratio="1/4", window=6),
    "mamba2": dict(ratio="1/4", window=6, mixer="mamba2"),
    "gla": dict(ratio="1/4", window=6, mixer="gla"),
    "sliding_window_mixer": dict(ratio="1/2", window=6),
}


@pytest.fixture(scope="module", params=list(PLANS))
def hybrid(request, tiny_teacher):
    """A tiny hybrid of each mixer kind, in float64 so that a cache bug stands far above rounding."""
    teacher, _ = tiny_teacher
    plan = plan_layers(8, **PLANS[request.param])
    if request.param == "sliding_window_mixer":
        plan.mixers["sliding_window"]["implementation"] = "mixer"
    torch.manual_seed(0)
    model, _ = convert(copy.deepcopy(teacher), plan, progress=False)
    return model.double().eval()


def prompt(model) -> dict[str, torch.Tensor]:
    """Two text prompts, the second left-padded by 5 (padding must leave every state as without it)."""
    vocab = model.config.get_text_config(decoder=True).vocab_size
    ids = torch.randint(10, min(vocab, 200), (2, 11), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    return {"input_ids": ids, "attention_mask": mask}


def uncached_logits(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The last token's logits (B, vocab) of one forward over the whole sequence, with no cache."""
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, -1]


class StateRecorder:
    """Copies every mixer's cache slot after each of its calls (hooks see the cache as `cache`, as mixers do)."""

    def __init__(self, model):
        self.calls: dict[int, list[dict[str, torch.Tensor]]] = {}
        self.handles = [
            module.register_forward_hook(self.record, with_kwargs=True)
            for module in model.modules()
            if isinstance(module, TokenMixer)
        ]

    def record(self, module, args, kwargs, output) -> None:
        cache = pop_cache(dict(kwargs))
        slot = cache.layers[module.layer_idx] if cache is not None else None
        if isinstance(slot, MixerCacheLayer):
            tensors = dict(slot.states, seen_tokens=torch.tensor(slot.seen_tokens))
        elif slot is not None:  # the sliding-window mixer's attention slot
            tensors = {"keys": slot.keys, "values": slot.values}
        else:
            tensors = {}
        self.calls.setdefault(module.layer_idx, []).append({k: v.clone() for k, v in tensors.items()})

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


@pytest.fixture
def no_deprecation_warnings(caplog):
    """Our calls into transformers use no deprecated name: no FutureWarning, no "deprecated" log line."""
    with warnings.catch_warnings(), caplog.at_level(logging.WARNING, logger="transformers"):
        warnings.simplefilter("error", FutureWarning)
        yield
    assert not [record.message for record in caplog.records if "deprecated" in record.getMessage()]


def test_generate_moves_every_state_and_equals_the_uncached_forward(hybrid, no_deprecation_warnings):
    inputs = prompt(hybrid)
    recorder = StateRecorder(hybrid)
    try:
        with torch.no_grad():
            out = hybrid.generate(
                **inputs,
                max_new_tokens=STEPS,
                do_sample=False,
                output_logits=True,
                return_dict_in_generate=True,
            )
    finally:
        recorder.remove()
    length = inputs["input_ids"].shape[1]
    for step, logits in enumerate(out.logits):
        ids = out.sequences[:, : length + step]
        mask = torch.cat([inputs["attention_mask"], torch.ones_like(ids[:, length:])], dim=1)
        expected = uncached_logits(hybrid, ids, mask).float()  # generate() hands out fp32 logits
        torch.testing.assert_close(
            logits, expected, **TOLERANCE, msg=lambda m, step=step: f"step {step}: {m}"
        )

    assert recorder.calls, "no mixer ran"
    for layer, calls in recorder.calls.items():
        assert len(calls) == STEPS, f"layer {layer}: {len(calls)} calls"  # the prompt, then one per new token
        assert calls[0], f"layer {layer} kept no state in the cache"
        for step, (before, after) in enumerate(zip(calls, calls[1:], strict=False), start=1):
            assert before.keys() == after.keys()
            for name in after:
                assert not torch.equal(before[name], after[name]), (
                    f"layer {layer} step {step}: {name} unchanged"
                )


def test_a_model_forward_with_our_cache_keyword_fills_the_cache(hybrid, no_deprecation_warnings):
    """Prefill through `cache_argument`, then one step: the output carries the same cache (`output_cache`)."""
    inputs = prompt(hybrid)
    cache = DynamicCache(config=hybrid.config)
    with torch.no_grad():
        out = hybrid(**inputs, use_cache=True, **cache_argument(cache))
    assert output_cache(out) is cache
    slots = [layer for layer in cache.layers if isinstance(layer, MixerCacheLayer)]
    assert all(slot.seen_tokens == inputs["input_ids"].shape[1] for slot in slots)
    assert cache.get_seq_length() == inputs["input_ids"].shape[1]


def test_static_decode_steps_equal_the_uncached_forward(hybrid, no_deprecation_warnings):
    inputs = prompt(hybrid)
    cache = StaticHybridCache.for_model(hybrid, batch_size=2, max_length=inputs["input_ids"].shape[1] + STEPS)
    decoder = StaticDecoder(hybrid, cache, fuse=False)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    logits = decoder.prefill(ids, mask)
    for step in range(STEPS):
        torch.testing.assert_close(
            logits,
            uncached_logits(hybrid, ids, mask),
            **TOLERANCE,
            msg=lambda m, step=step: f"step {step}: {m}",
        )
        token = logits.argmax(-1)
        ids, mask = torch.cat([ids, token[:, None]], 1), torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        logits = decoder.step(token).clone()


def test_a_streamed_answer_equals_the_uncached_loop(tiny_hybrid, tiny_teacher, no_deprecation_warnings):
    """Frames through the stream's caches, then a question: the tokens of the uncached argmax loop over the
    whole sequence (window 8: every frame slides it)."""
    model, processor = copy.deepcopy(tiny_hybrid).double(), tiny_teacher[1]
    stream = frames(4)
    session = stream_of(model, processor, stream, frame_size=56)
    answer = session.ask_ids(QUESTION, max_new_tokens=STEPS)
    inputs = one_shot_inputs(processor, stream, QUESTION)
    expected = greedy_decode_without_cache(model, inputs, STEPS)[0, inputs["input_ids"].shape[1] :]
    assert answer == expected.tolist()

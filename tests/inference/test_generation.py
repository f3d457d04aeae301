"""generate() with the hybrid cache against an uncached argmax loop over the full sequence."""

from __future__ import annotations

import copy

import pytest
import torch

from hybridize.converters import convert, plan_layers
from hybridize.inference.chat import chat_inputs, generate_reply
from hybridize.testing import greedy_decode_without_cache
from tests.conftest import make_image

pytestmark = pytest.mark.transformers_surface  # also run on the oldest supported transformers

NEW_TOKENS = 12


def left_padded_image_batch(processor):
    inputs = chat_inputs(
        processor,
        ["Describe this image in detail, please.", "Hi"],
        [[make_image(2, (112, 84))], []],
    )
    assert (inputs["attention_mask"][1] == 0).sum() > 8  # the second prompt is left-padded beyond the window
    return inputs


def check_cached_generation_matches(model, processor):
    # float64, so that rounding differences between the chunked (prefill) and recurrent (decode) forms can
    # never flip a near-tie argmax: any difference in tokens is then a real cache bug.
    model = copy.deepcopy(model).double()
    inputs = left_padded_image_batch(processor)
    inputs["pixel_values"] = inputs["pixel_values"].double()
    with torch.no_grad():
        cached = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    expected = greedy_decode_without_cache(model, inputs, NEW_TOKENS)
    assert torch.equal(cached, expected)


def test_hybrid_cache_generation_equals_uncached_loop(tiny_teacher, tiny_hybrid):
    check_cached_generation_matches(tiny_hybrid, tiny_teacher[1])


def test_all_linear_generation_equals_uncached_loop(tiny_teacher):
    teacher, processor = tiny_teacher
    torch.manual_seed(0)
    hybrid, _ = convert(
        teacher,
        plan_layers(8, "0", options={"gated_deltanet": {"init": "attention_transfer"}}),
        progress=False,
    )
    check_cached_generation_matches(hybrid, processor)


def test_sliding_window_mixer_fallback_generation(tiny_teacher):
    teacher, processor = tiny_teacher
    plan = plan_layers(8, "1/2", window=6)
    plan.mixers["sliding_window"]["implementation"] = "mixer"
    torch.manual_seed(0)
    hybrid, _ = convert(teacher, plan, progress=False)
    check_cached_generation_matches(hybrid, processor)


def test_generate_reply_decodes_the_generated_tokens_and_streams_them(tiny_teacher, tiny_hybrid):
    from transformers.generation.streamers import BaseStreamer

    class Collect(BaseStreamer):
        def __init__(self):
            self.chunks, self.ended = [], False

        def put(self, value):
            self.chunks.append(value.reshape(-1))

        def end(self):
            self.ended = True

    processor, images = tiny_teacher[1], [make_image(3)]
    inputs = chat_inputs(processor, ["Describe."], [images])
    with torch.no_grad():
        tokens = tiny_hybrid.generate(**inputs, max_new_tokens=5, do_sample=False)[
            0, inputs["input_ids"].shape[1] :
        ]
    for static_decode in (False, True):
        streamer = Collect()
        reply = generate_reply(
            tiny_hybrid,
            processor,
            "Describe.",
            images,
            max_new_tokens=5,
            static_decode=static_decode,
            streamer=streamer,
        )
        assert reply == processor.decode(tokens, skip_special_tokens=True)
        streamed = torch.cat(streamer.chunks)  # the prompt, then each new token
        assert streamer.ended and torch.equal(streamed[-len(tokens) :], tokens)

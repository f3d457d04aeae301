"""generate() with the hybrid cache against an uncached argmax loop over the full sequence."""

from __future__ import annotations

import copy

import pytest
import torch

from hybridize.converters import convert, plan_layers
from hybridize.inference.chat import chat_inputs, generate_reply, greedy_decode_without_cache
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


def test_generate_reply_decodes_text(tiny_teacher, tiny_hybrid):
    reply = generate_reply(tiny_hybrid, tiny_teacher[1], "Describe.", [make_image(3)], max_new_tokens=5)
    assert isinstance(reply, str)

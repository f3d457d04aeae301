"""Rows admitted into and released from a running static decoder: every request's tokens against generate() run on
it alone (fp64 like the static-decode tests, so that rounding never flips a token), on CPU and with the CUDA
graph captured; and the row checks."""

from __future__ import annotations

import copy

import pytest
import torch

from hybridize.inference.chat import chat_inputs
from hybridize.inference.decode import StaticDecoder
from hybridize.inference.serving import Request, serve
from hybridize.inference.static_cache import StaticHybridCache
from tests.conftest import make_image, needs_cuda
from tests.inference.test_static_decode import TEXT_PLANS, fp64, text_hybrid

pytestmark = pytest.mark.transformers_surface  # also run on the oldest supported transformers

# (prompt tokens, max_new_tokens): in 2 rows, the second request (longer than the first) finishes first and the
# third (longer than the window and than everything the cache has written by then) takes its row; the shared
# write position ends past max_length below, so full-attention rows wrap their buffers too.
SHAPES = [(7, 12), (13, 3), (17, 6), (4, 14), (9, 12)]
MAX_LENGTH = 22


def text_requests(shapes=SHAPES, vocab: int = 256) -> list[Request]:
    generator = torch.Generator().manual_seed(1)
    return [
        Request(torch.randint(3, vocab, (1, length), generator=generator), max_new_tokens)
        for length, max_new_tokens in shapes
    ]


def generate_alone(model, request: Request, eos_token_id: int | None) -> torch.Tensor:
    inputs = {"input_ids": request.input_ids, **request.inputs}
    inputs.setdefault("attention_mask", torch.ones_like(request.input_ids))
    with torch.no_grad():
        out = model.generate(
            **inputs, max_new_tokens=request.max_new_tokens, do_sample=False, eos_token_id=eos_token_id
        )
    return out[0, request.input_ids.shape[1] :]


def check_serving_matches_generate(model, requests, max_length: int, **decoder_options) -> StaticDecoder:
    """Serve `requests` in 2 rows; the first request's fourth greedy token is made the end-of-sequence token,
    so it ends there (and anywhere else it comes up) as in generate()."""
    eos = int(generate_alone(model, requests[0], eos_token_id=None)[3])
    expected = [generate_alone(model, request, eos) for request in requests]
    decoder = StaticDecoder(model, StaticHybridCache.for_model(model, 2, max_length), **decoder_options)
    served = dict(serve(decoder, requests, eos_token_id=eos))
    assert sorted(served) == list(range(len(requests)))
    for index, tokens in served.items():
        assert torch.equal(tokens, expected[index].cpu()), index
    assert len(expected[0]) == 4 and any(
        len(t) == r.max_new_tokens for t, r in zip(expected, requests, strict=True)
    )
    assert decoder.cache.free_rows == [0, 1]
    return decoder


@TEXT_PLANS
def test_admitted_rows_match_generate_alone(family, plan):
    model = text_hybrid(family, plan)
    cache = check_serving_matches_generate(model, text_requests(), MAX_LENGTH).cache
    assert cache.full_capacity in (None, MAX_LENGTH)  # full attention only in the last plan
    assert cache.full_capacity is None or cache.seen_tokens > MAX_LENGTH


def test_admitted_image_prompts_match_generate_alone(tiny_teacher, tiny_hybrid):
    """Qwen-VL M-RoPE positions (3, B, 1) per row, native window of 8, Gated DeltaNet: image and text prompts."""
    model, processor = fp64(tiny_hybrid), tiny_teacher[1]
    chats = [
        ("Describe this image, please.", [make_image(2)], 6),
        ("Hi", [], 2),
        ("What is in it?", [make_image(5)], 5),
    ]
    requests = []
    for prompt, images, new_tokens in chats:
        inputs = chat_inputs(processor, [prompt], [images])
        if images:
            inputs["pixel_values"] = inputs["pixel_values"].double()
        requests.append(Request(inputs.pop("input_ids"), new_tokens, inputs))
    check_serving_matches_generate(model, requests, 256)


def test_admit_and_release_check_their_row(tiny_hybrid):
    model = fp64(tiny_hybrid)
    decoder = StaticDecoder(model, StaticHybridCache.for_model(model, 2, 64))
    prompt = torch.randint(3, 100, (1, 5))
    decoder.admit(1, prompt)
    assert decoder.cache.free_rows == [0]
    with pytest.raises(ValueError, match=r"Row 1 is decoding .* release it first .* free rows \[0\]"):
        decoder.admit(1, prompt)
    with pytest.raises(ValueError, match=r"Row 2 is out of range .* batch_size=2; admit into one of"):
        decoder.admit(2, prompt)
    with pytest.raises(ValueError, match=r"one prompt shaped \(1, T\)"):
        decoder.admit(0, prompt.expand(2, -1))
    with pytest.raises(ValueError, match="Row -1 is out of range"):
        decoder.release(-1)
    decoder.release(1)
    assert decoder.cache.free_rows == [0, 1]


@needs_cuda("needs CUDA")
def test_admission_into_captured_graph_matches_eager(tiny_hybrid):
    """Requests admitted after the decode step was captured: the replayed graph gives the eager step's tokens
    (fp32 on the GPU, fla kernels where installed), and the graph is never captured again."""
    model = copy.deepcopy(tiny_hybrid).cuda().float()
    requests = [Request(r.input_ids.cuda(), r.max_new_tokens) for r in text_requests()]
    served, graphs_at_admission = {}, []
    for cuda_graph in (False, True):
        decoder = StaticDecoder(model, StaticHybridCache.for_model(model, 2, 64), cuda_graph=cuda_graph)
        admit = decoder.admit

        def recording_admit(*args, decoder=decoder, admit=admit, **kwargs):
            graphs_at_admission.append(decoder.graph)
            return admit(*args, **kwargs)

        decoder.admit = recording_admit
        served[cuda_graph] = dict(serve(decoder, requests))
    graphs = graphs_at_admission[len(requests) :]
    assert graphs[-1] is not None and decoder.graph is graphs[-1]  # admitted into the captured graph
    assert served[True].keys() == served[False].keys()
    for index, tokens in served[True].items():
        assert torch.equal(tokens, served[False][index]), index

"""The static cache and its decoder against generate() with the dynamic cache (fp64, so that rounding can never
flip a token: any difference is a bug), the CUDA-graph step against the eager one, and the input checks."""

from __future__ import annotations

import copy
import gc
import json
import weakref

import pytest
import torch
from transformers import AttentionInterface

from hybridize.compat import configured_attention
from hybridize.converters import convert, plan_layers
from hybridize.inference.decode import (
    DECODE_ATTENTION,
    StaticDecoder,
    generate_fast,
    grouped_decode_attention,
)
from hybridize.inference.static_cache import FULL, LINEAR, SLIDING, StaticHybridCache
from hybridize.presets import tiny_model, tiny_qwen2_5_vl
from tests.conftest import needs_cuda
from tests.inference.test_generation import left_padded_image_batch

pytestmark = pytest.mark.transformers_surface  # also run on the oldest supported transformers

NEW_TOKENS = 8


def fp64(model):
    return copy.deepcopy(model).double().eval()


def text_batch(vocab: int = 256, lengths: tuple[int, ...] = (21, 13), seed: int = 0) -> dict:
    """Random token ids, left-padded to the longest row."""
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    input_ids = torch.zeros(len(lengths), width, dtype=torch.long)
    attention_mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, length in enumerate(lengths):
        input_ids[row, width - length :] = torch.randint(3, vocab, (length,), generator=generator)
        attention_mask[row, width - length :] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def check_matches_generate(model, inputs: dict, **options) -> torch.Tensor:
    with torch.no_grad():
        torch.manual_seed(0)
        expected = model.generate(**inputs, max_new_tokens=NEW_TOKENS, **options)
        torch.manual_seed(0)
        fast = generate_fast(model, **inputs, max_new_tokens=NEW_TOKENS, **options)
    assert torch.equal(fast, expected)
    return fast


@pytest.fixture(scope="module")
def vl_hybrid(tiny_hybrid):
    return fp64(tiny_hybrid)


@pytest.fixture(scope="module")
def vl_inputs(tiny_teacher):
    inputs = left_padded_image_batch(tiny_teacher[1])
    inputs["pixel_values"] = inputs["pixel_values"].double()
    return inputs


def test_vl_hybrid_with_image_greedy_and_sampled(vl_hybrid, vl_inputs):
    """InfiniteVL layout (native SWA window 8, Gated DeltaNet), an image, a left-padded batch of 2: the prompt
    (109 tokens) wraps the ring buffer many times over."""
    cache = StaticHybridCache.for_model(vl_hybrid, 2, 200)
    assert [layout.kind for layout in cache.layouts] == [SLIDING, *[LINEAR] * 3] * 2
    assert vl_inputs["input_ids"].shape[1] > 8 * 10
    check_matches_generate(vl_hybrid, vl_inputs, do_sample=False)
    check_matches_generate(vl_hybrid, vl_inputs, do_sample=True, temperature=0.7, top_k=40, top_p=0.9)


def test_rows_finishing_early_end_like_generate(vl_hybrid, vl_inputs):
    """generate() pads rows that emitted an end-of-sequence token and stops once all have: with the
    second and fifth greedy tokens made end-of-sequence tokens, the output is cut at the same step."""
    with torch.no_grad():
        greedy = vl_hybrid.generate(**vl_inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    prompt = vl_inputs["input_ids"].shape[1]
    eos = [int(greedy[0, prompt + 1]), int(greedy[1, prompt + 4])]
    with torch.no_grad():
        expected = vl_hybrid.generate(
            **vl_inputs, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=eos
        )
        fast = generate_fast(
            vl_hybrid, **vl_inputs, max_new_tokens=NEW_TOKENS, eos_token_id=eos, sync_every=3
        )
    assert expected.shape[1] < prompt + NEW_TOKENS
    assert torch.equal(fast, expected)


TEXT_PLANS = pytest.mark.parametrize(
    ("family", "plan"),
    [
        ("llama", dict(ratio="1/2", window=5)),  # no native window: the sliding-window mixer
        ("qwen2", dict(ratio="1/2", window=5, mixer="mamba2,gla")),  # native window, other mixers
        ("qwen2", dict(ratio="0")),  # linear mixers only: no attention buffers at all
        (
            "llama",
            dict(layers="1:gated_deltanet,3:sliding_window", window=5),
        ),  # full attention kept: static KV
    ],
    ids=["llama-swa-mixer", "qwen2-mamba2-gla", "qwen2-all-linear", "llama-full-attention"],
)


def text_hybrid(family: str, plan: dict):
    """A 4-layer tiny model of `family` converted by `plan`, in fp64."""
    teacher = tiny_model(family, num_hidden_layers=4)
    torch.manual_seed(0)
    hybrid, _ = convert(teacher, plan_layers(4, **plan), progress=False)
    return fp64(hybrid)


@TEXT_PLANS
def test_text_families_match_generate(family, plan):
    """Prompts of 21 and 13 tokens (left padding); then with the shorter row's third greedy token made an
    end-of-sequence token, so that it finishes early and is padded while the other row goes on."""
    hybrid, inputs = text_hybrid(family, plan), text_batch()
    greedy = check_matches_generate(hybrid, inputs, do_sample=False)
    prompt = inputs["input_ids"].shape[1]
    eos = int(greedy[1, prompt + 2])
    early = check_matches_generate(hybrid, inputs, do_sample=False, eos_token_id=eos, pad_token_id=0)
    assert (early[1, prompt + 3 :] == 0).all() and early.shape[1] > prompt + 3


@pytest.fixture(scope="module")
def llama_hybrid():
    teacher = tiny_model("llama", num_hidden_layers=4)
    torch.manual_seed(0)
    hybrid, _ = convert(
        teacher, plan_layers(4, layers="1:gated_deltanet,3:sliding_window", window=5), progress=False
    )
    return fp64(hybrid)


def test_chunked_prefill_equals_one_forward(llama_hybrid):
    inputs = text_batch(lengths=(23, 17))
    logits = {}
    for chunk_size in (None, 4):
        cache = StaticHybridCache.for_model(llama_hybrid, 2, 64)
        decoder = StaticDecoder(llama_hybrid, cache)
        logits[chunk_size] = decoder.prefill(**inputs, chunk_size=chunk_size)
        logits[chunk_size] = torch.cat([logits[chunk_size], decoder.step(logits[chunk_size].argmax(-1))])
    torch.testing.assert_close(logits[4], logits[None], rtol=1e-10, atol=1e-10)


def test_copy_from_restores_a_branch(llama_hybrid, monkeypatch):
    """A stream state saved with clone() and copied back decodes exactly as before the branch (and the decode
    steps' attention is the grouped one, in the two full-attention layers and the sliding-window one)."""
    calls = []

    def counting(module, *args, **kwargs):
        calls.append(module)
        return grouped_decode_attention(module, *args, **kwargs)

    monkeypatch.setitem(AttentionInterface._global_mapping, DECODE_ATTENTION, counting)
    cache = StaticHybridCache.for_model(llama_hybrid, 2, 64)
    decoder = StaticDecoder(llama_hybrid, cache)
    first = decoder.prefill(**text_batch()).argmax(-1)
    saved = cache.clone()
    expected = [decoder.step(first).clone()]
    expected.append(decoder.step(expected[-1].argmax(-1)).clone())
    decoder.step(torch.zeros_like(first))  # wander off on the branch
    cache.copy_from(saved)
    assert cache.seen_tokens == saved.seen_tokens
    replayed = [decoder.step(first).clone()]
    replayed.append(decoder.step(replayed[-1].argmax(-1)).clone())
    for got, want in zip(replayed, expected, strict=True):
        assert torch.equal(got, want)
    assert len(calls) == 5 * 3 and configured_attention(llama_hybrid.config) == "sdpa"


def test_caches_are_freed_when_let_go_without_the_cycle_collector(llama_hybrid):
    """A cache, its clone and a decoder over it hold no reference cycle: their (GPU) buffers go as soon as the
    last user lets go, not whenever Python's cycle collector next runs (a layer once held its cache strongly)."""
    gc.collect()
    gc.disable()
    try:
        cache = StaticHybridCache.for_model(llama_hybrid, 2, 64)
        decoder = StaticDecoder(llama_hybrid, cache)
        decoder.step(decoder.prefill(**text_batch()).argmax(-1))
        saved = cache.clone()
        alive = [weakref.ref(thing) for thing in (cache, saved, decoder, saved.layers[0].keys)]
        del cache, saved, decoder
        assert [ref() for ref in alive] == [None] * len(alive)
    finally:
        gc.enable()


def test_bad_inputs_fail_before_any_work(llama_hybrid):
    inputs = text_batch()
    cache = StaticHybridCache.for_model(llama_hybrid, 2, 24)
    assert cache.full_capacity == 24 and [layout.kind for layout in cache.layouts] == [
        FULL,
        LINEAR,
        FULL,
        SLIDING,
    ]
    decoder = StaticDecoder(llama_hybrid, cache)
    with pytest.raises(ValueError, match="batch_size=2"):
        decoder.prefill(**text_batch(lengths=(5,)))
    with pytest.raises(ValueError, match="full-attention layers keep 24"):
        generate_fast(llama_hybrid, **inputs, max_new_tokens=8, decoder=decoder)
    assert cache.seen_tokens == 0 and not cache.length
    with pytest.raises(RuntimeError, match="prefill"):
        decoder.step(torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="num_beams=1"):
        generate_fast(llama_hybrid, **inputs, max_new_tokens=2, num_beams=2)
    with pytest.raises(ValueError, match="cuda_graph=True"):
        StaticDecoder(llama_hybrid, cache, cuda_graph=True)


def test_compile_modes_reach_torch_compile_and_graph_capturing_ones_are_refused(llama_hybrid, monkeypatch):
    """compile=True is torch.compile's default mode; "max-autotune-no-cudagraphs" passes through; modes that
    capture CUDA graphs of their own (inside ours they cannot) and unknown ones are refused."""
    calls = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: calls.append(kwargs) or fn)
    cache = StaticHybridCache.for_model(llama_hybrid, 1, 24)
    for compile in (True, "max-autotune-no-cudagraphs", False):
        StaticDecoder(llama_hybrid, cache, compile=compile)
    assert calls == [
        {"dynamic": False, "mode": "default"},
        {"dynamic": False, "mode": "max-autotune-no-cudagraphs"},
    ]
    for bad in ("reduce-overhead", "max-autotune", "fast"):
        with pytest.raises(ValueError, match="leaves CUDA graphs to hybridize"):
            StaticDecoder(llama_hybrid, cache, compile=bad)


@pytest.mark.slow
@pytest.mark.parametrize("compile", [True, "max-autotune-no-cudagraphs"])
def test_compiled_decode_step_matches_generate(tiny_hybrid, vl_inputs, compile):
    """The decode step through torch.compile (what `generate_fast(..., compile=True)` runs: the short convolutions
    as fused multiply-adds on their (B, D, kernel) states, the rest of the step fused around them) gives generate()'s
    tokens, with an image and left padding (fp32 on CPU; ~20 s of compilation on 2 cores per mode)."""
    model = copy.deepcopy(tiny_hybrid).float()
    inputs = {**vl_inputs, "pixel_values": vl_inputs["pixel_values"].float()}
    decoder = StaticDecoder(model, StaticHybridCache.for_model(model, 2, 200), compile=compile)
    with torch.no_grad():
        fast = generate_fast(model, **inputs, max_new_tokens=12, decoder=decoder, do_sample=False)
        expected = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    assert decoder.eager_steps == 11 and torch.equal(fast, expected)


@needs_cuda("needs CUDA")
def test_cuda_graph_decode_matches_eager(tiny_hybrid, vl_inputs):
    """The captured step replays to the eager step's tokens (fp32 on the GPU, fla kernels where installed)."""
    model = copy.deepcopy(tiny_hybrid).cuda().float()
    inputs = {key: value.cuda() for key, value in vl_inputs.items()}
    inputs["pixel_values"] = inputs["pixel_values"].float()
    outputs = {}
    for cuda_graph in (False, True):
        decoder = StaticDecoder(model, StaticHybridCache.for_model(model, 2, 200), cuda_graph=cuda_graph)
        outputs[cuda_graph] = generate_fast(
            model, **inputs, max_new_tokens=16, decoder=decoder, do_sample=False
        )
        assert (decoder.graph is not None) == cuda_graph
    assert torch.equal(outputs[True], outputs[False])
    with torch.no_grad():
        assert torch.equal(outputs[True], model.generate(**inputs, max_new_tokens=16, do_sample=False))


def test_decode_latency_benchmark_smoke(tmp_path, monkeypatch):
    """benchmarks/decode_latency.py end to end on CPU with the tiny model (its GPU results are committed)."""
    from tests.test_benchmark_scripts import benchmark_script

    out = tmp_path / "decode_latency.json"
    variants = ["stock_eager", "stock_static_graph", "hybrid_eager", "hybrid_static_graph"]
    argv = ["--config", "tiny", "--device", "cpu", "--contexts", "24", "--prefill-contexts", "20"]
    argv += ["--steps", "2", "--repeats", "1", "--warmup", "1", "--eager-steps", "1", "--eager-repeats", "1"]
    argv += ["--profile", "2"]
    script = benchmark_script("decode_latency", monkeypatch)
    script.main([*argv, "--variants", *variants, "--out", str(out)])
    report = json.loads(out.read_text())
    assert list(report["decode"]) == variants
    assert all(report["decode"][variant]["24"]["ms_per_token"] > 0 for variant in variants)
    # On CPU no device kernels run: the profile then ranks operators by CPU time.
    profile = report["decode"]["hybrid_static_graph"]["24"]["profile"]
    assert profile["steps"] == 2 and profile["kernels_per_step"] == 0 and profile["top"][0]["self_ms"] > 0
    assert "| hybrid_static_graph 24 | 0 |" in out.with_suffix(".md").read_text()
    kinds = {  # kernel names from H100 profiles of the decode step
        "void gemv2T_kernel_val<int, int, __nv_bfloat16, __nv_bfloat16, float, 128, 16, 4, 4>": "matmul",
        "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize64x64x64_warpgroupsize1x1x1": "matmul",
        "nvjet_sm90_tst_256x8_64x6_4x1_v_bz_TNT": "matmul",  # cuBLASLt on Hopper (2026-12-07)
        "void cublasLt::splitKreduce_kernel<32, 16, int, float, __nv_bfloat16, float, __nv_bfloat16>": "matmul",
        "fused_recurrent_gated_delta_rule_fwd_kernel": "linear_attention",
        "triton_per_fused__to_copy_add_mean_mul_pow_rsqrt_0": "fused_pointwise",
        "void at::native::elementwise_kernel<128, 2, ...>": "eager_pointwise",
        "Memcpy DtoD (Device -> Device)": "copy",
    }
    kernel_kind = benchmark_script("common", monkeypatch).kernel_kind
    assert {name: kernel_kind(name) for name in kinds} == kinds
    assert set(report["prefill"]) == {"stock/20", "hybrid/20"}
    assert report["command"].startswith("python benchmarks/decode_latency.py --config tiny")
    assert "| 24 |" in out.with_suffix(".md").read_text()


@needs_cuda("needs CUDA")
def test_bf16_grouped_attention_on_cuda_matches_fp32():
    """On CUDA, bf16 decode attention takes bf16 products with fp32 scores; against fp32 SDPA it is within the
    kernels' bf16 tolerance (DESIGN.md: ~1e-2 end to end), with 8 query heads per key/value head and a mask."""
    generator = torch.Generator("cuda").manual_seed(0)
    query = torch.randn(2, 16, 1, 128, device="cuda", generator=generator)
    key, value = (torch.randn(2, 2, 4096, 128, device="cuda", generator=generator) for _ in range(2))
    mask = torch.rand(2, 1, 1, 4096, device="cuda", generator=generator) > 0.3
    reference = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, enable_gqa=True
    ).transpose(1, 2)
    module = torch.nn.Module()
    got, _ = grouped_decode_attention(module, *(x.bfloat16() for x in (query, key, value)), mask)
    assert got.dtype == torch.bfloat16
    error = (got.float() - reference).pow(2).mean().sqrt() / reference.pow(2).mean().sqrt()
    assert error < 1e-2


def test_prefill_attends_through_the_flash_window_implementation(monkeypatch):
    """Static prefill runs its softmax layers through `mixers.flash_window` (the flash kernel on CUDA, its SDPA
    reference here) with the kept keys oldest first and the 2-D padding mask: chunked, left-padded, window 8 of 20
    tokens, the logits of the dense-mask path exactly."""
    import hybridize.mixers.flash_window as flash_window

    calls = []
    reference = flash_window._masked_reference
    monkeypatch.setattr(
        flash_window, "_masked_reference", lambda *args: calls.append(args[0].shape) or reference(*args)
    )
    teacher, _ = tiny_qwen2_5_vl(seed=0)
    hybrid, _ = convert(teacher, plan_layers(8, "1/4", window=8), progress=False)
    ids = torch.randint(3, 200, (2, 20), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    logits = {}
    for flash in (True, False):
        decoder = StaticDecoder(hybrid, StaticHybridCache.for_model(hybrid, 2, 64))
        assert decoder._flash_prefill
        decoder._flash_prefill = flash
        with torch.no_grad():
            logits[flash] = decoder.prefill(ids, mask, chunk_size=8)
    assert len(calls) == 2 * 3  # two sliding-window layers, three chunks
    torch.testing.assert_close(logits[True], logits[False], rtol=1e-6, atol=1e-6)

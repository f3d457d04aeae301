"""The GLA mixer: sizes, config checks, init policies, gradients, cache state and padding."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import DynamicCache, LlamaConfig
from transformers.models.llama.modeling_llama import LlamaAttention

import hybridize.mixers.gla  # noqa: F401  (registers "gla")
from hybridize.mixers import AttentionSpec, MixerCacheLayer, build_mixer, mixer_config
from hybridize.mixers.gla import GLAConfig
from hybridize.presets import QWEN2_5_VL_3B_ATTENTION
from tests.conftest import relative_rms

pytestmark = pytest.mark.transformers_surface  # also run on the oldest supported transformers

TINY = AttentionSpec(hidden_size=32, num_heads=4, num_kv_heads=2, head_dim=8, qkv_bias=True)


def tiny_mixer(**options) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_mixer("gla", {"backend": "torch", **options}, TINY, layer_idx=1)


def tiny_teacher() -> LlamaAttention:
    """A Llama attention with TINY's sizes: 4 query heads sharing 2 key/value heads of 8."""
    torch.manual_seed(1)
    config = LlamaConfig(
        hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8, attention_bias=True
    )
    return LlamaAttention(config, layer_idx=0)


def test_defaults_derived_from_qwen25_vl_3b():
    config = mixer_config("gla", None, QWEN2_5_VL_3B_ATTENTION)
    assert (config.num_heads, config.head_k_dim, config.head_v_dim) == (16, 128, 128)
    assert (config.init, config.norm_eps, config.use_short_conv) == ("attention_transfer", 1e-6, False)
    mixer = build_mixer("gla", None, QWEN2_5_VL_3B_ATTENTION, layer_idx=1)
    for name in ("q_proj", "k_proj", "v_proj", "g_proj", "o_proj"):
        assert getattr(mixer, name).weight.shape == (2048, 2048), name
    assert mixer.gk_proj[0].weight.shape == (16, 2048) and mixer.gk_proj[1].weight.shape == (2048, 16)
    assert mixer.g_norm_swish_gate.weight.shape == (128,) and not hasattr(mixer, "q_conv1d")


@pytest.mark.parametrize(
    "options, message",
    [
        ({"heads": 4}, "options are"),
        ({"init": "random"}, "init='random'"),
        ({"backend": "triton"}, "backend='triton'"),
        ({"head_k_dim": -8, "init": "mimic"}, "head_k_dim=-8"),
        ({"gate_low_rank_dim": 0}, "gate_low_rank_dim=0"),
        ({"gate_logit_normalizer": 0}, "gate_logit_normalizer=0"),
        ({"num_heads": 2}, "num_heads == 4"),  # attention_transfer (the default) needs the teacher's sizes
        ({"head_k_dim": 16}, "head_k_dim == 8"),
        ({"head_v_dim": 16}, "head_v_dim == 8"),
    ],
)
def test_bad_options_are_rejected(options, message):
    with pytest.raises(ValueError, match=message):
        mixer_config("gla", options, TINY)


def test_mimic_accepts_any_sizes_and_attention_transfer_checks_them_again():
    mixer = tiny_mixer(init="mimic", num_heads=2, head_k_dim=16, head_v_dim=4)
    mixer.initialize_from_teacher(None, "mimic")
    with pytest.raises(ValueError, match="num_heads"):
        mixer.initialize_from_teacher(tiny_teacher(), "attention_transfer")


def test_config_round_trips_through_dict():
    config = mixer_config("gla", {"use_short_conv": True, "head_v_dim": 8}, TINY)
    assert GLAConfig(**config.to_dict()) == config


@pytest.mark.parametrize("normalizer", [16.0, 4.0])
def test_initial_gate_is_a_uniform_slow_decay(monkeypatch, normalizer):
    """The decay the mixer hands its kernel: logsigmoid(~0) / gate_logit_normalizer = -log(2) / normalizer per
    step, for every token and key dimension."""
    import hybridize.mixers.gla as module

    seen, kernel = {}, module.gla

    def recording_kernel(q, k, v, gk, **kwargs):
        seen["gk"] = gk
        return kernel(q, k, v, gk, **kwargs)

    monkeypatch.setattr(module, "gla", recording_kernel)
    tiny_mixer(gate_logit_normalizer=normalizer)(torch.randn(3, 5, 32))
    gk = seen["gk"]  # (B, T, H, K)
    torch.testing.assert_close(
        gk, torch.full_like(gk, -math.log(2) / normalizer), rtol=0, atol=2e-3 * 16 / normalizer
    )


@pytest.mark.parametrize("use_short_conv", [False, True])
def test_gradients_reach_every_parameter(use_short_conv):
    mixer = tiny_mixer(use_short_conv=use_short_conv)
    out, none = mixer(torch.randn(2, 13, 32))
    assert none is None and out.shape == (2, 13, 32)
    out.pow(2).mean().backward()
    for name, parameter in mixer.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_bf16_mixer_matches_fp32():
    mixer = tiny_mixer(use_short_conv=True).eval()
    x = torch.randn(2, 21, 32)
    with torch.no_grad():
        expected, _ = mixer(x)
        out, _ = mixer.bfloat16()(x.bfloat16())
    assert out.dtype == torch.bfloat16 and relative_rms(expected, out) < 2e-2


@pytest.mark.parametrize("use_short_conv", [False, True])
def test_prefill_in_pieces_with_cache_equals_one_pass(use_short_conv):
    mixer = tiny_mixer(use_short_conv=use_short_conv).eval()
    x = torch.randn(2, 23, 32)
    with torch.no_grad():
        whole, _ = mixer(x)
        cache = DynamicCache()
        pieces = [mixer(x[:, :5], cache=cache)[0], mixer(x[:, 5:12], cache=cache)[0]]
        pieces += [mixer(x[:, t : t + 1], cache=cache)[0] for t in range(12, 23)]
    slot = cache.layers[1]
    assert isinstance(slot, MixerCacheLayer) and slot.get_seq_length() == 23
    assert slot.states["recurrent"].shape == (2, 4, 8, 8) and slot.states["recurrent"].dtype == torch.float32
    assert ("conv_q" in slot.states) == use_short_conv
    assert relative_rms(whole, torch.cat(pieces, dim=1)) < 1e-5


@pytest.mark.parametrize("use_short_conv", [False, True])
def test_left_padding_gives_the_unpadded_result(use_short_conv):
    mixer = tiny_mixer(use_short_conv=use_short_conv).eval()
    x = torch.randn(1, 10, 32)
    padded = torch.cat([torch.randn(1, 4, 32) * 100, x], dim=1)
    valid = torch.tensor([[False] * 4 + [True] * 10])
    causal = torch.ones(14, 14, dtype=torch.bool).tril()
    sdpa_mask = (causal & valid[:, None, :])[:, None]  # (B, 1, q, k) True = attend
    with torch.no_grad():
        expected, _ = mixer(x, cache=(expected_cache := DynamicCache()))
        for mask in (valid.long(), sdpa_mask):
            cache = DynamicCache()
            out, _ = mixer(padded, attention_mask=mask, cache=cache)
            assert relative_rms(expected, out[:, 4:]) < 1e-5
            for name, state in expected_cache.layers[1].states.items():
                assert relative_rms(state, cache.layers[1].states[name]) < 1e-5, name


@pytest.mark.parametrize("use_short_conv", [False, True])
def test_attention_transfer_copies_teacher_projections(use_short_conv):
    teacher = tiny_teacher()
    mixer = tiny_mixer(use_short_conv=use_short_conv)
    mixer.initialize_from_teacher(teacher, "attention_transfer")
    assert torch.equal(mixer.q_proj.weight, teacher.q_proj.weight)
    assert torch.equal(mixer.o_proj.weight, teacher.o_proj.weight)
    # GQA: query heads 0, 1 read key/value head 0; heads 2, 3 read head 1
    for name in ("k_proj", "v_proj"):
        ours, theirs = (
            getattr(mixer, name).weight.view(4, 8, 32),
            getattr(teacher, name).weight.view(2, 8, 32),
        )
        for head in range(4):
            assert torch.equal(ours[head], theirs[head // 2]), (name, head)
    if use_short_conv:  # identity taps: the conv passes the copied projections through (then SiLU)
        x = torch.randn(1, 6, 32)
        q, _ = mixer.q_conv1d(mixer.q_proj(x))
        torch.testing.assert_close(q, torch.nn.functional.silu(teacher.q_proj(x) - teacher.q_proj.bias))


def test_build_mixer_applies_the_configured_policy():
    teacher = tiny_teacher()
    transferred = build_mixer("gla", None, TINY, layer_idx=0, teacher_attention=teacher)
    assert torch.equal(transferred.q_proj.weight, teacher.q_proj.weight)
    mimic = build_mixer("gla", {"init": "mimic"}, TINY, layer_idx=0, teacher_attention=teacher)
    assert not torch.equal(mimic.q_proj.weight, teacher.q_proj.weight)

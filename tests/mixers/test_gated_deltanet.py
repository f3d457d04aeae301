"""The Gated DeltaNet mixer: sizes, init policies, gradients, cache state and padding."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from hybridize.mixers import AttentionSpec, GatedDeltaNetConfig, MixerCacheLayer, build_mixer, mixer_config
from hybridize.presets import QWEN2_5_VL_3B_ATTENTION
from tests.conftest import relative_rms

pytestmark = pytest.mark.transformers_surface  # also run on the oldest supported transformers

TINY = AttentionSpec(hidden_size=32, num_heads=4, num_kv_heads=2, head_dim=8, qkv_bias=True)


def tiny_mixer(**options) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_mixer("gated_deltanet", {"backend": "torch", **options}, TINY, layer_idx=1)


def test_defaults_derived_from_qwen25_vl_3b_are_infinitevl_layer():
    config = mixer_config("gated_deltanet", None, QWEN2_5_VL_3B_ATTENTION)
    assert (config.num_heads, config.head_k_dim, config.head_v_dim, config.conv_size) == (16, 128, 256, 4)
    mixer = build_mixer("gated_deltanet", None, QWEN2_5_VL_3B_ATTENTION, layer_idx=1)
    assert mixer.q_proj.weight.shape == (2048, 2048) and mixer.v_proj.weight.shape == (4096, 2048)
    assert mixer.o_norm.weight.shape == (256,) and mixer.q_conv1d.weight.shape == (2048, 1, 4)


def test_bad_options_are_rejected():
    with pytest.raises(ValueError, match="options are"):
        mixer_config("gated_deltanet", {"heads": 4}, TINY)
    with pytest.raises(ValueError, match="init"):
        mixer_config("gated_deltanet", {"init": "random"}, TINY)
    with pytest.raises(ValueError, match="expand_v"):
        mixer_config("gated_deltanet", {"expand_v": 0.3}, TINY)


def test_gradients_reach_every_parameter():
    mixer = tiny_mixer()
    out, none = mixer(torch.randn(2, 13, 32))
    assert none is None and out.shape == (2, 13, 32)
    out.pow(2).mean().backward()
    for name, parameter in mixer.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_prefill_in_pieces_with_cache_equals_one_pass():
    mixer = tiny_mixer().eval()
    x = torch.randn(2, 23, 32)
    with torch.no_grad():
        whole, _ = mixer(x)
        cache = DynamicCache()
        pieces = [mixer(x[:, :9], cache=cache)[0]]
        pieces += [mixer(x[:, t : t + 1], cache=cache)[0] for t in range(9, 23)]
    slot = cache.layers[1]
    assert isinstance(slot, MixerCacheLayer) and slot.get_seq_length() == 23
    assert slot.states["recurrent"].dtype == torch.float32
    assert relative_rms(whole, torch.cat(pieces, dim=1)) < 1e-5


def test_left_padding_gives_the_unpadded_result():
    mixer = tiny_mixer().eval()
    x = torch.randn(1, 10, 32)
    padded = torch.cat([torch.randn(1, 4, 32) * 100, x], dim=1)
    valid = torch.tensor([[False] * 4 + [True] * 10])
    causal = torch.ones(14, 14, dtype=torch.bool).tril()
    sdpa_mask = (causal & valid[:, None, :])[:, None]  # (B, 1, q, k) True = attend
    eager_mask = torch.zeros(sdpa_mask.shape).masked_fill(~sdpa_mask, torch.finfo(torch.float32).min)
    with torch.no_grad():
        expected, _ = mixer(x)
        for mask in (sdpa_mask, eager_mask, valid.long()):
            out, _ = mixer(padded, attention_mask=mask)
            assert relative_rms(expected, out[:, 4:]) < 1e-5


def test_mimic_init_is_infinitevl_init():
    mixer = tiny_mixer(init="mimic")
    mixer.initialize_from_teacher(None, "mimic")
    assert (
        torch.all(mixer.A_log == 0)
        and torch.all(mixer.a_proj.weight == 0)
        and torch.all(mixer.b_proj.weight == 0)
    )
    dt = torch.nn.functional.softplus(mixer.dt_bias)
    torch.testing.assert_close(dt, torch.full_like(dt, 1e-3))
    expected_taps = torch.zeros(4)
    expected_taps[-1] = 1
    for conv in (mixer.q_conv1d, mixer.k_conv1d, mixer.v_conv1d):
        assert torch.equal(conv.weight[:, 0], expected_taps.expand_as(conv.weight[:, 0]))


def test_attention_transfer_copies_teacher_projections():
    teacher = torch.nn.Module()
    teacher.q_proj, teacher.k_proj = torch.nn.Linear(32, 32), torch.nn.Linear(32, 16)
    teacher.v_proj, teacher.o_proj = torch.nn.Linear(32, 16), torch.nn.Linear(32, 32, bias=False)
    mixer = tiny_mixer(init="attention_transfer")
    mixer.initialize_from_teacher(teacher, "attention_transfer")
    assert torch.equal(mixer.q_proj.weight, teacher.q_proj.weight)
    # GQA: query heads 0, 1 share key head 0; heads 2, 3 share key head 1
    k = mixer.k_proj.weight.view(4, 8, 32)
    assert torch.equal(k[1], teacher.k_proj.weight[:8]) and torch.equal(k[2], teacher.k_proj.weight[8:])
    # The value path o_proj(v_proj(x)) equals the teacher's (GQA-repeated) o_proj(v_proj(x)) without bias.
    x = torch.randn(5, 32)
    teacher_v = (x @ teacher.v_proj.weight.T).view(5, 2, 8).repeat_interleave(2, dim=1).reshape(5, 32)
    torch.testing.assert_close(mixer.o_proj(mixer.v_proj(x)), teacher.o_proj(teacher_v))


def test_attention_transfer_needs_matching_heads():
    with pytest.raises(ValueError, match="num_heads"):  # at config time, before any model is loaded
        mixer_config("gated_deltanet", {"num_heads": 2, "init": "attention_transfer"}, TINY)
    mixer = build_mixer("gated_deltanet", {"num_heads": 2}, TINY, layer_idx=0)
    with pytest.raises(ValueError, match="num_heads"):
        mixer.initialize_from_teacher(torch.nn.Module(), "attention_transfer")


def test_config_round_trips_through_dict():
    config = mixer_config("gated_deltanet", {"expand_v": 1.5}, TINY)
    assert GatedDeltaNetConfig(**config.to_dict()) == config

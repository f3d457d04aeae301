"""The Mamba-2 mixer: sizes, config checks, init policies, gradients, cache state, padding, and transformers'
Mamba2Mixer as an independent implementation of the whole layer."""

from __future__ import annotations

import importlib.util
import inspect
import json
import math

import pytest
import torch
from transformers import DynamicCache
from transformers import Mamba2Config as HFMamba2Config
from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer as HFMamba2Mixer

import hybridize.mixers.mamba2  # noqa: F401  (registers "mamba2")
from hybridize.mixers import AttentionSpec, MixerCacheLayer, build_mixer, mixer_config
from hybridize.mixers.mamba2 import Mamba2Config
from hybridize.presets import QWEN2_5_VL_3B_ATTENTION
from tests.conftest import relative_rms

pytestmark = pytest.mark.transformers_surface  # also run on the oldest supported transformers

TINY = AttentionSpec(hidden_size=32, num_heads=4, num_kv_heads=2, head_dim=8, qkv_bias=True)
# Sizes that differ from the teacher's (so init="mimic"): P = 16, N = 8, two heads per group.
UNTIED = {"head_dim": 16, "state_size": 8, "num_groups": 2, "init": "mimic"}


def tiny_mixer(**options) -> torch.nn.Module:
    torch.manual_seed(0)
    mixer = build_mixer("mamba2", {"backend": "torch", **options}, TINY, layer_idx=1)
    with torch.no_grad():  # move the parameters that initialise to constants, so every path is exercised
        mixer.norm.weight.uniform_(0.5, 1.5)
        mixer.D.uniform_(-1, 1)
        mixer.conv1d.bias.uniform_(-0.5, 0.5)
    return mixer


def test_defaults_derived_from_qwen25_vl_3b():
    config = mixer_config("mamba2", None, QWEN2_5_VL_3B_ATTENTION)
    assert (config.num_heads, config.head_dim, config.state_size, config.num_groups) == (16, 128, 128, 16)
    assert config.init == "attention_transfer" and config.norm_eps == 1e-6
    mixer = build_mixer("mamba2", None, QWEN2_5_VL_3B_ATTENTION, layer_idx=1)
    # in_proj rows: z 2048 | x 2048 | B 16*128 | C 16*128 | dt 16
    assert mixer.in_proj.weight.shape == (4 * 2048 + 16, 2048)
    assert mixer.conv1d.weight.shape == (3 * 2048, 1, 4) and mixer.conv1d.bias.shape == (3 * 2048,)
    assert mixer.A_log.shape == mixer.dt_bias.shape == mixer.D.shape == (16,)
    assert mixer.norm.weight.shape == (2048,) and mixer.out_proj.weight.shape == (2048, 2048)


def test_bad_options_are_rejected():
    with pytest.raises(ValueError, match="options are"):
        mixer_config("mamba2", {"heads": 4}, TINY)
    with pytest.raises(ValueError, match="init"):
        mixer_config("mamba2", {"init": "random"}, TINY)
    with pytest.raises(ValueError, match="backend"):
        mixer_config("mamba2", {"backend": "cuda"}, TINY)
    with pytest.raises(ValueError, match="num_groups=3 must divide num_heads=4"):
        mixer_config("mamba2", {"num_groups": 3, "init": "mimic"}, TINY)
    with pytest.raises(ValueError, match="state_size=-1"):
        mixer_config("mamba2", {"state_size": -1, "init": "mimic"}, TINY)
    with pytest.raises(ValueError, match="dt_min"):
        mixer_config("mamba2", {"dt_min": 0.5, "dt_max": 0.1}, TINY)
    with pytest.raises(ValueError, match="A_init_min"):
        mixer_config("mamba2", {"A_init_min": 0.0}, TINY)


def test_attention_transfer_needs_teacher_sizes():
    # at config time, before any model is loaded; each error names the fix
    with pytest.raises(ValueError, match="num_heads == 4 and head_dim == 8.*init='mimic'"):
        mixer_config("mamba2", {"head_dim": 16}, TINY)
    with pytest.raises(ValueError, match="state_size == 8.*num_groups == num_heads.*init='mimic'"):
        mixer_config("mamba2", {"num_groups": 1}, TINY)
    with pytest.raises(ValueError, match="state_size == 8"):
        mixer_config("mamba2", {"state_size": 16}, TINY)
    mixer = build_mixer("mamba2", UNTIED, TINY, layer_idx=0)
    with pytest.raises(ValueError, match="head_dim"):
        mixer.initialize_from_teacher(torch.nn.Module(), "attention_transfer")


def test_config_round_trips_through_json():
    config = mixer_config("mamba2", {**UNTIED, "A_init_max": 8.0}, TINY)
    assert Mamba2Config(**json.loads(json.dumps(config.to_dict()))) == config


def test_mimic_init_is_mamba2_init():
    mixer = build_mixer("mamba2", {"init": "mimic", "dt_min": 0.01, "dt_max": 0.05}, TINY, layer_idx=0)
    mixer.initialize_from_teacher(None, "mimic")
    dt = torch.nn.functional.softplus(mixer.dt_bias)
    assert torch.all((dt > 0.01 - 1e-6) & (dt < 0.05 + 1e-6))
    A = mixer.A_log.exp()
    assert torch.all((A >= 1 - 1e-6) & (A <= 16 + 1e-6))
    assert torch.all(mixer.D == 1) and torch.all(mixer.norm.weight == 1)
    assert all(p._no_weight_decay for p in (mixer.A_log, mixer.dt_bias, mixer.D))


def test_attention_transfer_copies_teacher_projections():
    teacher = torch.nn.Module()
    teacher.q_proj, teacher.k_proj = torch.nn.Linear(32, 32), torch.nn.Linear(32, 16)
    teacher.v_proj, teacher.o_proj = torch.nn.Linear(32, 16), torch.nn.Linear(32, 32, bias=False)
    mixer = tiny_mixer()
    mixer.initialize_from_teacher(teacher, "attention_transfer")
    z, x, B, C, dt = mixer.in_proj.weight.split([32, 32, 32, 32, 4])
    # GQA: query heads 0, 1 read key/value head 0; heads 2, 3 read head 1
    for head in range(4):
        kv_rows = teacher.k_proj.weight[8 * (head // 2) : 8 * (head // 2 + 1)]
        assert torch.equal(B[8 * head : 8 * (head + 1)], kv_rows)
        v_rows = teacher.v_proj.weight[8 * (head // 2) : 8 * (head // 2 + 1)]
        assert torch.equal(x[8 * head : 8 * (head + 1)], v_rows)
    assert torch.equal(C, teacher.q_proj.weight) and torch.equal(mixer.out_proj.weight, teacher.o_proj.weight)
    # z and dt rows keep the standard initialisation
    assert z.abs().sum() > 0 and dt.abs().sum() > 0


@pytest.mark.parametrize("options", [{}, UNTIED])
def test_gradients_reach_every_parameter(options):
    mixer = tiny_mixer(**options)
    out, none = mixer(torch.randn(2, 13, 32))
    assert none is None and out.shape == (2, 13, 32)
    out.pow(2).mean().backward()
    for name, parameter in mixer.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_prefill_in_pieces_with_cache_equals_one_pass():
    mixer = tiny_mixer(**UNTIED).eval()
    x = torch.randn(2, 23, 32)
    with torch.no_grad():
        whole, _ = mixer(x)
        cache = DynamicCache()
        pieces = [mixer(x[:, :9], cache=cache)[0]]
        pieces += [mixer(x[:, t : t + 1], cache=cache)[0] for t in range(9, 23)]
    slot = cache.layers[1]
    assert isinstance(slot, MixerCacheLayer) and slot.get_seq_length() == 23
    assert slot.states["ssm"].shape == (2, 4, 8, 16) and slot.states["ssm"].dtype == torch.float32
    assert slot.states["conv"].shape == (2, 64 + 2 * 2 * 8, 4)  # the last conv_size inputs
    assert relative_rms(whole, torch.cat(pieces, dim=1)) < 1e-5


def test_left_padding_gives_the_unpadded_result():
    mixer = tiny_mixer(**UNTIED).eval()
    x = torch.randn(1, 10, 32)
    padded = torch.cat([torch.randn(1, 4, 32) * 100, x], dim=1)
    valid = torch.tensor([[False] * 4 + [True] * 10])
    causal = torch.ones(14, 14, dtype=torch.bool).tril()
    sdpa_mask = (causal & valid[:, None, :])[:, None]  # (B, 1, q, k) True = attend
    with torch.no_grad():
        expected, _ = mixer(x)
        expected_cache, cache = DynamicCache(), DynamicCache()
        mixer(x, cache=expected_cache)
        for mask in (valid.long(), sdpa_mask):
            out, _ = mixer(padded, attention_mask=mask)
            assert relative_rms(expected, out[:, 4:]) < 1e-5
        mixer(padded, attention_mask=sdpa_mask, cache=cache)
    for name in ("conv", "ssm"):  # the states after the padded prompt are those of the unpadded one
        torch.testing.assert_close(cache.layers[1].states[name], expected_cache.layers[1].states[name])


@pytest.mark.skipif(
    importlib.util.find_spec("mamba_ssm") is not None,
    reason="with mamba_ssm installed transformers routes its torch reference through mamba-ssm's kernels",
)
def test_matches_transformers_mamba2_mixer():
    """Our state_dict loads into transformers' Mamba2Mixer as is, and both give the same prefill and decode.

    Its torch path (segment-sum SSD, the gated RMS norm per group of intermediate/n_groups channels, conv and
    SSM states in its own cache) shares no code with ours. Up to transformers 5.22 its gated norm spanned all
    channels whatever n_groups (mamba-ssm normalises per group, as we do): there the two agree at one group only.
    """
    norm_class = type(
        HFMamba2Mixer(HFMamba2Config(hidden_size=8, num_heads=2, head_dim=8, n_groups=1), 0).norm
    )
    groups = UNTIED["num_groups"] if "group_size" in inspect.signature(norm_class).parameters else 1
    mixer = tiny_mixer(**{**UNTIED, "num_groups": groups}).eval()
    hf_config = HFMamba2Config(
        hidden_size=32,
        num_heads=4,
        head_dim=16,
        expand=2,  # intermediate_size = expand * hidden = num_heads * head_dim = 64
        state_size=8,
        n_groups=groups,
        conv_kernel=4,
        use_conv_bias=True,
        use_bias=False,
        layer_norm_epsilon=TINY.rms_norm_eps,
        chunk_size=16,
        num_hidden_layers=1,
        vocab_size=8,
    )
    reference = HFMamba2Mixer(hf_config, layer_idx=0).eval()
    reference.load_state_dict(mixer.state_dict(), strict=True)
    x = torch.randn(2, 37, 32)
    with torch.no_grad():
        ours, _ = mixer(x)
        assert relative_rms(reference(x), ours) < 1e-5
        # transformers' own mixer names its cache `cache_params` up to 5.23 and `cache` from 5.24
        keyword = "cache" if "cache" in inspect.signature(reference.forward).parameters else "cache_params"
        hf_cache = {keyword: DynamicCache(config=hf_config)}
        steps = [reference(x[:, :30], **hf_cache)]
        steps += [reference(x[:, t : t + 1], **hf_cache) for t in range(30, 37)]
    assert relative_rms(torch.cat(steps, dim=1), ours) < 1e-5


def test_norm_is_per_group():
    """With two groups, scaling one group's input leaves the other group's output unchanged (mamba-ssm's
    RMSNormGated(group_size=H*P/G)); a norm over all channels would rescale both."""
    norm = tiny_mixer(**UNTIED).norm
    y, z = torch.randn(3, 64), torch.randn(3, 64)
    scaled = torch.cat([y[:, :32] * 10, y[:, 32:]], dim=-1)
    with torch.no_grad():
        torch.testing.assert_close(norm(scaled, z)[:, 32:], norm(y, z)[:, 32:])
        silu_gated = y * torch.nn.functional.silu(z)
        rms = silu_gated[:, :32].pow(2).mean(-1, keepdim=True).add(norm.eps).sqrt()
        torch.testing.assert_close(norm(y, z)[:, :32], norm.weight[:32] * silu_gated[:, :32] / rms)
    assert math.isclose(norm.eps, TINY.rms_norm_eps)

"""Every tested family converts with every mixer, generates with its cache, and round-trips through save/load."""

from __future__ import annotations

import functools

import pytest
import torch

import hybridize
from hybridize.converters import TESTED_MODEL_TYPES, convert, plan_layers, save_hybrid
from hybridize.converters.checkpoint import base_layer_specs
from hybridize.inference.chat import greedy_decode_without_cache
from hybridize.presets import TINY_CONFIGS, tiny_model

LAYERS = 4
MIXERS = ["gated_deltanet", "mamba2", "gla", "sliding_window", "full_attention"]
NEW_TOKENS = 6


@functools.cache
def teacher(model_type: str):
    return tiny_model(model_type, seed=0, num_hidden_layers=LAYERS)


def left_padded_batch() -> dict:
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, 256, (2, 11), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :5] = 0  # the second prompt is left-padded past the window
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def convert_seeded(model, plan):
    torch.manual_seed(0)
    return convert(model, plan, progress=False)[0]


def test_tiny_configs_cover_the_tested_families():
    assert set(TINY_CONFIGS) == set(TESTED_MODEL_TYPES)


@pytest.mark.parametrize("mixer", MIXERS)
@pytest.mark.parametrize("model_type", TESTED_MODEL_TYPES)
def test_converts_generates_and_reloads(model_type, mixer, tmp_path):
    hybrid = convert_seeded(teacher(model_type), plan_layers(LAYERS, "1/4", mixer=mixer, window=4))
    assert type(hybrid).__name__ == "Hybrid" + type(teacher(model_type)).__name__
    inputs = left_padded_batch()

    # float64, so that chunked (prefill) and recurrent (decode) rounding cannot flip a near-tie argmax.
    double = hybrid.double()
    with torch.no_grad():
        cached = double.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert torch.equal(cached, greedy_decode_without_cache(double, inputs, NEW_TOKENS))

    hybrid = hybrid.float()
    save_hybrid(hybrid, tmp_path / "hybrid")
    reloaded = hybridize.load(tmp_path / "hybrid")
    assert type(reloaded) is type(hybrid)
    with torch.no_grad():
        assert torch.equal(hybrid(**inputs).logits, reloaded(**inputs).logits)


@pytest.mark.parametrize("model_type", TESTED_MODEL_TYPES)
def test_ratio_one_reproduces_the_teacher(model_type):
    model = teacher(model_type)
    hybrid = convert_seeded(model, plan_layers(LAYERS, "1", window=4096))
    inputs = left_padded_batch()
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, hybrid(**inputs).logits)


@pytest.mark.parametrize("model_type", ["llama", "qwen3_vl"])
def test_mixed_plan_converts_generates_and_reloads(model_type, tmp_path):
    plan = plan_layers(LAYERS, layers="0:sliding_window,1:gated_deltanet,2:mamba2,3:gla", window=4)
    hybrid = convert_seeded(teacher(model_type), plan)
    inputs = left_padded_batch()
    double = hybrid.double()
    with torch.no_grad():
        cached = double.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert torch.equal(cached, greedy_decode_without_cache(double, inputs, NEW_TOKENS))
    save_hybrid(hybrid.float(), tmp_path / "mixed")
    reloaded = hybridize.load(tmp_path / "mixed")
    assert reloaded.config.hybridize["layers"] == ["sliding_window", "gated_deltanet", "mamba2", "gla"]
    with torch.no_grad():
        assert torch.equal(hybrid(**inputs).logits, reloaded(**inputs).logits)


def test_unconvertible_models_say_what_is_missing():
    from transformers import GPT2Config

    with pytest.raises(ValueError, match="no `layers` list"):
        base_layer_specs(GPT2Config(n_layer=2, n_embd=32, n_head=2), "gpt2-tiny")

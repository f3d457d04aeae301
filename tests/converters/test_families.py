"""Every tested family converts with every mixer, generates with its cache, and round-trips through save/load."""

from __future__ import annotations

import functools

import pytest
import torch
from transformers import Qwen2VLImageProcessorPil

import hybridize
from hybridize.converters import TESTED_MODEL_TYPES, convert, plan_layers, save_hybrid
from hybridize.converters.checkpoint import base_layer_specs
from hybridize.mixers import TokenMixer
from hybridize.presets import SPECIAL_TOKEN_IDS, TINY_CONFIGS, tiny_model
from hybridize.testing import greedy_decode_without_cache
from tests.conftest import make_image

pytestmark = pytest.mark.transformers_surface  # also run on the oldest supported transformers

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


@pytest.mark.parametrize("model_type", TESTED_MODEL_TYPES)
def test_conversion_copies_every_weight_outside_the_converted_attention(model_type):
    model = teacher(model_type)
    hybrid = convert_seeded(model, plan_layers(LAYERS, "1/4", mixer="gated_deltanet", window=4))
    converted = {f"{name}." for name, module in hybrid.named_modules() if isinstance(module, TokenMixer)}
    ours = hybrid.state_dict()
    copied = {key: value for key, value in model.state_dict().items() if not key.startswith(tuple(converted))}
    assert len(copied) < len(model.state_dict())
    for key, value in copied.items():  # vision towers included (LLaVA's CLIP also has layers.N.self_attn)
        assert torch.equal(ours[key], value), key


def image_inputs(model_type: str) -> dict:
    """A left-padded batch of two prompts with one small image each, in the family's own input format."""
    image = make_image(1)
    if model_type == "llava":  # CLIP, 28x28 pixels in 14x14 patches: 4 image tokens (CLS dropped)
        tokens = 4
        pixels = {"pixel_values": torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(0))}
    else:  # Qwen-VL: patches of 14 (16 on Qwen3-VL) merged 2x2
        patch = 16 if model_type == "qwen3_vl" else 14
        processor = Qwen2VLImageProcessorPil(
            size={"shortest_edge": 56 * 56, "longest_edge": 112 * 112},
            patch_size=patch,
            temporal_patch_size=2,
            merge_size=2,
        )
        pixels = dict(processor(images=[image, image], return_tensors="pt"))
        tokens = int(pixels["image_grid_thw"][0].prod()) // 4
    pad, image_pad, start, end = (
        SPECIAL_TOKEN_IDS[t] for t in ("<|endoftext|>", "<|image_pad|>", "<|vision_start|>", "<|vision_end|>")
    )
    rows = [
        [5, 6, start] + [image_pad] * tokens + [end, 7, 8],
        [pad] * 3 + [9, start] + [image_pad] * tokens + [end],
    ]
    input_ids = torch.tensor(rows)
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), **pixels}
    inputs["attention_mask"][1, :3] = 0
    if model_type != "llava":
        inputs["mm_token_type_ids"] = (input_ids == image_pad).long()
    return inputs


@pytest.mark.parametrize("model_type", ["qwen2_5_vl", "qwen2_vl", "qwen3_vl", "llava"])
def test_vision_language_families_generate_from_images(model_type):
    plan = plan_layers(LAYERS, layers="0:sliding_window,1:gated_deltanet,2:mamba2,3:gla", window=4)
    hybrid = convert_seeded(teacher(model_type), plan).double()
    inputs = image_inputs(model_type)
    inputs["pixel_values"] = inputs["pixel_values"].double()
    with torch.no_grad():
        cached = hybrid.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
        blank = hybrid(**{**inputs, "pixel_values": torch.zeros_like(inputs["pixel_values"])}).logits
        seen = hybrid(**inputs).logits
    assert torch.equal(cached, greedy_decode_without_cache(hybrid, inputs, NEW_TOKENS))
    assert not torch.allclose(blank, seen)  # the image reaches the language model


def test_unconvertible_models_say_what_is_missing():
    from transformers import GPT2Config

    with pytest.raises(ValueError, match="no `layers` list"):
        base_layer_specs(GPT2Config(n_layer=2, n_embd=32, n_head=2), "gpt2-tiny")

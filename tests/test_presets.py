"""The embedded tiny Qwen2.5-VL: its token ids fit its config, its chat template, the processor round-trips
through AutoProcessor, and its weights are fixed by the seed."""

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from hybridize.presets import (
    SPECIAL_TOKEN_IDS,
    tiny_qwen2_5_vl,
    tiny_qwen2_5_vl_config,
    tiny_qwen2_5_vl_processor,
)


def image(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (56, 56, 3), dtype=np.uint8))


def chat(prompt: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]


@pytest.fixture(scope="module")
def processor():
    return tiny_qwen2_5_vl_processor()


def encode(processor, prompts: list[str], **kwargs) -> transformers.BatchFeature:
    texts = [
        processor.apply_chat_template(chat(p), add_generation_prompt=True, tokenize=False) for p in prompts
    ]
    images = [image(seed) for seed in range(len(prompts))]
    return processor(text=texts, images=images, return_tensors="pt", **kwargs)


def test_config_token_ids_are_the_tokenizer_ids(processor):
    config = tiny_qwen2_5_vl_config()
    tokenizer = processor.tokenizer
    assert len(tokenizer) <= config.text_config.vocab_size == 512
    assert {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKEN_IDS} == SPECIAL_TOKEN_IDS
    assert (
        config.image_token_id == tokenizer.convert_tokens_to_ids("<|image_pad|>") == processor.image_token_id
    )
    assert config.video_token_id == tokenizer.convert_tokens_to_ids("<|video_pad|>")
    assert config.vision_start_token_id == tokenizer.convert_tokens_to_ids("<|vision_start|>")
    assert config.vision_end_token_id == tokenizer.convert_tokens_to_ids("<|vision_end|>")
    assert config.text_config.eos_token_id == tokenizer.eos_token_id
    assert config.text_config.pad_token_id == tokenizer.pad_token_id
    for cfg in (config, config.text_config):
        ids = {name: value for name, value in cfg.to_dict().items() if name.endswith("_token_id")}
        assert all(0 <= value < 512 for value in ids.values()), ids


def test_chat_template_places_one_image_placeholder(processor):
    text = processor.apply_chat_template(chat("Describe."), add_generation_prompt=True, tokenize=False)
    assert text.count("<|vision_start|><|image_pad|><|vision_end|>") == 1
    assert text.endswith("Describe.<|im_end|>\n<|im_start|>assistant\n")


def test_processor_round_trips_through_auto_processor(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    reloaded = transformers.AutoProcessor.from_pretrained(tmp_path)
    assert type(reloaded) is type(processor)
    original, restored = encode(processor, ["Describe."]), encode(reloaded, ["Describe."])
    assert torch.equal(original["input_ids"], restored["input_ids"])
    # Not pixel_values: with torchvision installed the reload picks the torchvision image processor backend.
    assert torch.equal(original["image_grid_thw"], restored["image_grid_thw"])


def test_weights_are_fixed_by_the_seed_and_global_rng_is_untouched():
    rng_state = torch.random.get_rng_state()
    first, _ = tiny_qwen2_5_vl(seed=0)
    second, _ = tiny_qwen2_5_vl(seed=0)
    other, _ = tiny_qwen2_5_vl(seed=1)
    assert torch.equal(torch.random.get_rng_state(), rng_state)

    first, second, other = first.state_dict(), second.state_dict(), other.state_dict()
    assert all(torch.equal(first[name], second[name]) for name in first)
    assert not torch.equal(first["lm_head.weight"], other["lm_head.weight"])

"""The embedded default model: a tiny, randomly initialised Qwen2.5-VL built fully offline.

Everything is made from scratch (byte-level tokenizer, PIL image processor, config, weights), so the
README examples and the tests need neither hub downloads nor torchvision, and a seed fixes the weights.
"""

import torch
from tokenizers import pre_tokenizers
from transformers import (
    AutoProcessor,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2Tokenizer,
    Qwen2VLImageProcessorPil,
)

from hybridize.mixers.base import AttentionSpec

VOCAB_SIZE = 512
# Same order as in the real Qwen2.5-VL vocabulary, placed right after the 256 byte tokens (ids 256..262).
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
SPECIAL_TOKEN_IDS = {token: 256 + i for i, token in enumerate(SPECIAL_TOKENS)}

# The Qwen2.5-VL chat template (ChatML with a default system prompt and vision placeholders).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}"
    "{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class Qwen2_5_VLImageOnlyProcessor(Qwen2_5_VLProcessor):
    """`Qwen2_5_VLProcessor` for images and text only.

    Every transformers video processor needs torchvision, and `ProcessorMixin` type-checks each sub-processor,
    so `video_processor=None` is rejected. Leaving `video_processor` out of the signature drops it from the
    processor's attributes; the parent's positional `None` for it is then ignored.
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)


# AutoProcessor finds a saved `processor_class` by name among registered processors. The key is a plain name,
# not Qwen2_5_VLConfig, so real Qwen2.5-VL checkpoints keep their processor (and transformers 5.17 silently
# ignores registrations keyed by one of its own config classes).
AutoProcessor.register("qwen2_5_vl_image_only", Qwen2_5_VLImageOnlyProcessor)


def _byte_level_tokenizer() -> Qwen2Tokenizer:
    """Qwen2's byte-level BPE pipeline with no merges: one token per byte, then the special tokens."""
    vocab = {char: i for i, char in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab.update(SPECIAL_TOKEN_IDS)
    return Qwen2Tokenizer(
        vocab=vocab,
        merges=[],
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=32768,
        extra_special_tokens=[t for t in SPECIAL_TOKENS if t not in ("<|endoftext|>", "<|im_end|>")],
    )


def tiny_qwen2_5_vl_processor() -> Qwen2_5_VLImageOnlyProcessor:
    """Processor for the tiny model; a 56x56 image becomes 4 image tokens, larger ones at most 64."""
    # The size "edges" are pixel counts (min_pixels / max_pixels, deprecated names in 5.x).
    image_processor = Qwen2VLImageProcessorPil(
        size={"shortest_edge": 56 * 56, "longest_edge": 224 * 224},
        patch_size=14,
        temporal_patch_size=2,
        merge_size=2,
    )
    return Qwen2_5_VLImageOnlyProcessor(image_processor, _byte_level_tokenizer(), chat_template=CHAT_TEMPLATE)


def tiny_text_config(num_hidden_layers: int = 8, **overrides) -> dict:
    """Text-decoder settings shared by every tiny model: hidden 64, 4 query / 2 KV heads of 16 (GQA), the
    byte-level tokenizer's vocabulary and special-token ids."""
    return dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
        bos_token_id=SPECIAL_TOKEN_IDS["<|endoftext|>"],
        eos_token_id=SPECIAL_TOKEN_IDS["<|im_end|>"],
        pad_token_id=SPECIAL_TOKEN_IDS["<|endoftext|>"],
        **overrides,
    )


# Image/video token ids of every tiny VLM (the tokenizer's special tokens).
VISION_TOKEN_IDS = dict(
    image_token_id=SPECIAL_TOKEN_IDS["<|image_pad|>"],
    video_token_id=SPECIAL_TOKEN_IDS["<|video_pad|>"],
    vision_start_token_id=SPECIAL_TOKEN_IDS["<|vision_start|>"],
    vision_end_token_id=SPECIAL_TOKEN_IDS["<|vision_end|>"],
)
MROPE = {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0}


def tiny_qwen2_5_vl_config(num_hidden_layers: int = 8) -> Qwen2_5_VLConfig:
    """Config of the tiny model, with the special-token ids of `tiny_qwen2_5_vl_processor`'s tokenizer."""
    vision_config = dict(
        depth=2,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        out_hidden_size=64,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        window_size=56,
        fullatt_block_indexes=[1],
    )
    return Qwen2_5_VLConfig(
        text_config=tiny_text_config(num_hidden_layers, rope_parameters=MROPE),
        vision_config=vision_config,
        **VISION_TOKEN_IDS,
        tie_word_embeddings=False,
    )


def tiny_qwen2_5_vl(
    seed: int = 0, num_hidden_layers: int = 8
) -> tuple[Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLImageOnlyProcessor]:
    """The tiny model (fp32, eval mode, weights fixed by `seed`) and its processor; the global RNG is untouched."""
    return tiny_model("qwen2_5_vl", seed, num_hidden_layers), tiny_qwen2_5_vl_processor()


def qwen2_5_vl_3b_config() -> Qwen2_5_VLConfig:
    """The architecture of Qwen2.5-VL-3B-Instruct (InfiniteVL's teacher), for benchmarks with random weights."""
    text_config = dict(
        vocab_size=151936,
        hidden_size=2048,
        intermediate_size=11008,
        num_hidden_layers=36,
        num_attention_heads=16,
        num_key_value_heads=2,
        max_position_embeddings=128000,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1000000.0},
        bos_token_id=151643,
        eos_token_id=151645,
    )
    vision_config = dict(
        depth=32,
        hidden_size=1280,
        intermediate_size=3420,
        num_heads=16,
        out_hidden_size=2048,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        window_size=112,
        fullatt_block_indexes=[7, 15, 23, 31],
    )
    return Qwen2_5_VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=151655,
        video_token_id=151656,
        vision_start_token_id=151652,
        vision_end_token_id=151653,
        tie_word_embeddings=True,
    )


# The attention layout of Qwen2.5-VL-3B's text layers, as `attention_spec` reads it from the model.
QWEN2_5_VL_3B_ATTENTION = AttentionSpec(
    hidden_size=2048,
    num_heads=16,
    num_kv_heads=2,
    head_dim=128,
    qkv_bias=True,
    rope="mrope",
    rms_norm_eps=1e-6,
)


def _tiny_qwen2_vl_config(num_hidden_layers: int):
    from transformers import Qwen2VLConfig

    vision_config = dict(
        depth=2, embed_dim=32, hidden_size=64, mlp_ratio=2, num_heads=2, patch_size=14, spatial_merge_size=2
    )
    return Qwen2VLConfig(
        text_config=tiny_text_config(num_hidden_layers, rope_parameters=MROPE),
        vision_config=vision_config,
        **VISION_TOKEN_IDS,
        tie_word_embeddings=False,
    )


def _tiny_qwen3_vl_config(num_hidden_layers: int):
    from transformers import Qwen3VLConfig

    rope = {**MROPE, "mrope_section": [4, 2, 2], "mrope_interleaved": True}
    vision_config = dict(
        depth=2,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        out_hidden_size=64,
        patch_size=16,
        spatial_merge_size=2,
        temporal_patch_size=2,
        num_position_embeddings=64,
        deepstack_visual_indexes=[1],
    )
    text_config = tiny_text_config(num_hidden_layers, rope_parameters=rope)
    text_config.pop("pad_token_id")
    return Qwen3VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        **VISION_TOKEN_IDS,
        tie_word_embeddings=False,
    )


def _tiny_llava_config(num_hidden_layers: int):
    from transformers import LlavaConfig

    vision_config = dict(
        model_type="clip_vision_model",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=28,
        patch_size=14,
        projection_dim=32,
    )
    return LlavaConfig(
        text_config={"model_type": "llama", **tiny_text_config(num_hidden_layers)},
        vision_config=vision_config,
        image_token_id=SPECIAL_TOKEN_IDS["<|image_pad|>"],
        tie_word_embeddings=False,
    )


def _tiny_text_model_config(config_class_name: str, **overrides):
    def build(num_hidden_layers: int):
        import transformers

        config_class = getattr(transformers, config_class_name)
        return config_class(**tiny_text_config(num_hidden_layers, **overrides), tie_word_embeddings=False)

    return build


# Tiny configs of every family hybridize is tested on: model_type -> builder(num_hidden_layers).
TINY_CONFIGS = {
    "qwen2_5_vl": tiny_qwen2_5_vl_config,
    "qwen2_vl": _tiny_qwen2_vl_config,
    "qwen3_vl": _tiny_qwen3_vl_config,
    "llava": _tiny_llava_config,
    "llama": _tiny_text_model_config("LlamaConfig"),
    "qwen2": _tiny_text_model_config("Qwen2Config"),
    "qwen3": _tiny_text_model_config("Qwen3Config"),
    "mistral": _tiny_text_model_config("MistralConfig", sliding_window=None),
}


def tiny_model(model_type: str, seed: int = 0, num_hidden_layers: int = 4):
    """A tiny randomly initialised model of a tested family (fp32, eval mode, weights fixed by `seed`)."""
    from hybridize.converters.hybrid_model import generation_auto_class

    if model_type not in TINY_CONFIGS:
        raise ValueError(
            f"No tiny config for {model_type!r}; tiny models exist for {', '.join(TINY_CONFIGS)}."
        )
    config = TINY_CONFIGS[model_type](num_hidden_layers)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = generation_auto_class(type(config)).from_config(config)
    return model.eval()


def tiny_model_with_tokenizer(model_type: str):
    """Builder of (tiny model of `model_type`, byte-level tokenizer with the ChatML template), as the
    embedded `tiny-<family>` names load it."""

    def build(seed: int = 0, num_hidden_layers: int = 8):
        tokenizer = _byte_level_tokenizer()
        tokenizer.chat_template = CHAT_TEMPLATE
        return tiny_model(model_type, seed, num_hidden_layers), tokenizer

    return build

"""Every contact with transformers internals, in one module.

hybridize swaps modules inside transformers models, keeps state in their caches and drives `generate()`, so it
touches names that transformers may rename between minor releases. Each such name is read or written here and
nowhere else, so that an upgrade is a change in this file; docs/architecture.md ("The transformers surface")
lists them, why each is needed and the versions CI tests (the floor and the newest release of the range in
pyproject.toml).

The cache keyword is the one that moves: up to 5.23 every forward (model, decoder layer, attention module) and
the mask builders take the cache as `past_key_values`; from 5.24 as `cache` (the old name warns until 5.40).
Mixers never see the difference: `TokenMixer.__call__` hands them the cache as `cache` on every version
(`pop_cache`), and our own calls into transformers pass it under this version's name (`cache_argument`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch
import transformers
from packaging.version import Version

# Cache classes our cache slots subclass (their attributes `keys`, `values`, `cumulative_length`, `is_sliding`,
# `_sliding_window_tensor` and `get_mask_sizes` are relied on), and SDPA as transformers' attention interface calls it.
from transformers import AttentionInterface  # noqa: E402
from transformers.cache_utils import Cache, DynamicLayer, DynamicSlidingWindowLayer  # noqa: E402
from transformers.integrations.sdpa_attention import sdpa_attention_forward  # noqa: E402
from transformers.masking_utils import (  # noqa: E402
    AttentionMaskInterface,
    create_causal_mask,
    create_sliding_window_causal_mask,
    flash_attention_mask,
)

__all__ = ["Cache", "DynamicLayer", "DynamicSlidingWindowLayer", "sdpa_attention_forward"]

TRANSFORMERS_VERSION = Version(transformers.__version__)

CACHE_KEYWORD = "cache" if TRANSFORMERS_VERSION.release >= (5, 24) else "past_key_values"
CACHE_KEYWORDS = ("cache", "past_key_values")


def cache_argument(cache: Any) -> dict[str, Any]:
    """The keyword argument that hands `cache` to a transformers forward or mask builder on this version."""
    return {CACHE_KEYWORD: cache}


def pop_cache(kwargs: dict[str, Any]) -> Any:
    """The cache a caller passed under either name (removed from `kwargs`), or None.

    Decoder layers pass it as `cache` (5.24+) or `past_key_values` (up to 5.23); users of the old name get the
    same object.
    """
    found = [kwargs.pop(name) for name in CACHE_KEYWORDS if name in kwargs]
    found = [cache for cache in found if cache is not None]
    if len(found) > 1 and found[0] is not found[1]:
        raise ValueError("Pass the cache once, as `cache` (or `past_key_values`), not two different caches.")
    return found[0] if found else None


def output_cache(outputs: Any) -> Any:
    """The cache a model output carries (`outputs.cache` from 5.24, `outputs.past_key_values` before)."""
    return getattr(outputs, CACHE_KEYWORD)


def causal_mask(config, inputs_embeds: torch.Tensor, attention_mask, cache, **kwargs):
    """transformers' causal mask for the full-attention layers of a model whose cache is `cache`."""
    return create_causal_mask(
        config=config,
        inputs_embeds=inputs_embeds,
        attention_mask=attention_mask,
        **cache_argument(cache),
        **kwargs,
    )


def sliding_window_causal_mask(config, inputs_embeds: torch.Tensor, attention_mask, cache, **kwargs):
    """transformers' sliding-window causal mask (the config's window) for a model whose cache is `cache`."""
    return create_sliding_window_causal_mask(
        config=config,
        inputs_embeds=inputs_embeds,
        attention_mask=attention_mask,
        **cache_argument(cache),
        **kwargs,
    )


# --- generate() ---------------------------------------------------------------------------------------------

# Keyword arguments generate() hands a custom decoding loop that are not inputs of the model's forward.
GENERATE_LOOP_KWARGS = (*CACHE_KEYWORDS, "use_cache", "logits_to_keep", "synced_gpus", "streamer")


def generation_cache(model_kwargs: dict[str, Any]) -> Any:
    """The cache generate() prepared or the user passed, from the `model_kwargs` of a custom decoding loop."""
    return next((model_kwargs[name] for name in CACHE_KEYWORDS if model_kwargs.get(name) is not None), None)


def pad_token_tensor(generation_config) -> torch.Tensor | None:
    """The pad token id generate() prepared (a private field of its generation config) for finished rows."""
    return generation_config._pad_token_tensor


def generation_logits_processors(model, generation_config, prompt_length: int, device):
    """The `LogitsProcessorList` generate() builds for one unpadded prompt of `prompt_length` tokens: its logits
    processors (repetition penalty, minimum lengths, suppressed tokens, ...) and, when
    `generation_config.do_sample`, its warpers (temperature, top-k, top-p, ...), in generate()'s order. Like
    generate(), it writes the special tokens into `generation_config` as tensors (private fields): pass a copy."""
    model._prepare_special_tokens(
        generation_config, kwargs_has_attention_mask=False, device=device, batch_size=1
    )
    return model._get_logits_processor(
        generation_config=generation_config,
        input_ids_seq_length=prompt_length,
        device=device,
        model_kwargs={},
    )


def generation_position_ids(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, **model_inputs):
    """Position ids of a prompt on an empty cache as generate() makes them: the model's own rule where it has
    one (M-RoPE models add their vision positions and remember `rope_deltas`), else from the padding mask."""
    prepare = getattr(model, "_prepare_position_ids_for_generation", None)
    if prepare is not None:
        return prepare(input_ids, {"attention_mask": attention_mask, **model_inputs})
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 0)


# --- configs and model classes -------------------------------------------------------------------------------


def configured_attention(config) -> str:
    """The attention implementation a config's modules dispatch to ("sdpa", "eager", a registered name...)."""
    return config._attn_implementation


def set_attention_implementation(config, name: str) -> None:
    """Point a config's attention modules at another implementation (registered in `AttentionInterface`).

    Written on the private field: the public setter also re-validates the model's support for it, which a name
    registered at run time (our decode and window attentions) does not pass on every version.
    """
    config._attn_implementation = name


def uncompile_module(module: torch.nn.Module) -> bool:
    """Undo `module.compile()` (nn.Module keeps the compiled callable in a private field; there is no public
    inverse). Returns whether the module was compiled."""
    if getattr(module, "_compiled_call_impl", None) is None:
        return False
    module._compiled_call_impl = None
    return True


def register_unpadded_attention(name: str, function) -> None:
    """Register an attention function under `name` whose masks are built as for flash-attention: None, or the 2-D
    key-padding mask (which the linear mixers read as well); packed rows reach it as `cu_seq_lens_q/k` kwargs."""
    AttentionInterface.register(name, function)
    AttentionMaskInterface.register(name, flash_attention_mask)


@contextlib.contextmanager
def attention_implementation(config, name: str) -> Iterator[None]:
    """`config` names the attention implementation `name` inside the block (the setter recurses into
    sub-configs), and what it named before after it, also when the block raises."""
    saved = configured_attention(config)
    set_attention_implementation(config, name)
    try:
        yield
    finally:
        set_attention_implementation(config, saved)


@contextlib.contextmanager
def without_native_windows(text_config, attention_modules: dict[int, Any]) -> Iterator[None]:
    """Native sliding-window layers (Qwen2 family: `text_config.layer_types[i] == "sliding_attention"`, and the
    attention module's `sliding_window`, which only the flash path reads) attend to the whole sequence inside the
    block: the model builds their masks from `layer_types` at every forward. Restored after, also on error."""
    saved_types = list(getattr(text_config, "layer_types", None) or [])
    saved_windows = {
        idx: getattr(module, "sliding_window", None) for idx, module in attention_modules.items()
    }
    try:
        for idx, module in attention_modules.items():
            text_config.layer_types[idx] = "full_attention"
            module.sliding_window = None
        yield
    finally:
        for idx, module in attention_modules.items():
            text_config.layer_types[idx] = saved_types[idx]
            module.sliding_window = saved_windows[idx]


def auto_model_class(auto_class, config_class) -> type | None:
    """The model class an Auto class builds for a config class, or None."""
    mapping = auto_class._model_mapping
    return mapping[config_class] if config_class in mapping else None


def copy_checkpoint_conversion(base_model_class: type, model_class_name: str) -> None:
    """Give a subclass the key renaming its base applies when loading and saving (Qwen2.5-VL's legacy layout);
    transformers looks the mapping up by class name, so a renamed subclass would otherwise load no weight."""
    from transformers.conversion_mapping import (
        get_checkpoint_conversion_mapping,
        register_checkpoint_conversion_mapping,
    )

    mapping = get_checkpoint_conversion_mapping(base_model_class.__name__)
    if mapping is None:
        mapping = get_checkpoint_conversion_mapping(base_model_class.config_class.model_type)
    if mapping is not None:
        register_checkpoint_conversion_mapping(model_class_name, mapping, overwrite=True)


def saved_tensor_names(model) -> dict[str, torch.Tensor]:
    """The model's state dict under the names `save_pretrained` writes (Qwen2.5-VL's legacy layout: transformers
    reverses the loading conversion when saving), so a checkpoint's file headers can be checked against it."""
    from transformers.core_model_loading import revert_weight_conversion

    return revert_weight_conversion(model, model.state_dict(keep_vars=True))  # tied weights: one object


def no_init_weights():
    """Context in which transformers builds modules without running their initialisers."""
    from transformers.initialization import no_init_weights as no_init

    return no_init()


# --- processors ------------------------------------------------------------------------------------------------


def returns_mm_token_type_ids(processor) -> bool:
    """Whether the model behind `processor` needs `mm_token_type_ids` (0 text, 1 image, 2 video) with its inputs.

    Processors say so from 5.23 (`return_mm_token_type_ids`); before, the Qwen-VL processors always return them
    and the others never do, which their declared model inputs tell.
    """
    flag = getattr(processor, "return_mm_token_type_ids", None)
    if flag is not None:
        return bool(flag)
    return "mm_token_type_ids" in getattr(processor, "model_input_names", ())


def num_image_tokens(processor, height: int, width: int) -> int:
    """How many placeholder tokens the processor writes for one image of this size."""
    return processor._get_num_multimodal_tokens(image_sizes=[(height, width)])["num_image_tokens"][0]


def has_image_token_counter(processor) -> bool:
    """Whether `num_image_tokens` can answer for this processor."""
    try:
        return bool(processor._get_num_multimodal_tokens(image_sizes=[(56, 56)])["num_image_tokens"])
    except (AttributeError, KeyError, NotImplementedError, TypeError, ValueError):
        return False


def qwen2_vl_smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int):
    """Qwen2-VL's rounding of an image or video frame to the patch grid (height, width)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    return smart_resize(height, width, factor, min_pixels, max_pixels)


# --- Qwen2.5-VL vision tower ---------------------------------------------------------------------------------


def is_qwen2_5_vision(visual) -> bool:
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    return isinstance(visual, Qwen2_5_VisionTransformerPretrainedModel)


def qwen2_5_vision_index_tensors(
    visual, grid_thw: torch.Tensor, varlen: bool | None = None
) -> dict[str, Any]:
    """Qwen2.5-VL's vision-tower index tensors for one frame size, as the keyword arguments its forward accepts
    precomputed (transformers.vision_utils); {} for other vision towers.

    Computed on every call they need host syncs (`.tolist()`), which a CUDA graph cannot hold. varlen: for the
    attention's varlen (flash) branch, which reads the boundaries on the device and their largest segment as an
    int (default: when the tower's attention implementation is a flash one). Otherwise the ViT only splits its
    sequence at the boundaries, so those stay on the CPU.
    """
    from transformers.utils.generic import is_flash_attention_requested
    from transformers.vision_utils import (
        get_vision_cu_seqlens,
        get_vision_position_ids,
        get_vision_window_index,
    )

    if not is_qwen2_5_vision(visual):
        return {}
    merge = visual.spatial_merge_size
    window_index, cu_window_seqlens = get_vision_window_index(
        grid_thw, spatial_merge_size=merge, window_size=visual.window_size, patch_size=visual.patch_size
    )
    cu_seqlens = get_vision_cu_seqlens(grid_thw)
    # window_index is built on the CPU: indexing a device tensor with it would copy it over on every call
    kwargs = dict(
        position_ids=get_vision_position_ids(grid_thw, merge), window_index=window_index.to(grid_thw.device)
    )
    if varlen is None:
        varlen = is_flash_attention_requested(visual.config)
    if varlen:
        kwargs.update(
            cu_seqlens=cu_seqlens,
            cu_window_seqlens=cu_window_seqlens,
            max_seqlen=int((cu_seqlens[1:] - cu_seqlens[:-1]).max()),
            max_window_seqlen=int((cu_window_seqlens[1:] - cu_window_seqlens[:-1]).max()),
        )
    else:
        kwargs.update(cu_seqlens=cu_seqlens.cpu(), cu_window_seqlens=cu_window_seqlens.cpu())
    return kwargs


# --- logging -------------------------------------------------------------------------------------------------

# Warnings transformers logs that do not hold for hybridize's models: Qwen2-family configs say SWA is not
# implemented for sdpa, but the sliding mask enforces the window (tests/mixers/test_sliding_window.py).
STALE_WARNINGS = ("Sliding Window Attention is enabled but not implemented",)


class _DropStaleWarnings(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(STALE_WARNINGS)


def silence_stale_warnings() -> None:
    """Keep transformers' `STALE_WARNINGS` off the console (the CLI calls this; library users see everything)."""
    from transformers.utils import logging as transformers_logging

    for handler in transformers_logging.get_logger().handlers:
        if not any(isinstance(f, _DropStaleWarnings) for f in handler.filters):
            handler.addFilter(_DropStaleWarnings())

"""Helpers for checking hybrids, used by the tests, the examples and the benchmarks: the uncached greedy loop that
cached generation must reproduce, the states a cache holds in a form comparable between cache kinds, and small
synthetic chat data sets (`hybridize.testing.synthetic`)."""

from __future__ import annotations

import torch

from hybridize.converters.discovery import rotary_kind
from hybridize.inference.static_cache import StaticAttentionLayer
from hybridize.mixers.cache import MixerCacheLayer


@torch.inference_mode()
def greedy_decode_without_cache(model, inputs: dict, steps: int) -> torch.Tensor:
    """Greedy decoding that reruns the whole sequence at every step with no cache: the slow, obviously
    correct reference that `generate()` with the hybrid cache must reproduce token for token. Stops as
    generate() does: a row that emits an end-of-sequence token gets the pad token after it, and the loop
    ends when every row has."""
    inputs = dict(inputs)
    config = model.generation_config
    eos = config.eos_token_id if config.eos_token_id is not None else []
    eos = torch.tensor([eos] if isinstance(eos, int) else list(eos), device=inputs["input_ids"].device)
    pad = config.pad_token_id if config.pad_token_id is not None else (eos[0].item() if len(eos) else 0)
    finished = torch.zeros(inputs["input_ids"].shape[0], 1, dtype=torch.bool, device=eos.device)
    # 1-D RoPE models get generate()'s padding-aware positions (M-RoPE models derive theirs from the mask).
    # RoPE is relative, but its tables are fp32: other absolute positions would move logits by ~1e-7.
    padding_aware_positions = rotary_kind(model.config.get_text_config(decoder=True)) == "rope"
    for _ in range(steps):
        if padding_aware_positions:
            mask = inputs["attention_mask"].long()
            inputs["position_ids"] = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
        token = model(**inputs, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        token = token.masked_fill(finished, pad)
        finished = finished | torch.isin(token, eos)
        inputs["input_ids"] = torch.cat([inputs["input_ids"], token], dim=1)
        inputs["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(token)], dim=1)
        if "mm_token_type_ids" in inputs:  # appended tokens are text (type 0)
            inputs["mm_token_type_ids"] = torch.cat(
                [inputs["mm_token_type_ids"], torch.zeros_like(token)], dim=1
            )
        if finished.all():
            break
    return inputs["input_ids"]


def held_states(cache) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) of the tokens' states a cache holds, comparable between cache kinds (a stream's and the
    `DynamicCache` of one forward over the same tokens): a mixer layer's states by name, a static cache layer's
    reachable tokens oldest first, any other attention layer's keys and values (a sliding window's: the tokens it
    keeps)."""
    held = []
    for layer in cache.layers:
        if isinstance(layer, MixerCacheLayer):
            held += list(layer.states.items())
        elif isinstance(layer, StaticAttentionLayer):
            held += list(zip(("keys", "values"), layer.kept(), strict=True))
        else:
            held += [("keys", layer.keys), ("values", layer.values)]
    return held

"""Position ids for packed batches: several samples in one row, each starting again at position 0.

The data module gives 1-D text positions that restart at every sample and transformers' packing kwargs
(`cu_seq_lens_q`: the sample boundaries over the flattened batch). Models with 1-D RoPE take those positions
as they are; transformers then builds block-diagonal attention masks from them (with no attention_mask),
and the mixers reset their state at the same boundaries (`TokenMixer.forward_varlen`: one call through the
varlen kernels on CUDA; `TokenMixer.forward_per_sequence` elsewhere). Qwen-VL models with
multimodal RoPE need (4, B, T) positions: the text positions (which the masks are built from) on top of the
three M-RoPE axes, computed per sample by the model's own `get_rope_index`.
"""

from __future__ import annotations

import torch
from torch import nn


def packed_position_ids(model: nn.Module, inputs: dict) -> torch.Tensor:
    text_positions = inputs["position_ids"]  # (B, T), restarting at 0 for each sample
    inner = getattr(model, "model", model)
    get_rope_index = getattr(inner, "get_rope_index", None)
    if get_rope_index is None:
        return text_positions
    batch, length = text_positions.shape
    bounds = inputs["cu_seq_lens_q"].tolist()
    input_ids = inputs["input_ids"].reshape(-1)
    token_types = inputs.get("mm_token_type_ids")
    token_types = torch.zeros_like(input_ids) if token_types is None else token_types.reshape(-1)
    # Samples as rows of one padded batch: get_rope_index walks the image/video grids in order across rows.
    spans = [(start, end) for start, end in zip(bounds[:-1], bounds[1:], strict=False) if end > start]
    longest = max(end - start for start, end in spans)
    rows = input_ids.new_zeros(len(spans), longest)
    types = token_types.new_zeros(len(spans), longest)
    mask = torch.zeros(len(spans), longest, dtype=torch.long, device=input_ids.device)
    for row, (start, end) in enumerate(spans):
        rows[row, : end - start], types[row, : end - start] = input_ids[start:end], token_types[start:end]
        mask[row, : end - start] = 1
    if bool((types != 0).any()):
        rope, _ = get_rope_index(
            rows,
            mm_token_type_ids=types,
            image_grid_thw=inputs.get("image_grid_thw"),
            video_grid_thw=inputs.get("video_grid_thw"),
            second_per_grid_ts=inputs.get("second_per_grid_ts"),
            attention_mask=mask,
        )
    else:
        rope = (mask.cumsum(-1) - 1).clamp(min=0)[None].expand(3, -1, -1)
    flat = text_positions.new_zeros(3, batch * length)
    for row, (start, end) in enumerate(spans):
        flat[:, start:end] = rope[:, row, : end - start]
    return torch.cat([text_positions[None], flat.view(3, batch, length)], dim=0)  # (4, B, T)

"""Samples -> batches: right-padded rows, or whole samples packed into rows of at most `max_length` tokens."""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import torch

from hybridize.lightning_modules.data.encoding import IGNORE_INDEX

TEXT_KEYS = ("input_ids", "labels", "mm_token_type_ids")
VISION_KEYS = (
    "pixel_values",
    "image_grid_thw",
    "pixel_values_videos",
    "video_grid_thw",
    "second_per_grid_ts",
)
PAD_VALUES = {"labels": IGNORE_INDEX, "mm_token_type_ids": 0}


def collate(
    samples: list[dict[str, torch.Tensor]],
    pad_token_id: int,
    *,
    pack: bool = False,
    max_length: int | None = None,
) -> dict[str, Any]:
    """Samples of `ChatDataset` -> one batch; vision tensors are concatenated in sample order.

    Padded (default): `input_ids`, `labels`, `attention_mask` (and `mm_token_type_ids`) of shape (B, T),
    right-padded with `pad_token_id` / -100 / 0. Packed: samples go whole, in order, into rows of at most
    `max_length` tokens; no attention mask, instead (R, T) `position_ids` restarting at 0 for each sample and
    the flash-attention kwargs `cu_seq_lens_q/k` (int32 boundaries over the flattened rows) and
    `max_length_q/k`, as transformers' `DataCollatorWithFlattening(return_flash_attn_kwargs=True)` makes them.
    Each sample's first label is -100 (it would be predicted from the previous sample); rows shorter than the
    longest end in one pad segment (pad tokens, labels -100, positions from 0) that cu_seq_lens counts too.
    Qwen-VL models need their 3-D positions per packed sample on top (`packing.packed_position_ids`).
    """
    if not samples:
        raise ValueError("collate got no samples.")
    batch = {}
    for key in VISION_KEYS:
        parts = [s[key] for s in samples if key in s]
        if parts:
            batch[key] = torch.cat(parts)
    return batch | (_pack(samples, pad_token_id, max_length) if pack else _pad(samples, pad_token_id))


def _pad(samples: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    length = max(len(s["input_ids"]) for s in samples)
    keys = [k for k in TEXT_KEYS if k in samples[0]]
    batch = {
        k: torch.full((len(samples), length), PAD_VALUES.get(k, pad_token_id), dtype=torch.long) for k in keys
    }
    batch["attention_mask"] = torch.zeros(len(samples), length, dtype=torch.long)
    for row, sample in enumerate(samples):
        size = len(sample["input_ids"])
        for key in keys:
            batch[key][row, :size] = sample[key]
        batch["attention_mask"][row, :size] = 1
    return batch


def pack_rows(lengths: list[int] | np.ndarray, max_length: int | None) -> list[list[int]]:
    """Next-fit packing: consecutive samples share a row while the row stays within `max_length` tokens."""
    rows, used = [], 0
    for index, length in enumerate(lengths):
        if rows and (max_length is None or used + length <= max_length):
            rows[-1].append(index)
            used += length
        else:
            rows.append([index])
            used = length
    return rows


def _pack(samples: list[dict], pad_token_id: int, max_length: int | None) -> dict[str, Any]:
    rows = pack_rows([len(s["input_ids"]) for s in samples], max_length)
    width = max(sum(len(samples[i]["input_ids"]) for i in row) for row in rows)
    keys = [k for k in TEXT_KEYS if k in samples[0]]
    columns = {key: [] for key in [*keys, "position_ids"]}
    segments = []  # token count of each sample and pad segment, over the flattened rows
    for row in rows:
        for sample in (samples[i] for i in row):
            labels = sample["labels"].clone()
            labels[0] = IGNORE_INDEX  # it would be predicted from the previous sample's last token
            for key in keys:
                columns[key].append(labels if key == "labels" else sample[key])
            columns["position_ids"].append(torch.arange(len(labels)))
            segments.append(len(labels))
        pad = width - sum(len(samples[i]["input_ids"]) for i in row)
        if pad:  # one pad segment, positions restarting at 0 like a sample's, never trained
            for key in keys:
                columns[key].append(torch.full((pad,), PAD_VALUES.get(key, pad_token_id), dtype=torch.long))
            columns["position_ids"].append(torch.arange(pad))
            segments.append(pad)
    batch = {key: torch.cat(parts).view(len(rows), width) for key, parts in columns.items()}
    cu_seq_lens = torch.tensor([0, *itertools.accumulate(segments)], dtype=torch.int32)
    longest = max(segments)
    return batch | dict(
        cu_seq_lens_q=cu_seq_lens, cu_seq_lens_k=cu_seq_lens, max_length_q=longest, max_length_k=longest
    )

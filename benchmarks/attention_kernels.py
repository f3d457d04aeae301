"""The attention kernels behind the streaming session, timed on one frame's shapes (CUDA, bf16).

Sliding-window prefill of one 448x448 frame in Qwen2.5-VL-3B's SWA layers: 258 queries (16 heads) over the
8,191 kept keys plus their own (2 key/value heads, head size 128), window 8,192. Compared:
- `sdpa_band_mask`: SDPA under the dense band mask (what transformers runs; cuDNN on Hopper);
- `flex_band`: FlexAttention with the band as a block mask (compiled);
- `flash_window_full`: `window_attention` with a full window (PyTorch's batched flash kernel with its window);
- `flash_window_filling`: the same with 1 empty slot (its varlen form, empty slots skipped by key offsets).
ViT windowed attention of one frame (1,024 patches in 16 windows of 64, 16 heads of size 80):
- `vit_block_diagonal_sdpa`: SDPA under the block-diagonal mask;
- `vit_varlen_flash`: PyTorch's varlen flash kernel over the windows.

Each: CUDA events around one call, 10 warm-up calls, median of 100.

    python benchmarks/attention_kernels.py
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from hybridize.inference.vision_attention import BlockDiagonalMasks, packed_sdpa_attention
from hybridize.inference.window_attention import WindowKeys, window_attention, window_band_mask

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ is not a package
from common import default_output, median_ms, report_header, write_report  # noqa: E402

WINDOW, QUERIES, HEADS, KV_HEADS, HEAD_DIM = 8192, 258, 16, 2, 128
PATCHES, VIT_WINDOW, VIT_HEADS, VIT_HEAD_DIM = 1024, 64, 16, 80


def window_kernels(device: torch.device) -> dict[str, float]:
    keys_total = WINDOW - 1 + QUERIES
    query = torch.randn(1, HEADS, QUERIES, HEAD_DIM, device=device, dtype=torch.bfloat16)
    key, value = (
        torch.randn(1, KV_HEADS, keys_total, HEAD_DIM, device=device, dtype=torch.bfloat16) for _ in range(2)
    )
    full = WindowKeys(WINDOW, torch.tensor(0, dtype=torch.int32, device=device), full=True, flash=True)
    filling = WindowKeys(WINDOW, torch.tensor(1, dtype=torch.int32, device=device), full=False, flash=True)
    band = window_band_mask(full, QUERIES, keys_total)
    module = nn.Module()

    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    offset = keys_total - QUERIES
    block_mask = create_block_mask(
        lambda b, h, q, k: (k <= q + offset) & (q + offset - k < WINDOW),
        None,
        None,
        QUERIES,
        keys_total,
        device=device,
    )
    flex = torch.compile(flex_attention)
    return {
        "sdpa_band_mask": median_ms(
            lambda: F.scaled_dot_product_attention(query, key, value, attn_mask=band, enable_gqa=True)
        ),
        "flex_band": median_ms(lambda: flex(query, key, value, block_mask=block_mask, enable_gqa=True)),
        "flash_window_full": median_ms(lambda: window_attention(module, query, key, value, full)),
        "flash_window_filling": median_ms(lambda: window_attention(module, query, key, value, filling)),
    }


def vit_kernels(device: torch.device) -> dict[str, float]:
    qkv = torch.randn(PATCHES, 3, VIT_HEADS, VIT_HEAD_DIM, device=device, dtype=torch.bfloat16)
    query, key, value = qkv.permute(1, 2, 0, 3)[:, None].unbind(0)  # (1, H, N, D) views, as the ViT has them
    cu_seqlens = torch.arange(0, PATCHES + 1, VIT_WINDOW, device=device, dtype=torch.int32)
    varlen = dict(
        cu_seq_lens_q=cu_seqlens, cu_seq_lens_k=cu_seqlens, max_length_q=VIT_WINDOW, max_length_k=VIT_WINDOW
    )
    module, masked, flash = nn.Module(), BlockDiagonalMasks(), BlockDiagonalMasks(flash=True)
    return {
        "vit_block_diagonal_sdpa": median_ms(
            lambda: packed_sdpa_attention(
                module, query, key, value, None, block_diagonal_masks=masked, **varlen
            )
        ),
        "vit_varlen_flash": median_ms(
            lambda: packed_sdpa_attention(
                module, query, key, value, None, block_diagonal_masks=flash, **varlen
            )
        ),
    }


def markdown(report: dict) -> str:
    lines = [
        f"`{report['command']}`",
        "",
        f"{report['device']}, {report['date']}, "
        + ", ".join(f"{name} {version}" for name, version in report["versions"].items() if version),
        "",
        "| kernel | ms (median of 100) |",
        "|---|---|",
    ]
    lines += [f"| {name} | {ms:.4f} |" for name, ms in report["ms"].items()]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("attention_kernels.py times CUDA kernels; run it on a GPU.")
    device = torch.device("cuda")
    out = args.out or default_output("attention_kernels", device, quick=False)
    report = {**report_header("attention_kernels", argv, device), "ms": {}}
    report["ms"] |= window_kernels(device)
    report["ms"] |= vit_kernels(device)
    write_report(report, out, markdown)
    print(markdown(report))


if __name__ == "__main__":
    main()

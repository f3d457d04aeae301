"""Throughput of the streamed data path on CPU workers: parquet rows with embedded PNGs -> decoded images ->
the processor's image processor -> chat template and labels -> collated batches, as a training run reads them
(`ChatDataModule(sources=..., streaming=True)` through its DataLoader), without a model.

    python benchmarks/data_throughput.py --workers 2            # a laptop / this repository's CI machine
    python benchmarks/data_throughput.py --workers 8 --rows 4096   # a training node's CPU share per GPU

Writes benchmarks/results/data_throughput_cpu_<workers>w.json (+ .md): samples/s and tokens/s after the first
batch (worker start-up excluded), with the machine's CPU count. The processor is the embedded tiny Qwen2.5-VL's
(the real Qwen2-VL image processor and ChatML template, a small vocabulary), with InfiniteVL's pixel budget.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ is not a package

from common import RESULTS, report_header  # noqa: E402

from hybridize.lightning_modules.data import STREAM_KEY, ChatDataModule  # noqa: E402
from hybridize.presets import tiny_qwen2_5_vl_processor  # noqa: E402


def write_rows(folder: Path, rows: int, size: int, files: int) -> None:
    """`rows` LLaVA-layout rows in `files` parquet shards, each with a `size` x `size` PNG of noise (no compression
    advantage) and a short exchange."""
    import datasets

    rng = np.random.default_rng(0)
    images = []
    for _ in range(16):  # 16 distinct images, reused: encoding PNGs is not what is measured
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buffer, format="PNG")
        images.append(buffer.getvalue())
    records = [
        {
            "image": {"bytes": images[i % 16], "path": None},
            "conversations": [
                {"from": "human", "value": f"<image>\nDescribe picture {i} in detail."},
                {"from": "gpt", "value": "It is a square of coloured noise, " * 8},
            ],
        }
        for i in range(rows)
    ]
    data = datasets.Dataset.from_list(records).cast_column("image", datasets.Image())
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(files):
        data.shard(files, index, contiguous=True).to_parquet(str(folder / f"part-{index:03d}.parquet"))


def measure(folder: Path, workers: int, batch_size: int, max_pixels: int, max_length: int) -> dict:
    data = ChatDataModule(
        sources=[str(folder)],
        streaming=True,
        processor=tiny_qwen2_5_vl_processor(),
        max_length=max_length,
        max_pixels=max_pixels,
        batch_size=batch_size,
        num_workers=workers,
    )
    data.setup("fit")
    samples = tokens = 0
    first = None
    start = time.perf_counter()
    for batch in data.train_dataloader():
        meta = batch.pop(STREAM_KEY)
        if first is None:  # time from the first batch on: worker start-up is paid once per epoch
            first = time.perf_counter()
            continue
        samples += meta["samples"]
        tokens += int(batch["attention_mask"].sum())
    seconds = time.perf_counter() - first
    return {
        "workers": workers,
        "samples": samples,
        "seconds": round(seconds, 2),
        "samples_per_s": round(samples / seconds, 1),
        "tokens_per_s": round(tokens / seconds),
        "first_batch_s": round(first - start, 2),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--image-size", type=int, default=448, help="side of the embedded PNGs in pixels")
    parser.add_argument("--max-pixels", type=int, default=1806336, help="InfiniteVL's 1344 x 1344 budget")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=4096)
    parser.add_argument(
        "--out", type=Path, help="default: benchmarks/results/data_throughput_cpu_<workers>w.json"
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as root:
        folder = Path(root) / "rows"
        write_rows(folder, args.rows, args.image_size, files=max(args.workers, 1) * 4)
        result = measure(folder, args.workers, args.batch_size, args.max_pixels, args.max_length)
    report = report_header("data_throughput", argv, torch.device("cpu"))
    report["machine"] = {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine()}
    report["settings"] = {k: v for k, v in vars(args).items() if k != "out"}
    report["result"] = result
    out = args.out or RESULTS / f"data_throughput_cpu_{args.workers}w.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    out.with_suffix(".md").write_text(
        f"# Data throughput, {args.workers} CPU workers ({report['machine']['cpus']} CPUs, {report['date']})\n\n"
        f"`{report['command']}`\n\n| samples/s | tokens/s | samples | seconds | first batch (s) |\n|---|---|---|---|---|\n"
        f"| {result['samples_per_s']} | {result['tokens_per_s']} | {result['samples']} | {result['seconds']} | "
        f"{result['first_batch_s']} |\n"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()

"""Gated DeltaNet's chunked kernel under each of fla's backends on this card: fla's default dispatch (its Triton
kernels, the backward through its TileLang ones on Hopper where tilelang is installed) against FlashQLA (Qwen's
fused TileLang kernels, which fla dispatches to on Hopper when the `flash_qla` package is installed;
`FLA_FLASH_QLA=0` turns that off). Each run records the backends fla logged.

On the 3B hybrid's Gated DeltaNet shapes (batch 1, 16 heads, head size 128, bf16, q and k L2-normed in the kernel,
a state carried in and out), through `hybridize.mixers.ops.gated_delta_rule.gated_delta_rule(backend="fla")`, the
entry point every mixer calls, at `--lengths` tokens:
- `prefill`: forward without gradients (the static decoder's and the stream's prefill chunks);
- `train`: forward and backward (stage 1 and SFT).
Each backend's output, final state and gradients against the default's (relative RMS error). CUDA events
around each call, `--warmup` calls first (fla autotunes on the first), median of `--repeats`.

`--short-lengths`: the prefill of short inputs (a streamed frame is 258 tokens) under fla's default dispatch in
both of its forms, the chunked kernel and the fused recurrent one (one program per head and value slice, looping
over the tokens), with the recurrent's output and state against the chunked's: where the recurrent form stops
being faster is where `hybridize.mixers.ops.backends.choose_mode`'s "auto" should switch (64 tokens today). Each
form is timed eagerly and replayed from a CUDA graph (the stream's per-frame prefill is captured, so there the
launches cost nothing; `--no-graphs` leaves that out).

    python benchmarks/gdn_backends.py      # 8K and 64K tokens: ~1 minute, after fla's autotuning and FlashQLA's JIT
                                           # compilation (over 2 minutes on a fresh H100)
    python benchmarks/gdn_backends.py --lengths 8192 --short-lengths 16 64 128 258 516 1032
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from hybridize.inference.cuda_graphs import capture_cuda_graph
from hybridize.mixers.ops.gated_delta_rule import gated_delta_rule

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ is not a package
from common import default_output, median_ms, relative_rms, report_header, write_report  # noqa: E402

HEADS, HEAD_DIM = 16, 128
BACKENDS = {"fla_default": "0", "flash_qla": "1"}  # FLA_FLASH_QLA for each
NAMES = ("out", "state", "dq", "dk", "dv", "dg", "dbeta")  # what train_step returns; the prefill, the first 2


class Dispatched(logging.Handler):
    """The fla backends a call was dispatched to, from fla's "[FLA Backend] op.fn -> backend" log lines."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.seen: set[str] = set()

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "[FLA Backend]" in message and "rejected" not in message:
            self.seen.add(message.rsplit("-> ", 1)[-1].strip())


def inputs(length: int, device: torch.device, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape, dtype=torch.bfloat16):
        return torch.randn(*shape, generator=generator, device=device, dtype=dtype)

    shape = (1, length, HEADS, HEAD_DIM)
    return {
        "q": randn(*shape),
        "k": randn(*shape),
        "v": randn(*shape),
        "g": F.logsigmoid(randn(1, length, HEADS, dtype=torch.float32)) / 16,
        "beta": torch.sigmoid(randn(1, length, HEADS)),
        "initial_state": randn(1, HEADS, HEAD_DIM, HEAD_DIM, dtype=torch.float32) / HEAD_DIM,
    }


def call(tensors: dict[str, torch.Tensor], mode: str = "chunk") -> tuple[torch.Tensor, torch.Tensor]:
    return gated_delta_rule(**tensors, output_final_state=True, backend="fla", mode=mode)


def train_step(tensors: dict[str, torch.Tensor], grad_out: torch.Tensor) -> list[torch.Tensor]:
    leaves = {name: tensor.detach().requires_grad_() for name, tensor in tensors.items()}
    out, state = call(leaves)
    torch.autograd.backward((out, state), (grad_out, torch.zeros_like(state)))
    return [out.detach(), state.detach(), *(leaves[name].grad for name in ("q", "k", "v", "g", "beta"))]


def time_backend(tensors: dict, grad_out: torch.Tensor, args) -> tuple[dict, dict]:
    """The prefill's and the training step's outputs (for the comparison) and their times."""
    with torch.no_grad():
        prefill = list(call(tensors))
        prefill_ms = median_ms(lambda: call(tensors), args.warmup, args.repeats)
    train = train_step(tensors, grad_out)
    train_ms = median_ms(lambda: train_step(tensors, grad_out), args.warmup, args.repeats)
    length = tensors["q"].shape[1]
    return {"prefill": prefill, "train": train}, {
        "prefill_ms": prefill_ms,
        "prefill_tokens_per_s": length / prefill_ms * 1e3,
        "train_ms": train_ms,
        "train_tokens_per_s": length / train_ms * 1e3,
    }


def errors(reference: list[torch.Tensor], outputs: list[torch.Tensor]) -> dict[str, float]:
    """Each output's relative RMS error against the reference's, by name (`NAMES`, as many as were returned)."""
    return {
        name: relative_rms(expected, value)
        for name, value, expected in zip(NAMES, outputs, reference, strict=False)
    }


def measure(args, report: dict, device: torch.device, save) -> None:
    dispatched = Dispatched()
    logging.getLogger("fla").addHandler(dispatched)
    logging.getLogger("fla").setLevel(logging.INFO)
    routes = {}  # fla logs a dispatch once per process: at each backend's first length
    for length in args.lengths:
        tensors = inputs(length, device, args.seed)
        grad_out = torch.randn_like(tensors["v"])
        reference = {}
        for backend, flag in BACKENDS.items():
            if backend == "flash_qla" and importlib.util.find_spec("flash_qla") is None:
                report["runs"][backend] = "not installed (pip install flash-qla)"
                continue
            os.environ["FLA_FLASH_QLA"] = flag
            dispatched.seen.clear()
            outputs, result = time_backend(tensors, grad_out, args)
            routes.setdefault(backend, sorted(dispatched.seen) or ["fla's default (no backend logged)"])
            result["dispatched_to"] = routes[backend]
            if reference:
                for kind in ("prefill", "train"):
                    result[f"{kind}_error"] = errors(reference[kind], outputs[kind])
            else:
                reference = outputs
            report["runs"].setdefault(backend, {})[str(length)] = result
            print(f"{backend} at {length} tokens: {result}", flush=True)
            save()
        os.environ.pop("FLA_FLASH_QLA", None)
    for length in args.short_lengths:
        tensors = inputs(length, device, args.seed)
        results, reference = {}, None
        with torch.no_grad():
            for mode in ("chunk", "recurrent"):
                outputs = list(call(tensors, mode))
                ms = median_ms(lambda m=mode, t=tensors: call(t, m), args.warmup, args.repeats)
                results[mode] = {"prefill_ms": ms, "prefill_tokens_per_s": length / ms * 1e3}
                if args.graphs:
                    graph, _ = capture_cuda_graph(lambda m=mode, t=tensors: call(t, m))
                    results[mode]["graph_ms"] = median_ms(graph.replay, args.warmup, args.repeats)
                if reference is None:
                    reference = outputs
                else:
                    results[mode]["error"] = errors(reference, outputs)
        results["recurrent_over_chunk_time"] = (
            results["recurrent"]["prefill_ms"] / results["chunk"]["prefill_ms"]
        )
        if args.graphs:
            results["recurrent_over_chunk_graph_time"] = (
                results["recurrent"]["graph_ms"] / results["chunk"]["graph_ms"]
            )
        report["short_prefill"][str(length)] = results
        print(f"short prefill at {length} tokens: {results}", flush=True)
        save()


def markdown(report: dict) -> str:
    lines = [
        f"`{report['command']}`",
        "",
        f"{report['device']}, {report['date']}, "
        + ", ".join(f"{name} {version}" for name, version in report["versions"].items() if version),
        "",
        "| backend | tokens | dispatched to | prefill ms | prefill tokens/s | train ms | train tokens/s | "
        "worst relative RMS vs fla_default (prefill / train) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for backend, runs in report["runs"].items():
        if isinstance(runs, str):
            lines.append(f"| {backend} | | {runs} | | | | | |")
            continue
        for length, r in runs.items():
            errors = (
                f"{max(r['prefill_error'].values()):.2e} / {max(r['train_error'].values()):.2e}"
                if "train_error" in r
                else "(reference)"
            )
            lines.append(
                f"| {backend} | {length} | {', '.join(r['dispatched_to'])} | {r['prefill_ms']:.2f} | "
                f"{r['prefill_tokens_per_s']:,.0f} | {r['train_ms']:.2f} | {r['train_tokens_per_s']:,.0f} | "
                f"{errors} |"
            )
    if report.get("short_prefill"):
        lines += [
            "",
            "Short prefills under fla's default dispatch, chunked kernel against fused recurrent (no gradients):",
            "",
            "| tokens | chunk ms | recurrent ms | recurrent / chunk time | in a CUDA graph: chunk ms | recurrent ms | "
            "recurrent / chunk time | recurrent vs chunk, worst relative RMS |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for length, r in report["short_prefill"].items():
            graphed = (
                f"{r['chunk']['graph_ms']:.3f} | {r['recurrent']['graph_ms']:.3f} | "
                f"{r['recurrent_over_chunk_graph_time']:.2f}"
                if "recurrent_over_chunk_graph_time" in r
                else "not timed | | "
            )
            lines.append(
                f"| {length} | {r['chunk']['prefill_ms']:.3f} | {r['recurrent']['prefill_ms']:.3f} | "
                f"{r['recurrent_over_chunk_time']:.2f} | {graphed} | {max(r['recurrent']['error'].values()):.2e} |"
            )
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", nargs="*", type=int, default=[8192, 65536])
    parser.add_argument(
        "--short-lengths",
        nargs="*",
        type=int,
        default=[],
        help="also time short prefills, chunked against fused recurrent (e.g. 64 128 258 516)",
    )
    parser.add_argument(
        "--no-graphs",
        dest="graphs",
        action="store_false",
        help="time the short prefills eagerly only, not also replayed from a CUDA graph",
    )
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("gdn_backends.py times fla's CUDA kernels: run it on a GPU.")
    device = torch.device("cuda")
    out = args.out or default_output("gdn_backends", device, quick=False)
    report = {
        **report_header("gdn_backends", argv, device),
        "heads": HEADS,
        "head_dim": HEAD_DIM,
        "runs": {},
        "short_prefill": {},
    }

    def save() -> None:
        write_report(report, out, markdown)

    measure(args, report, device, save)
    save()
    print(markdown(report))


if __name__ == "__main__":
    main()

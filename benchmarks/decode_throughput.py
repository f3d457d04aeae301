"""Batched decode throughput: many sequences at once, the stock Qwen2.5-VL-3B against its InfiniteVL hybrid.

A linear hybrid's whole per-sequence state is fixed (~130 MiB for the 3B at window 8192: 9 windows of keys and
values and 27 fp32 Gated DeltaNet states) while the stock KV cache grows with the context (~1.2 GB at 32K, ~4.7 GB
at 128K), so at long context the hybrid fits many more sequences on one GPU. For every context (`--contexts`) and
batch size (`--batches`) both models decode one token per row per step, over their best static form:

- `stock_static_graph`: transformers' StaticCache of B rows (max length = context + the steps run), the decode
  forward captured in a CUDA graph (`decode_latency.stock_static_step`);
- `hybrid_static_graph`: `hybridize.inference.decode.StaticDecoder(fuse=True)` over a `StaticHybridCache` of B
  rows, its step a CUDA graph.

Every row holds `context` tokens (random cache contents, as in `decode_latency.py`: the step's cost depends on
the context only through buffer sizes and positions). Throughput = B tokens per step / the median step time
(`decode_latency.time_decode`); peak memory is `max_memory_allocated` over filling and timing. A batch that runs
out of memory is recorded as such and larger ones are skipped for that model and context. The summary gives each
model's best throughput per context and the hybrid's ratio to the stock model's best.

    python benchmarks/decode_throughput.py                     # H100: 4K, 32K, 128K x batch 1..256 (estimate ~6 min)
    python benchmarks/decode_throughput.py --config tiny --device cpu --contexts 32 --batches 1 2   # CPU smoke run
    python benchmarks/decode_throughput.py --plot-only benchmarks/results/decode_throughput_h100.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import hybridize  # noqa: F401  (registers the hybrid classes)
from hybridize.inference.decode import StaticDecoder
from hybridize.inference.static_cache import StaticHybridCache

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ is not a package
from common import free, is_oom, pyplot, run_benchmark  # noqa: E402
from decode_latency import (  # noqa: E402
    CONFIGS,
    Clock,
    build_model,
    fill_static_hybrid,
    hybrid_static_step,
    label,
    parse_tokens,
    peak_gib,
    random_ids,
    reset_peak,
    stock_static_step,
    time_decode,
)

MODELS = ("stock_static_graph", "hybrid_static_graph")
CONTEXTS = ("4K", "32K", "128K")
BATCHES = (1, 8, 32, 128, 256)


def measure(args, name: str, model, context: int, batch: int, device: torch.device) -> dict:
    """Tokens/s over all rows of one decode step of `batch` sequences at `context` tokens each."""
    generator = torch.Generator(device).manual_seed(args.seed)
    cuda_graph = device.type == "cuda"
    reset_peak(device)
    if name == "stock_static_graph":
        max_length = context + args.warmup + args.steps * args.repeats + 8
        step, held = stock_static_step(model, context, max_length, device, generator, cuda_graph, batch)
    else:
        cache = StaticHybridCache.for_model(model, batch, max_length=1)
        decoder = StaticDecoder(model, cache, cuda_graph=cuda_graph, fuse=True)
        decoder.prefill(random_ids(model, 16, device).expand(batch, -1))  # allocates the mixer states
        fill_static_hybrid(cache, context, generator)
        step, held = hybrid_static_step(decoder), decoder
    timing = time_decode(step, Clock(device), args.steps, args.repeats, args.warmup)
    result = {
        "ms_per_step": timing["ms_per_token"],
        "tokens_per_s": batch * 1e3 / timing["ms_per_token"],
        "steps": timing["steps"],
        "peak_gib": peak_gib(device),
    }
    del step, held
    return result


def run(args, report: dict, device: torch.device, dtype: torch.dtype, save) -> None:
    for (
        name
    ) in MODELS:  # each model gets half the time budget, so a slow stock sweep cannot starve the hybrid's
        deadline = time.perf_counter() + args.time_budget_s / len(MODELS)
        model = build_model(args.config, name.startswith("hybrid"), args.window, device, dtype, args.seed)
        for context in args.contexts:
            results = report["runs"].setdefault(name, {}).setdefault(label(context), {})
            out_of_memory = False
            for batch in args.batches:
                if out_of_memory or time.perf_counter() > deadline:
                    reason = "out of memory at a smaller batch" if out_of_memory else "time budget"
                    results[str(batch)] = {"skipped": reason}
                    continue
                try:
                    with torch.no_grad():
                        results[str(batch)] = measure(args, name, model, context, batch, device)
                except Exception as error:  # noqa: BLE001 - out of memory is a result; anything else is not
                    if not is_oom(error):
                        raise
                    out_of_memory, results[str(batch)] = True, {"oom": True}
                free()
                print(f"{name} {label(context)} batch {batch}: {results[str(batch)]}", flush=True)
                save()
        del model
        free()
    report["summary"] = summary(report)
    save()


def best(results: dict) -> tuple[int, float] | None:
    """The batch with the highest throughput among those measured, and that throughput."""
    measured = [(int(batch), r["tokens_per_s"]) for batch, r in results.items() if "tokens_per_s" in r]
    return max(measured, key=lambda pair: pair[1]) if measured else None


def summary(report: dict) -> dict:
    """Per context: each model's best throughput (and its batch), and the hybrid's over the stock model's."""
    out = {}
    for context in report["runs"].get(MODELS[0], {}):
        row = {}
        for name in MODELS:
            found = best(report["runs"].get(name, {}).get(context, {}))
            row[name] = {"batch": found[0], "tokens_per_s": found[1]} if found else None
        if all(row.values()):
            row["hybrid_over_stock"] = row[MODELS[1]]["tokens_per_s"] / row[MODELS[0]]["tokens_per_s"]
        out[context] = row
    return out


def markdown(report: dict) -> str:
    lines = [
        report["command"],
        f"{report['device']}, {report['date']}, {json.dumps(report['versions'])}",
        "",
        "| context | batch | stock tokens/s | stock peak GiB | hybrid tokens/s | hybrid peak GiB |",
        "|---|---|---|---|---|---|",
    ]

    def cell(result: dict | None, key: str, digits: int) -> str:
        if not result:
            return ""
        if key in result:
            return f"{result[key]:,.{digits}f}" if result[key] is not None else ""
        return "oom" if result.get("oom") else result.get("skipped", "")

    for context, by_batch in report["runs"].get(MODELS[1], {}).items():
        stock = report["runs"].get(MODELS[0], {}).get(context, {})
        for batch, hybrid in by_batch.items():
            lines.append(
                f"| {context} | {batch} | {cell(stock.get(batch), 'tokens_per_s', 0)} | "
                f"{cell(stock.get(batch), 'peak_gib', 1)} | {cell(hybrid, 'tokens_per_s', 0)} | "
                f"{cell(hybrid, 'peak_gib', 1)} |"
            )
    lines += [
        "",
        "| context | stock best (batch) | hybrid best (batch) | hybrid / stock |",
        "|---|---|---|---|",
    ]
    for context, row in report.get("summary", {}).items():
        parts = [
            f"{row[name]['tokens_per_s']:,.0f} ({row[name]['batch']})" if row.get(name) else ""
            for name in MODELS
        ]
        ratio = f"{row['hybrid_over_stock']:.1f}x" if "hybrid_over_stock" in row else ""
        lines.append(f"| {context} | {parts[0]} | {parts[1]} | {ratio} |")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> bool:
    """Tokens/s against batch size, one panel per context, both models."""
    plt = pyplot()
    if plt is None:
        return False
    contexts = list(report["runs"].get(MODELS[1], {}))
    figure, axes = plt.subplots(1, len(contexts), figsize=(4.5 * len(contexts), 4), squeeze=False)
    for axis, context in zip(axes[0], contexts, strict=True):
        for name, style in zip(MODELS, ("--s", "-o"), strict=True):
            points = sorted(
                (int(batch), result["tokens_per_s"])
                for batch, result in report["runs"].get(name, {}).get(context, {}).items()
                if "tokens_per_s" in result
            )
            if points:
                axis.plot(*zip(*points, strict=True), style, label=name)
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_title(f"{context} tokens per sequence")
        axis.set_xlabel("sequences decoded at once")
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=8)
    axes[0][0].set_ylabel("tokens/s (all rows)")
    figure.suptitle(f"Batched decode throughput, {report['device']}, {report['date']}")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=list(CONFIGS), default="3b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument(
        "--contexts", nargs="+", default=list(CONTEXTS), help="tokens per sequence (4K, 32K, ...)"
    )
    parser.add_argument(
        "--batches", nargs="+", type=int, default=list(BATCHES), help="sequences decoded at once"
    )
    parser.add_argument(
        "--window", type=int, default=None, help="the hybrid's window (default: the config's)"
    )
    parser.add_argument(
        "--steps", type=int, default=32, help="decode steps per timed run (fewer for slow steps)"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--time-budget-s",
        type=float,
        default=480.0,
        help="batches not started within half of it (each model gets half) are recorded as skipped",
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="JSON path (.md table and .png plot beside it)"
    )
    parser.add_argument(
        "--plot-only", type=Path, default=None, help="redraw the table and plot of a saved JSON"
    )
    args = parser.parse_args(argv)
    args.window = args.window or CONFIGS[args.config]["window"]
    args.contexts = [parse_tokens(context) for context in args.contexts]
    if any(batch < 1 for batch in args.batches):
        parser.error(f"--batches must be positive, got {args.batches}")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    timing = {"timing": {"steps": args.steps, "repeats": args.repeats, "warmup": args.warmup}, "runs": {}}
    run_benchmark("decode_throughput", args, argv, False, lambda device: timing, run, markdown, plot)


if __name__ == "__main__":
    main()

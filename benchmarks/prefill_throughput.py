"""Prefill throughput from 16K to 1M tokens: the stock Qwen2.5-VL-3B against its InfiniteVL hybrid, and the
hybrid's chunk size.

Both models are built as in `decode_latency.py` (random bf16 weights, SDPA). For every context (`--contexts`),
one prompt of random text tokens is prefilled (`decode_latency.time_prefill`: one untimed run, then the median of
`--repeats`; with `--warmup first` only each model's first run is preceded by an untimed one, since later contexts
run the same kernels, which halves the cost of a stock run of minutes):

- `stock`: one forward with transformers' DynamicCache (FlashAttention through SDPA), the head on the last token;
- `hybrid`: `hybridize.inference.decode.StaticDecoder.prefill` into a static hybrid cache, `--chunk` tokens per
  forward (sliding-window layers through flash attention with their window, Gated DeltaNet through fla's chunked
  kernel with the state carried between chunks): constant memory at any length.

The stock model runs until it cannot: out of memory, or a projected run longer than what is left of
`--time-budget-s` (its time grows about quadratically with the context: the previous context's seconds per forward
times the squared ratio, times the forwards the next point runs). Before the sweep the hybrid's chunk size is tuned at `--chunk-sweep-context`
(`--chunk-sweep` sizes; `--chunk` is the one the sweep then uses). Tokens/s, seconds and peak memory
(`max_memory_allocated`, weights included) per run; the summary gives the hybrid's ratio to the stock model per
context and how flat the hybrid's rate is (slowest over fastest context).

    python benchmarks/prefill_throughput.py                  # H100: 16K .. 1M, chunk sweep at 64K (~8 minutes)
    python benchmarks/prefill_throughput.py --config tiny --device cpu --contexts 64 128 --chunk-sweep 16 32 \
        --chunk-sweep-context 64 --chunk 32            # CPU smoke run
    python benchmarks/prefill_throughput.py --contexts 128K 512K --chunk-sweep --repeats 1 --warmup first \
        --time-budget-s 300                            # stock at 512K (87 s on an H100)
    python benchmarks/prefill_throughput.py --plot-only benchmarks/results/prefill_throughput_h100.json
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
from decode_latency import CONFIGS, build_model, label, parse_tokens, time_prefill  # noqa: E402

MODELS = ("stock", "hybrid")
CONTEXTS = ("16K", "64K", "128K", "512K", "1M")
CHUNK_SWEEP = (2048, 4096, 8192, 16384, 32768)


def prefill(args, model, context: int, device: torch.device, chunk: int | None, warm: bool = False) -> dict:
    """One context's prefill, stock (chunk None) or hybrid in chunks of `chunk` tokens; `warm`: the model has
    run a prefill already, so under `--warmup first` no untimed run comes first."""
    decoder = None
    if chunk is not None:
        cache = StaticHybridCache.for_model(model, 1, max_length=1)
        decoder = StaticDecoder(model, cache, cuda_graph=False)
    warmup = not (warm and args.warmup == "first")
    settings = argparse.Namespace(prefill_chunk=chunk, prefill_repeats=args.repeats, prefill_warmup=warmup)
    start = time.perf_counter()
    result = time_prefill(settings, model, context, device, decoder)
    result["wall_s"] = time.perf_counter() - start
    result["untimed_first"] = warmup
    return result


def attempt(args, model, context: int, device: torch.device, chunk: int | None, warm: bool = False) -> dict:
    """`prefill`'s result, or {"oom": True} when it runs out of memory."""
    try:
        with torch.no_grad():
            return prefill(args, model, context, device, chunk, warm)
    except Exception as error:  # noqa: BLE001 - out of memory is a result; anything else is not
        if not is_oom(error):
            raise
        return {"oom": True}
    finally:
        free()


def run(args, report: dict, device: torch.device, dtype: torch.dtype, save) -> None:
    deadline = time.perf_counter() + args.time_budget_s
    hybrid = build_model(args.config, True, args.window, device, dtype, args.seed)
    warm = False  # whether the hybrid has prefilled in `--chunk` chunks already
    for chunk in args.chunk_sweep:
        result = attempt(args, hybrid, args.chunk_sweep_context, device, chunk)
        warm = warm or (chunk == args.chunk and "tokens_per_s" in result)
        report["chunk_sweep"][str(chunk)] = result
        print(f"hybrid chunk {chunk} at {label(args.chunk_sweep_context)}: {result}", flush=True)
        save()
    for context in args.contexts:
        result = attempt(args, hybrid, context, device, args.chunk, warm)
        warm = warm or "tokens_per_s" in result
        report["runs"]["hybrid"][label(context)] = result
        print(f"hybrid {label(context)}: {result}", flush=True)
        save()
    del hybrid
    free()
    stock = build_model(args.config, False, args.window, device, dtype, args.seed)
    previous: tuple[int, float] | None = None  # (context, wall seconds per forward) of the last stock run
    stopped = None
    for context in args.contexts:
        projected = None if previous is None else projected_seconds(args, previous, context)
        if stopped is None and projected is not None and time.perf_counter() + projected > deadline:
            stopped = f"skipped (projected {projected:.0f} s, past the time budget)"
        if stopped is not None:
            result = {"skipped": stopped}
        else:
            result = attempt(args, stock, context, device, None, warm=previous is not None)
            if result.get("oom"):
                stopped = "skipped (out of memory at a shorter context)"
            else:
                previous = (context, result["wall_s"] / forwards(args, result["untimed_first"]))
        report["runs"]["stock"][label(context)] = result
        print(f"stock {label(context)}: {result}", flush=True)
        save()
    del stock
    free()
    report["summary"] = summary(report)
    save()


def forwards(args, untimed_first: bool) -> int:
    """How many forwards one point runs: `--repeats` timed, after an untimed one when `untimed_first`."""
    return args.repeats + int(untimed_first)


def projected_seconds(args, previous: tuple[int, float], context: int) -> float:
    """The stock model's next point: the last point's seconds per forward, grown with the squared context ratio,
    times the forwards the point runs (no untimed one under `--warmup first`, the model being warm)."""
    last_context, seconds_per_forward = previous
    return seconds_per_forward * (context / last_context) ** 2 * forwards(args, args.warmup == "each")


def summary(report: dict) -> dict:
    """The hybrid's tokens/s over the stock model's per context, and the hybrid's slowest over fastest rate."""
    hybrid, stock = report["runs"]["hybrid"], report["runs"]["stock"]
    ratios = {
        context: hybrid[context]["tokens_per_s"] / stock[context]["tokens_per_s"]
        for context in hybrid
        if "tokens_per_s" in hybrid[context] and "tokens_per_s" in stock.get(context, {})
    }
    rates = [result["tokens_per_s"] for result in hybrid.values() if "tokens_per_s" in result]
    sweep = {
        int(chunk): r["tokens_per_s"] for chunk, r in report["chunk_sweep"].items() if "tokens_per_s" in r
    }
    return {
        "hybrid_over_stock": ratios,
        "hybrid_flatness": min(rates) / max(rates) if rates else None,
        "best_chunk": max(sweep, key=sweep.get) if sweep else None,
    }


def cell(result: dict | None, key: str, digits: int) -> str:
    if not result:
        return ""
    if key in result:
        return f"{result[key]:,.{digits}f}" if result[key] is not None else ""
    return "oom" if result.get("oom") else result.get("skipped", "")


def markdown(report: dict) -> str:
    lines = [
        report["command"],
        f"{report['device']}, {report['date']}, {json.dumps(report['versions'])}",
        "",
        f"Hybrid chunk size at {label(report['chunk_sweep_context'])} tokens:",
        "",
        "| chunk | tokens/s | peak GiB |",
        "|---|---|---|",
    ]
    for chunk, result in report["chunk_sweep"].items():
        lines.append(f"| {chunk} | {cell(result, 'tokens_per_s', 0)} | {cell(result, 'peak_gib', 1)} |")
    lines += [
        "",
        f"Prefill, the hybrid in chunks of {report['chunk']}:",
        "",
        "| context | stock tokens/s | stock peak GiB | hybrid tokens/s | hybrid peak GiB | hybrid / stock |",
        "|---|---|---|---|---|---|",
    ]
    ratios = report.get("summary", {}).get("hybrid_over_stock", {})
    for context, hybrid in report["runs"]["hybrid"].items():
        stock = report["runs"]["stock"].get(context)
        ratio = f"{ratios[context]:.2f}x" if context in ratios else ""
        lines.append(
            f"| {context} | {cell(stock, 'tokens_per_s', 0)} | {cell(stock, 'peak_gib', 1)} | "
            f"{cell(hybrid, 'tokens_per_s', 0)} | {cell(hybrid, 'peak_gib', 1)} | {ratio} |"
        )
    flatness = report.get("summary", {}).get("hybrid_flatness")
    if flatness is not None:
        lines += ["", f"The hybrid's slowest context runs at {flatness:.1%} of its fastest."]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> bool:
    """Tokens/s and peak memory against the context, both models."""
    plt = pyplot()
    if plt is None:
        return False
    figure, (speed, memory) = plt.subplots(1, 2, figsize=(10, 4))
    for name, style in zip(MODELS, ("--s", "-o"), strict=True):
        points = sorted(
            (parse_tokens(context), result)
            for context, result in report["runs"][name].items()
            if "tokens_per_s" in result
        )
        if points:
            contexts = [context for context, _ in points]
            speed.plot(contexts, [r["tokens_per_s"] for _, r in points], style, label=name)
            if all(r.get("peak_gib") is not None for _, r in points):
                memory.plot(contexts, [r["peak_gib"] for _, r in points], style, label=name)
    for axis, title in ((speed, "prefill tokens/s"), (memory, "peak memory (GiB)")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("prompt tokens")
        axis.set_title(title)
        axis.grid(True, which="both", alpha=0.3)
        if axis.lines:
            axis.legend(fontsize=8)
    figure.suptitle(f"Prefill, {report['device']}, {report['date']}")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=list(CONFIGS), default="3b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--contexts", nargs="+", default=list(CONTEXTS), help="prompt tokens (16K, 1M, ...)")
    parser.add_argument("--chunk", type=int, default=8192, help="the hybrid's prefill chunk (tokens)")
    parser.add_argument(
        "--chunk-sweep", nargs="*", type=int, default=list(CHUNK_SWEEP), help="chunk sizes to try first"
    )
    parser.add_argument(
        "--chunk-sweep-context", default="64K", help="the prompt the chunk sizes are tried on"
    )
    parser.add_argument(
        "--window", type=int, default=None, help="the hybrid's window (default: the config's)"
    )
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per point (after one untimed)")
    parser.add_argument(
        "--warmup",
        choices=("each", "first"),
        default="each",
        help="an untimed run before every point, or only before each model's first",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--time-budget-s", type=float, default=480.0, help="stock runs projected past it are skipped"
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
    args.chunk_sweep_context = parse_tokens(args.chunk_sweep_context)
    if args.chunk < 1 or any(chunk < 1 for chunk in args.chunk_sweep) or args.repeats < 1:
        parser.error("--chunk, --chunk-sweep and --repeats must be positive")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    fields = {
        "chunk": args.chunk,
        "chunk_sweep_context": args.chunk_sweep_context,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "chunk_sweep": {},
        "runs": {name: {} for name in MODELS},
    }
    run_benchmark("prefill_throughput", args, argv, False, lambda device: fields, run, markdown, plot)


if __name__ == "__main__":
    main()

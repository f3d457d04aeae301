"""What `hybridize select` costs on the Qwen2.5-VL-3B architecture (random weights: cost only, the scores mean
nothing), per method at its defaults.

Each method's run splits into the alignment of the all-linear student (stage 1a, `align_steps` steps) and the
scoring of each layer. The script runs the alignment at the method's default steps (or `--align-steps`, then
scaled to the default linearly) and scores `--layers` layers (for `kl`, also the all-linear baseline run, each
with the default stage 1b steps), then extrapolates over the layers, whose costs are alike:

    total = alignment + (layers [+ 1 baseline for kl]) * time per scored layer

Batches are random token ids (batch 1, `--length` tokens: longer than the window, as selection requires).

    python benchmarks/select_cost.py                                              # H100: ~6 minutes (estimate)
    python benchmarks/select_cost.py --config tiny --device cpu --length 96 --window 64 --align-steps 1 --train-steps 1 --eval-batches 1
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import free, report_header, run_setup, write_report  # noqa: E402
from train_stages import build_teacher, model_config, random_token_batches, token_limit  # noqa: E402

from hybridize.selection import SelectionSettings, get_method  # noqa: E402
from hybridize.selection.select import SelectionRun  # noqa: E402


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_method(method: str, teacher, batches, args, device) -> dict:
    defaults = get_method(method).defaults
    settings = SelectionSettings(
        method=method, budget=1, window=args.window, eval_batches=args.eval_batches,
        align_steps=args.align_steps if args.align_steps is not None and defaults["align_steps"] else None,
        train_steps=args.train_steps if args.train_steps is not None and defaults["train_steps"] else None,
    )  # fmt: skip
    run = SelectionRun(teacher, batches, settings, progress=False)
    synchronize(device)
    started = time.perf_counter()
    run.aligned_mixers()
    synchronize(device)
    align_seconds = time.perf_counter() - started
    layers = list(range(args.layers))
    started = time.perf_counter()
    scored = list(get_method(method)().score(run, [], layers))
    synchronize(device)
    score_seconds = time.perf_counter() - started
    result = {
        "method": method,
        "defaults": defaults,
        "timed": {
            "align_steps": settings.align_steps,
            "align_seconds": round(align_seconds, 2),
            "train_steps": settings.train_steps,
            "layers": len(layers),
            "score_seconds": round(score_seconds, 2),
        },  # fmt: skip
        "tokens_timed": run.record["tokens"],
        "peak_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 1)
        if device.type == "cuda"
        else None,
        "scores": {str(idx): value for idx, value in scored},
    }
    result.update(extrapolate(result, run.num_layers))
    del run
    free()
    return result


def extrapolate(item: dict, num_layers: int) -> dict:
    """Seconds per scored layer and for all layers at the method's defaults, from the timed parts. `mse` measures
    every layer's residuals in one pass, so its scoring time is the same for one layer or all; `kl` trains one
    run per layer plus the all-linear baseline."""
    timed, defaults, method = item["timed"], item["defaults"], item["method"]
    align = timed["align_seconds"] / max(timed["align_steps"], 1) * defaults["align_steps"]
    if method == "mse":
        return {"seconds_per_layer": round(timed["score_seconds"] / num_layers, 2),
                "total_seconds_all_layers": round(align + timed["score_seconds"], 1)}  # fmt: skip
    runs = timed["layers"] + (method == "kl")
    per_layer = timed["score_seconds"] / runs
    return {"seconds_per_layer": round(per_layer, 2),
            "total_seconds_all_layers": round(align + per_layer * (num_layers + (method == "kl")), 1)}  # fmt: skip


def markdown(report: dict) -> str:
    rows = [
        f"# hybridize select: cost on {report['config']} ({report['device']}, {report['date']})",
        "",
        f"`{report['command']}`; {report['num_layers']} layers, {report['length']} tokens per batch, window "
        f"{report['window']}, {report['eval_batches']} held-out batches. Extrapolated from the timed steps and "
        "layers (see the script's docstring). The first method's alignment includes fla's first-call autotuning "
        "(mse and nll run the same 50 alignment steps).",
        "",
        "| method | defaults (align / train steps) | timed | s per layer | total, all layers |",
        "|---|---|---|---|---|",
    ]
    for item in report["methods"]:
        item = {**item, **extrapolate(item, report["num_layers"])}
        timed = item["timed"]
        rows.append(
            f"| {item['method']} | {item['defaults']['align_steps']} / {item['defaults']['train_steps']} | "
            f"align {timed['align_steps']} steps {timed['align_seconds']} s; {timed['layers']} layers at {timed['train_steps']} train steps "
            f"{timed['score_seconds']} s | {item['seconds_per_layer']} | {item['total_seconds_all_layers'] / 60:.1f} min |"
        )
    return "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="3b", choices=("3b", "tiny"))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--length", type=int, default=8448, help="tokens per batch (more than the window)")
    parser.add_argument("--window", type=int, default=8192)
    parser.add_argument("--methods", default="mse,nll,kl")
    parser.add_argument(
        "--align-steps", type=int, default=None, help="alignment steps (default: the method's)"
    )
    parser.add_argument(
        "--train-steps", type=int, default=None, help="kl: stage 1b steps per run (default: the method's)"
    )
    parser.add_argument("--layers", type=int, default=1, help="layers scored and timed")
    parser.add_argument("--eval-batches", type=int, default=8, help="held-out batches (the CLI's default)")
    parser.add_argument("--out", default=None)
    parser.add_argument(
        "--redraw", type=Path, default=None, help="rewrite a saved report's table (and totals)"
    )
    args = parser.parse_args(argv)
    timed = ("mse", "nll", "kl")  # uniform computes nothing
    if not set(args.methods.split(",")) <= set(timed):
        parser.error(f"--methods takes a comma-separated subset of {','.join(timed)}, got {args.methods!r}")
    if args.redraw:
        report = json.loads(args.redraw.read_text())
        for item in report["methods"]:
            item.update(extrapolate(item, report["num_layers"]))
        write_report(report, args.redraw, markdown)
        return
    device, dtype, out = run_setup(args, "select_cost", args.config == "tiny")
    config = model_config(args.config, 36 if args.config == "3b" else 8)
    teacher = build_teacher(config, device, dtype, seed=0)
    count = args.eval_batches + 100  # enough distinct training batches for every method's defaults
    batches = random_token_batches(count, 1, args.length, token_limit(config), seed=1)
    report = {
        **report_header("select_cost", argv, device),
        "config": "Qwen2.5-VL-3B architecture" if args.config == "3b" else "tiny Qwen2.5-VL",
        "num_layers": config.text_config.num_hidden_layers,
        "length": args.length, "window": args.window, "eval_batches": args.eval_batches, "methods": [],
    }  # fmt: skip
    for method in args.methods.split(","):
        report["methods"].append(time_method(method, teacher, batches, args, device))
        print(json.dumps(report["methods"][-1]), flush=True)
        write_report(report, out, markdown)
    print(markdown(report))


if __name__ == "__main__":
    main()

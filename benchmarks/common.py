"""What the GPU benchmark scripts share: the report header (command, device, versions, date), results paths,
redrawing a report's table and plot, out-of-memory handling and profiles of a step."""

from __future__ import annotations

import datetime
import gc
import json
import platform
import re
import shlex
import statistics
import sys
from importlib import metadata
from pathlib import Path

import torch

import hybridize
from hybridize.mixers.ops.backends import fla_available

RESULTS = Path(__file__).resolve().parent / "results"
PACKAGES = ("torch", "transformers", "flash-linear-attention", "fla-core", "triton")


def versions() -> dict:
    found = {"hybridize": hybridize.__version__}
    for package in PACKAGES:
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = None
    return found


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"


def default_output(script: str, device: torch.device, quick: bool) -> Path:
    """benchmarks/results/<script>_<h100|h200|device type>[_quick].json"""
    name = device_name(device)
    tag = "h100" if "H100" in name else "h200" if "H200" in name else device.type
    return RESULTS / f"{script}_{tag}{'_quick' if quick else ''}.json"


def require_fla(device: torch.device, cpu_hint: bool = True) -> None:
    """Stop a CUDA run without fla's kernels: its hybrid would run the PyTorch references, not what a user of
    `hybridize[cuda]` runs, and its numbers would be labelled as the kernels'."""
    if device.type == "cuda" and not fla_available():
        raise SystemExit(
            "fla kernels are not available here: run on a CUDA machine with `pip install 'hybridize[cuda]'`"
            + (", or pass --device cpu." if cpu_hint else ".")
        )


def relative_rms(reference: torch.Tensor, value: torch.Tensor, dtype: torch.dtype = torch.float32) -> float:
    """RMS(reference - value) / RMS(reference), computed in `dtype` (float64 for a comparison with float64)."""
    reference, value = reference.to(dtype), value.to(dtype)
    return ((reference - value).pow(2).mean().sqrt() / reference.pow(2).mean().sqrt().clamp_min(1e-12)).item()


def run_setup(args, script: str, quick: bool = False) -> tuple[torch.device, torch.dtype, Path]:
    """The device `args.device` names (CUDA only with fla's kernels), the dtype the models run in there (bf16 on
    CUDA, fp32 elsewhere), and the report's path (`args.out`, else the default for the script and card)."""
    device = torch.device(args.device)
    require_fla(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return device, dtype, Path(args.out) if args.out else default_output(script, device, quick)


def report_header(script: str, argv: list[str] | None, device: torch.device) -> dict:
    """How a result was made: the command that reproduces it, the device, the software versions and the date."""
    return {
        "command": f"python benchmarks/{script}.py " + shlex.join(sys.argv[1:] if argv is None else argv),
        "device": device_name(device),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "versions": versions(),
    }


def write_report(report: dict, out: Path, markdown) -> None:
    """The report as JSON at `out` and its `markdown(report)` table beside it (rewritten after every run, so a
    call cut short keeps what finished)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(report))


def redraw(report_path: Path, markdown, plot) -> None:
    """Rewrite a saved report's markdown table and PNG plot beside it (`--plot-only`)."""
    report = json.loads(report_path.read_text())
    report_path.with_suffix(".md").write_text(markdown(report))
    plot(report, report_path.with_suffix(".png"))


def run_benchmark(script: str, args, argv, quick: bool, fields, measure, markdown, plot) -> None:
    """What the `main()` of a benchmark with `--plot-only` does. With `--plot-only JSON`: redraw that report's
    table and plot. Else: build the report (how it was made, `args.config`, `args.window`, the dtype, then the
    script's own `fields(device)`), run `measure(args, report, device, dtype, save)`, where `save()` rewrites the
    JSON and its table, and write the plot beside them."""
    if args.plot_only is not None:
        redraw(args.plot_only, markdown, plot)
        return
    device, dtype, out = run_setup(args, script, quick)
    report = {
        **report_header(script, argv, device),
        "config": args.config,
        "window": args.window,
        "dtype": str(dtype),
        **fields(device),
    }

    def save() -> None:
        write_report(report, out, markdown)

    measure(args, report, device, dtype, save)
    save()
    plot(report, out.with_suffix(".png"))
    print(markdown(report))
    print(f"Wrote {out} and the .md and .png beside it", flush=True)


def pyplot():
    """matplotlib's pyplot on the Agg backend, or None (and a note) where matplotlib is not installed: the plot is
    then left out, and `--plot-only JSON` draws it later where it is."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (rerun with --plot-only JSON where it is)", flush=True)
        return None
    return plt


def median_ms(fn, warmup: int = 10, repeats: int = 100) -> float:
    """The median of `repeats` CUDA-event timings of `fn()` in milliseconds, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def top_operators(profiler, count: int = 25) -> list[dict]:
    """The `count` operators of a profiled step that took the most device time of their own (CPU time where
    nothing ran on a device): name, calls and milliseconds, for finding where a step's time goes."""
    events = profiler.key_averages()
    device = any(event.self_device_time_total for event in events)

    def own_us(event) -> float:
        return event.self_device_time_total if device else event.self_cpu_time_total

    ranked = sorted(events, key=own_us, reverse=True)[:count]
    return [
        {"operator": event.key[:120], "calls": event.count, "self_ms": round(own_us(event) / 1e3, 3)}
        for event in ranked
    ]


# Device work of a profiled step by kind, matched in this order on kernel names: fla's (and Mamba's) scans,
# attention, cuBLAS/CUTLASS products, torch.compile's fused kernels, PyTorch's own (eager) kernels, copies.
KERNEL_KINDS = (
    ("linear_attention", r"delta_rule|gla_|chunk_|recurrent|ssd|mamba"),
    ("attention", r"flash|attn|attention|sdpa|softmax"),
    ("matmul", r"gemm|gemv|cutlass|xmma|splitk|cublas|nvjet"),  # nvjet: cuBLASLt's Hopper kernels
    ("fused_pointwise", r"^triton_"),
    ("eager_pointwise", r"at::native|elementwise|reduce_kernel"),
    ("copy", r"memcpy|memset"),
)


def kernel_kind(name: str) -> str:
    lowered = name.lower()
    return next((kind for kind, pattern in KERNEL_KINDS if re.search(pattern, lowered)), "other")


def kernel_ms_by_kind_text(profile: dict) -> str:
    """A `profile_steps` result's milliseconds by kind as "kind ms, ..." (empty where no kernel ran)."""
    return ", ".join(f"{kind} {ms:.2f}" for kind, ms in profile["kernel_ms_by_kind"].items())


def profile_steps(step, steps: int = 8, count: int = 15) -> dict:
    """`steps` runs of `step` under torch.profiler: device kernels per step (every launch, CUDA-graph replays
    included), their milliseconds per step in total and by `kernel_kind`, and the `count` costliest kernels."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as profiler:
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize()
    kernels = [event for event in profiler.events() if event.device_type == DeviceType.CUDA]
    by_kind: dict[str, float] = {}
    for event in kernels:
        kind = kernel_kind(event.name)
        by_kind[kind] = by_kind.get(kind, 0.0) + event.time_range.elapsed_us() / 1e3 / steps
    return {
        "steps": steps,
        "kernels_per_step": len(kernels) / steps,
        "kernel_ms_per_step": sum(by_kind.values()),
        "kernel_ms_by_kind": {
            kind: round(ms, 4) for kind, ms in sorted(by_kind.items(), key=lambda kv: -kv[1])
        },
        "top": top_operators(profiler, count),
    }

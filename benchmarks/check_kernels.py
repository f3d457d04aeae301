"""GPU check: every fast kernel path against hybridize's PyTorch references, forward and backward, bf16.

Run on a CUDA machine with the `cuda` extra installed:
    python benchmarks/check_kernels.py --out benchmarks/results/kernel_check.json

Each comparison is RMS(ref - x) / RMS(ref), the metric of fla's own tests, with fla's tolerances:
0.005 chunk forward, 0.002 recurrent forward, 0.008 for the projected inputs' gradients, 0.02 for the gates'.
The reference runs in fp32 on the same bf16 inputs. Ops: the gated delta rule, GLA (fla chunk_gla /
fused_recurrent_gla) and Mamba-2's SSD (through fla's simple GLA). Also compares each whole mixer
(gated_deltanet, mamba2, gla at Qwen2.5-VL-3B sizes) on both backends and times one layer at 8192 tokens.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
import warnings
from importlib.util import find_spec
from pathlib import Path

import torch
import torch.nn.functional as F

import hybridize  # noqa: F401  (registers every mixer)
from hybridize.mixers.ops.gated_delta_rule import gated_delta_rule
from hybridize.mixers.ops.gla import gla
from hybridize.mixers.ops.ssd import ssd
from hybridize.mixers.registry import build_mixer
from hybridize.presets import QWEN2_5_VL_3B_ATTENTION

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ is not a package
from common import median_ms, relative_rms, require_fla  # noqa: E402

# fla's tolerances (RMS(ref - x) / RMS(ref)) by quantity: forward, final state, and gradients of the
# projected inputs (q, k, v, x, B, C) and of the gates (g, beta, gk, dt, A).
FORWARD, RECURRENT, STATE, INPUT_GRAD, GATE_GRAD = 0.005, 0.002, 0.005, 0.008, 0.02


def random_tensors(shapes: dict, device, seed=0) -> dict:
    """name -> (shape, dtype, transform) -> tensor, drawn from one seeded generator."""
    generator = torch.Generator(device=device).manual_seed(seed)
    return {
        name: transform(torch.randn(*shape, generator=generator, device=device)).to(dtype)
        for name, (shape, dtype, transform) in shapes.items()
    }


def identity(x):
    return x


def gated_delta_rule_case(length, device):
    B, H, K, V, bf16, fp32 = 1, 16, 128, 256, torch.bfloat16, torch.float32
    inputs = random_tensors(
        {
            "q": ((B, length, H, K), bf16, identity),
            "k": ((B, length, H, K), bf16, identity),
            "v": ((B, length, H, V), bf16, identity),
            "g": ((B, length, H), fp32, lambda x: F.logsigmoid(x) * 0.1),
            "beta": ((B, length, H), bf16, torch.sigmoid),
            "initial": ((B, H, K, V), fp32, lambda x: x * 0.1),
        },
        device,
    )

    def call(t, backend, mode):
        return gated_delta_rule(
            t["q"],
            t["k"],
            t["v"],
            t["g"],
            t["beta"],
            initial_state=t["initial"],
            output_final_state=True,
            backend=backend,
            mode=mode,
        )

    grads = {"q": INPUT_GRAD, "k": INPUT_GRAD, "v": INPUT_GRAD, "g": GATE_GRAD, "beta": GATE_GRAD}
    return inputs, call, grads


def gla_case(length, device):
    B, H, K, V, bf16, fp32 = 1, 16, 128, 128, torch.bfloat16, torch.float32
    inputs = random_tensors(
        {
            "q": ((B, length, H, K), bf16, identity),
            "k": ((B, length, H, K), bf16, identity),
            "v": ((B, length, H, V), bf16, identity),
            "gk": ((B, length, H, K), fp32, lambda x: F.logsigmoid(x) / 16),
            "initial": ((B, H, K, V), fp32, lambda x: x * 0.1),
        },
        device,
    )

    def call(t, backend, mode):
        return gla(
            t["q"],
            t["k"],
            t["v"],
            t["gk"],
            initial_state=t["initial"],
            output_final_state=True,
            backend=backend,
            mode=mode,
        )

    grads = {"q": INPUT_GRAD, "k": INPUT_GRAD, "v": INPUT_GRAD, "gk": GATE_GRAD}
    return inputs, call, grads


def ssd_case(length, device):
    B, H, P, G, N, bf16, fp32 = 1, 16, 128, 16, 128, torch.bfloat16, torch.float32
    inputs = random_tensors(
        {
            "x": ((B, length, H, P), bf16, identity),
            "dt": ((B, length, H), fp32, lambda x: F.softplus(x - 4)),
            "A": ((H,), fp32, lambda x: -torch.exp(x.clamp(-2, 2))),
            "Bm": ((B, length, G, N), bf16, lambda x: x * N**-0.5),
            "Cm": ((B, length, G, N), bf16, lambda x: x * N**-0.5),
            "D": ((H,), fp32, identity),
            "initial": ((B, H, N, P), fp32, lambda x: x * 0.1),
        },
        device,
    )

    def call(t, backend, mode):
        return ssd(
            t["x"],
            t["dt"],
            t["A"],
            t["Bm"],
            t["Cm"],
            D=t["D"],
            initial_state=t["initial"],
            output_final_state=True,
            backend=backend,
            mode=mode,
        )

    grads = {"x": INPUT_GRAD, "Bm": INPUT_GRAD, "Cm": INPUT_GRAD, "dt": GATE_GRAD, "A": GATE_GRAD}
    return inputs, call, grads


OPS = {"gated_delta_rule": gated_delta_rule_case, "gla": gla_case, "ssd": ssd_case}
MIXERS = ("gated_deltanet", "mamba2", "gla")


def run_op(call, inputs, grad_names, backend, mode, with_grad):
    tensors = {n: x.detach().clone().requires_grad_(with_grad and n in grad_names) for n, x in inputs.items()}
    out, state = call(tensors, backend, mode)
    grads = {}
    if with_grad:
        # The cotangent is built contiguous from the logical shape: randn_like would copy out's strides, and the
        # torch reference returns a transposed (non-contiguous) view, so both backends would get different ones.
        generator = torch.Generator(device=out.device).manual_seed(1)
        cotangent = torch.randn(tuple(out.shape), generator=generator, device=out.device, dtype=torch.float32)
        (out.float() * cotangent).sum().backward()
        grads = {f"d{name}": tensors[name].grad for name in grad_names}
    return out, state, grads


def check_op(name, length, device, backend="fla") -> dict:
    """The op's fast path against its torch reference on the same bf16 inputs: chunked forward + backward
    at `length`, recurrent forward on the first 64 tokens. Each entry: rel_rms, tolerance, ok."""
    inputs, call, grad_tolerances = OPS[name](length, device)
    ref_out, ref_state, ref_grads = run_op(call, inputs, grad_tolerances, "torch", "chunk", True)
    out, state, grads = run_op(call, inputs, grad_tolerances, backend, "chunk", True)
    errors = {"o": (relative_rms(ref_out, out), FORWARD), "state": (relative_rms(ref_state, state), STATE)}
    errors.update({g: (relative_rms(ref_grads[g], grads[g]), grad_tolerances[g[1:]]) for g in ref_grads})
    short = {n: x[:, :64] if x.dim() > 2 and x.shape[1] == length else x for n, x in inputs.items()}
    with torch.no_grad():
        ref_short, _, _ = run_op(call, short, grad_tolerances, "torch", "recurrent", False)
        fast_short, _, _ = run_op(call, short, grad_tolerances, backend, "recurrent", False)
    errors["o_recurrent"] = (relative_rms(ref_short, fast_short), RECURRENT)
    return {k: {"rel_rms": e, "tolerance": tol, "ok": e <= tol} for k, (e, tol) in errors.items()}


def check_mixer(name, length, device) -> dict:
    """A whole mixer at InfiniteVL sizes on both backends (same weights), bf16, forward + backward."""
    outputs = {}
    x = torch.randn(2, length, 2048, device=device, dtype=torch.bfloat16)
    for backend in ("torch", "fla"):
        torch.manual_seed(0)
        mixer = build_mixer(name, {"backend": backend}, QWEN2_5_VL_3B_ATTENTION, 1).to(device, torch.bfloat16)
        out, _ = mixer(x)
        out.float().pow(2).mean().backward()
        outputs[backend] = (out, {n: p.grad for n, p in mixer.named_parameters()})
    ref_out, ref_grads = outputs["torch"]
    out, grads = outputs["fla"]
    return {
        "output": relative_rms(ref_out, out),
        "worst_param_grad": max(relative_rms(ref_grads[n], grads[n]) for n in ref_grads),
    }


def time_layer(name, length, device) -> dict:
    mixer = build_mixer(name, {"backend": "fla"}, QWEN2_5_VL_3B_ATTENTION, 1).to(device, torch.bfloat16)
    x = torch.randn(1, length, 2048, device=device, dtype=torch.bfloat16, requires_grad=True)
    with torch.no_grad():
        forward = median_ms(lambda: mixer(x), warmup=3, repeats=20)
    backward = median_ms(lambda: mixer(x)[0].sum().backward(), warmup=3, repeats=20)
    return {"tokens": length, "forward_ms": forward, "forward_backward_ms": backward}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--ops", nargs="*", default=list(OPS), choices=list(OPS))
    parser.add_argument("--mixers", nargs="*", default=list(MIXERS), choices=list(MIXERS))
    args = parser.parse_args()
    device = torch.device("cuda")
    require_fla(device, cpu_hint=False)
    section_seconds, ops, mixers, timing = {}, {}, {}, {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for op in args.ops:
            start = time.perf_counter()
            ops[op] = check_op(op, args.length, device)
            section_seconds[f"op:{op}"] = round(time.perf_counter() - start, 2)
            print(op, section_seconds[f"op:{op}"], "s", json.dumps(ops[op]), flush=True)
        for name in args.mixers:
            start = time.perf_counter()
            mixers[name] = check_mixer(name, args.length, device)
            timing[name] = time_layer(name, 8192, device)
            section_seconds[f"mixer:{name}"] = round(time.perf_counter() - start, 2)
            print(name, section_seconds[f"mixer:{name}"], "s", mixers[name], timing[name], flush=True)
    seen = sorted({f"{w.category.__name__}: {w.message}" for w in caught})
    for line in seen:
        print("warning:", line, flush=True)
    report = {
        "date": datetime.date.today().isoformat(),
        "command": "python benchmarks/check_kernels.py " + " ".join(sys.argv[1:]),
        "device": torch.cuda.get_device_name(),
        "versions": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "triton": __import__("triton").__version__,
            "fla": __import__("fla").__version__,
            "tilelang": getattr(__import__("tilelang"), "__version__", "?")
            if find_spec("tilelang")
            else None,
        },
        "length": args.length,
        "ops_fla_vs_torch_bf16": ops,
        "mixers_fla_vs_torch_bf16": mixers,
        "layer_timing_bf16": timing,
        "all_ok": all(entry["ok"] for op in ops.values() for entry in op.values()),
        "section_seconds": section_seconds,
        "warnings": seen,
    }
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    failed = [
        f"{op}.{name}" for op, entries in ops.items() for name, item in entries.items() if not item["ok"]
    ]
    if failed:
        raise SystemExit(f"fla differs from the reference beyond fla's tolerances in: {failed}")


if __name__ == "__main__":
    main()

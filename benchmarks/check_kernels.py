"""GPU check: fla's Gated DeltaNet kernels against hybridize's PyTorch reference, forward and backward, bf16.

Run on a CUDA machine with the `cuda` extra installed:
    python benchmarks/check_kernels.py --out benchmarks/results/kernel_check.json

Each comparison is RMS(ref - x) / RMS(ref), the metric of fla's own tests, with fla's tolerances:
0.005 chunk forward, 0.002 recurrent forward, 0.008 dq/dk/dv, 0.02 dbeta/dg. The reference runs in fp32
on the same bf16 inputs. Also compares a whole Gated DeltaNet mixer (InfiniteVL sizes) on both backends.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time
import warnings
from pathlib import Path

import torch

from hybridize.mixers.ops.backends import fla_available
from hybridize.mixers.ops.gated_delta_rule import gated_delta_rule
from hybridize.mixers.registry import build_mixer
from hybridize.presets import QWEN2_5_VL_3B_ATTENTION

TOLERANCE = {
    "o": 0.005,
    "o_recurrent": 0.002,
    "state": 0.005,
    "dq": 0.008,
    "dk": 0.008,
    "dv": 0.008,
    "dg": 0.02,
    "dbeta": 0.02,
}


def relative_rms(reference: torch.Tensor, value: torch.Tensor) -> float:
    reference, value = reference.float(), value.float()
    return ((reference - value).pow(2).mean().sqrt() / reference.pow(2).mean().sqrt().clamp_min(1e-12)).item()


def random_inputs(batch, length, heads, key_dim, value_dim, device, dtype=torch.bfloat16, seed=0):
    generator = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator, device=device)

    q = randn(batch, length, heads, key_dim).to(dtype)
    k = randn(batch, length, heads, key_dim).to(dtype)
    v = randn(batch, length, heads, value_dim).to(dtype)
    g = torch.nn.functional.logsigmoid(randn(batch, length, heads)).float() * 0.1  # log decay in (-inf, 0)
    beta = randn(batch, length, heads).sigmoid().to(dtype)
    initial = randn(batch, heads, key_dim, value_dim).float() * 0.1
    return q, k, v, g, beta, initial


def run_rule(backend, mode, inputs, with_grad):
    q, k, v, g, beta, initial = (x.detach().clone().requires_grad_(with_grad) for x in inputs)
    out, state = gated_delta_rule(
        q,
        k,
        v,
        g,
        beta,
        initial_state=initial,
        output_final_state=True,
        use_qk_l2norm=True,
        backend=backend,
        mode=mode,
    )
    grads = {}
    if with_grad:
        # The cotangent is built contiguous from the logical shape: randn_like would copy out's strides, and the
        # torch reference returns a transposed (non-contiguous) view, so both backends would get different ones.
        generator = torch.Generator(device=out.device).manual_seed(1)
        cotangent = torch.randn(tuple(out.shape), generator=generator, device=out.device, dtype=torch.float32)
        (out.float() * cotangent).sum().backward()
        grads = {"dq": q.grad, "dk": k.grad, "dv": v.grad, "dg": g.grad, "dbeta": beta.grad}
    return out, state, grads


def check_rule(length, device) -> dict:
    inputs = random_inputs(1, length, 16, 128, 256, device)
    ref_out, ref_state, ref_grads = run_rule("torch", "chunk", inputs, True)
    out, state, grads = run_rule("fla", "chunk", inputs, True)
    errors = {"o": relative_rms(ref_out, out), "state": relative_rms(ref_state, state)}
    errors.update({name: relative_rms(ref_grads[name], grads[name]) for name in ref_grads})
    short = tuple(x[:, :64] if x.dim() > 2 and x.shape[1] == length else x for x in inputs)
    with torch.no_grad():
        ref_short, _, _ = run_rule("torch", "recurrent", short, False)
        fla_short, _, _ = run_rule("fla", "recurrent", short, False)
    errors["o_recurrent"] = relative_rms(ref_short, fla_short)
    return errors


def check_mixer(length, device) -> dict:
    torch.manual_seed(0)
    mixers = {}
    for backend in ("torch", "fla"):
        torch.manual_seed(0)
        mixers[backend] = build_mixer("gated_deltanet", {"backend": backend}, QWEN2_5_VL_3B_ATTENTION, 1).to(
            device, torch.bfloat16
        )
    x = torch.randn(2, length, 2048, device=device, dtype=torch.bfloat16)
    results = {}
    outputs = {}
    for backend, mixer in mixers.items():
        out, _ = mixer(x)
        out.float().pow(2).mean().backward()
        outputs[backend] = (out, {n: p.grad for n, p in mixer.named_parameters()})
    ref_out, ref_grads = outputs["torch"]
    out, grads = outputs["fla"]
    results["output"] = relative_rms(ref_out, out)
    results["worst_param_grad"] = max(relative_rms(ref_grads[n], grads[n]) for n in ref_grads)
    return results


def time_layer(length, device) -> dict:
    mixer = build_mixer("gated_deltanet", {"backend": "fla"}, QWEN2_5_VL_3B_ATTENTION, 1).to(
        device, torch.bfloat16
    )
    x = torch.randn(1, length, 2048, device=device, dtype=torch.bfloat16, requires_grad=True)

    def measure(fn, repeats=20):
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        return sorted(times)[len(times) // 2]

    with torch.no_grad():
        forward = measure(lambda: mixer(x))
    backward = measure(lambda: mixer(x)[0].sum().backward())
    return {"tokens": length, "forward_ms": forward, "forward_backward_ms": backward}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if not fla_available():
        raise SystemExit(
            "fla kernels are not available here: run on a CUDA machine with `pip install 'hybridize[cuda]'`."
        )
    device = torch.device("cuda")
    section_seconds = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for name, fn, length in (
            ("gated_delta_rule", check_rule, args.length),
            ("mixer", check_mixer, args.length),
            ("timing", time_layer, 8192),
        ):
            start = time.perf_counter()
            result = fn(length, device)
            torch.cuda.synchronize()
            section_seconds[name] = round(time.perf_counter() - start, 2)
            if name == "gated_delta_rule":
                rule = result
            elif name == "mixer":
                mixer = result
            else:
                timing = result
    seen = sorted({f"{w.category.__name__}: {w.message}" for w in caught})
    for line in seen:
        print("warning:", line, flush=True)
    report = {
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name(),
        "versions": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "triton": __import__("triton").__version__,
            "fla": __import__("fla").__version__,
        },
        "length": args.length,
        "gated_delta_rule": {
            name: {"rel_rms": value, "tolerance": TOLERANCE[name], "ok": value <= TOLERANCE[name]}
            for name, value in rule.items()
        },
        "gated_deltanet_mixer_bf16": mixer,
        "layer_timing_bf16": timing,
        "section_seconds": section_seconds,
        "warnings": seen,
    }
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    failed = [name for name, item in report["gated_delta_rule"].items() if not item["ok"]]
    if failed:
        raise SystemExit(f"fla differs from the reference beyond fla's tolerances in: {failed}")


if __name__ == "__main__":
    main()

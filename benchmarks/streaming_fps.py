"""Streaming video FPS and memory over thousands of frames: the InfiniteVL hybrid against the stock Qwen2.5-VL-3B.

Both models are built from `hybridize.presets.qwen2_5_vl_3b_config()` with random bf16 weights (speed does not
depend on their values), SDPA attention; the hybrid is the ratio-1/4 plan (SWA window 8192 at layers 0, 4, ...,
32, Gated DeltaNet elsewhere). Frames are random 448x448 RGB images (a pool of 8, pinned host memory) fed one at
a time to `hybridize.inference.streaming.StreamingSession`: per frame, pixels go to the GPU, the ViT encodes
them (1024 patches -> 256 tokens) and the frame's 258 tokens (with <|vision_start|>/<|vision_end|>) are
prefilled into the cache. The ViT is included in every number.

- `hybrid`: the session as shipped: the frame encoder replayed from a CUDA graph from the first frame, the
  per-frame prefill from graphs captured at the second (one while the sliding window fills, one once it is
  full); constant memory.
- `stock`: the same session on the stock model (`allow_growing_cache=True`): the encoder graph, an eager
  prefill appending to a DynamicCache whose keys grow with every frame; it runs until it is out of memory, or
  `--stock-frames` / `--stock-seconds` is reached (the hybrid stops at `--hybrid-seconds`, a guard for slow
  runs).

Per frame: latency between CUDA events around `add_frame` (the GPU time of the frame, launch gaps included;
no synchronisation between frames, so the host may queue the next frame while the GPU works; with CUDA graphs
a frame's ViT runs on a second stream beside the previous frame's prefill, as `StreamingSession` does by default,
and the events then measure the time between two frames' ends; `hybrid_one_stream` runs both on one) and the peaks of
`torch.cuda.max_memory_allocated` (tensors, weights included) and `max_memory_reserved` (what the allocator
holds from the device, CUDA graph pools included: a graph's replay allocates nothing, so only this one shows
its memory) during the frame. Per window of frames (10-100, then
every `--window-frames`, and the last): median and p90 latency, FPS as 1000 / median ms and as frames over wall
time (synchronised at the window's ends), and the window's peak memory. After the stream the hybrid answers one
question (`--ask-tokens` greedy tokens on a branch of the state), timed.

    python benchmarks/streaming_fps.py              # H100: 2,000 hybrid frames + stock up to 600 (~6 min, estimate)
    python benchmarks/streaming_fps.py --quick      # 300 hybrid frames, stock up to 150 (~2 min, estimate)
    python benchmarks/streaming_fps.py --config tiny --device cpu --frames 30 --frame-size 56   # CPU smoke run
    python benchmarks/streaming_fps.py --plot-only benchmarks/results/streaming_fps_h100.json
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import Qwen2_5_VLForConditionalGeneration

from hybridize.compat import output_cache
from hybridize.converters import build_hybrid_config, hybrid_model_class, plan_layers
from hybridize.converters.discovery import layer_specs
from hybridize.inference.cuda_graphs import COMPILE_MODES
from hybridize.inference.streaming import StreamingSession
from hybridize.mixers.ops import backends
from hybridize.presets import (
    VISION_TOKEN_IDS,
    qwen2_5_vl_3b_config,
    tiny_qwen2_5_vl_config,
    tiny_qwen2_5_vl_processor,
)
from hybridize.testing import held_states

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ is not a package
from common import (  # noqa: E402
    free,
    is_oom,
    kernel_ms_by_kind_text,
    profile_steps,
    pyplot,
    relative_rms,
    run_benchmark,
)

VARIANTS = ("hybrid", "hybrid_one_stream", "stock")
TARGET_FPS = 60.0
POOL = 8  # distinct random frames, cycled
QUESTION = "What happened in the video so far?"


def model_config(name: str):
    """The 3B architecture (or the tiny one) with the vision token ids of the embedded byte-level tokenizer, so
    that its processor renders the frames' tokens (the ids' values do not change the speed)."""
    if name == "tiny":
        return tiny_qwen2_5_vl_config()
    config = qwen2_5_vl_3b_config()
    for key, value in VISION_TOKEN_IDS.items():
        setattr(config, key, value)
    return config


def build_model(name: str, hybrid: bool, window: int, device: torch.device, dtype: torch.dtype):
    """The stock model or its ratio-1/4 hybrid, built on the device with random weights."""
    config = model_config(name)
    model_class = Qwen2_5_VLForConditionalGeneration
    if hybrid:
        layers = config.get_text_config(decoder=True).num_hidden_layers
        config = build_hybrid_config(config, plan_layers(layers, "1/4", window=window), layer_specs(config))
        model_class = hybrid_model_class(model_class)
    torch.manual_seed(0)
    with torch.device(device):
        model = model_class._from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


def frame_pool(size: int, device: torch.device) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    frames = [
        torch.randint(0, 256, (size, size, 3), dtype=torch.uint8, generator=generator) for _ in range(POOL)
    ]
    return [frame.pin_memory() for frame in frames] if device.type == "cuda" else frames


def windows(count: int, every: int) -> list[tuple[int, int]]:
    """Frame ranges summarised: 10-100, then every `every` frames, and the last `every` (or fewer) frames."""
    bounds = [(10, min(100, count))] if count > 10 else [(0, count)]
    start = 100
    while start + every <= count:
        bounds.append((start, start + every))
        start += every
    last = (max(count - every, 0), count)
    if count > 100 and last not in bounds:
        bounds.append(last)
    return [b for b in bounds if b[1] > b[0]]


def summarise(
    latency_ms: list[float], peak: list[float | None], reserved: list[float | None], wall: dict, bounds
) -> list[dict]:
    rows = []
    for start, end in bounds:
        chunk = sorted(latency_ms[start:end])
        median = statistics.median(chunk)
        row = {
            "frames": [start, end],
            "median_ms": median,
            "p90_ms": chunk[min(len(chunk) - 1, int(0.9 * len(chunk)))],
            "fps": 1000.0 / median,
        }
        if (start, end) in wall:
            row["fps_wall"] = (end - start) / wall[(start, end)]
        for key, values in (("peak_gib", peak), ("reserved_gib", reserved)):
            known = [p for p in values[start:end] if p is not None]
            row[key] = max(known) if known else None
        rows.append(row)
    return rows


def stream(args, session: StreamingSession, device: torch.device, frames: int, seconds: float | None) -> dict:
    """Feed `frames` frames (fewer when out of memory or past `seconds`); per-frame latency and peak memory."""
    cuda = device.type == "cuda"
    pool = frame_pool(args.frame_size, device)
    bounds = windows(frames, args.window_frames)
    edges = {edge for bound in bounds for edge in bound}
    timings, peaks, reserved, stamps = [], [], [], {}
    stop, graph_from, began = "frames", None, time.perf_counter()
    for index in range(frames):
        if index in edges:
            if cuda:
                torch.cuda.synchronize(device)
            stamps[index] = time.perf_counter()
            earlier = [edge for edge in stamps if edge < index]
            if earlier and index >= 100:
                since = max(earlier)
                fps = (index - since) / (stamps[index] - stamps[since])
                print(f"  frame {index}: {fps:.1f} frames/s over frames {since}-{index}", flush=True)
        if seconds is not None and time.perf_counter() - began > seconds:
            stop = "time budget"
            break
        try:
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                session.add_frame(pool[index % POOL])
                end.record()
                timings.append((start, end))
                peaks.append(torch.cuda.max_memory_allocated(device) / 2**30)
                reserved.append(torch.cuda.max_memory_reserved(device) / 2**30)
            else:
                start = time.perf_counter()
                session.add_frame(pool[index % POOL])
                timings.append(time.perf_counter() - start)
                peaks.append(None)
                reserved.append(None)
        except RuntimeError as error:  # torch.OutOfMemoryError is a RuntimeError
            if not is_oom(error):
                raise
            stop = "out of memory"
            break
        if graph_from is None and session.prefill_graph is not None:
            graph_from = index
    if cuda:
        torch.cuda.synchronize(device)
    count = len(peaks)
    stamps[count] = time.perf_counter()
    latency = [s.elapsed_time(e) for s, e in timings] if cuda else [1000.0 * t for t in timings]
    done = windows(count, args.window_frames)
    wall = {(a, b): stamps[b] - stamps[a] for a, b in done if a in stamps and b in stamps}
    return {
        "frames": count,
        "stopped_by": stop,
        "tokens_per_frame": session.tokens_per_frame,
        "tokens": session.state.cache.get_seq_length(),
        "prefill_graph_from_frame": graph_from,
        "state_mib": session.cache_bytes() / 2**20,
        "windows": summarise(latency, peaks, reserved, wall, done),
        "latency_ms": latency,
        "peak_gib": peaks,
        "reserved_gib": reserved,
    }


def profile_frames(args, session: StreamingSession, device: torch.device) -> dict:
    """`--profile` more frames profiled whole, then their vision encoding alone (`common.profile_steps`: kernels
    per frame and their milliseconds by kind): what a frame costs in the ViT and what in the prefill."""
    pool = frame_pool(args.frame_size, device)
    frames = itertools.cycle(pool)

    @torch.inference_mode()  # as in add_frame: the captured encoder's input buffer is an inference tensor
    def encode():
        session.encoder(pool[0])

    return {
        "frame": profile_steps(lambda: session.add_frame(next(frames)), args.profile),
        "vision": profile_steps(encode, args.profile),
    }


def time_ask(args, session: StreamingSession, device: torch.device) -> dict:
    """Seconds for one question (`--ask-tokens` greedy tokens), the first time (the decode step's warm-up and
    capture included) and again."""
    result = {}
    for name in ("first_s", "again_s"):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        tokens = session.ask_ids(QUESTION, max_new_tokens=args.ask_tokens)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        result[name] = time.perf_counter() - start
    return {"tokens": len(tokens), **result, "static_decode": session.static_decode}


def matmul_flops_per_s(device: torch.device) -> float:
    """The bf16 matrix-product rate measured here (8192^3, median of 10 between CUDA events)."""
    a, b = (torch.randn(8192, 8192, dtype=torch.bfloat16, device=device) for _ in range(2))
    for _ in range(3):
        a @ b
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return 2 * 8192**3 / statistics.median(times)


def weight_flops_per_frame(model, session: StreamingSession) -> float:
    """Multiply-adds of the weight matrices one frame runs through, x2: the ViT's over its patches, the text
    decoder's over the frame's tokens (attention over the context comes on top: a few percent at window 8192)."""
    patches = (session.frame_size[0] // session.encoder.patch) * (
        session.frame_size[1] // session.encoder.patch
    )
    vision = sum(p.numel() for p in model.model.visual.parameters() if p.dim() > 1)
    decoder = sum(p.numel() for p in model.get_decoder().layers.parameters() if p.dim() > 1)
    return 2.0 * (vision * patches + decoder * session.tokens_per_frame)


def targets(result: dict) -> dict:
    """InfiniteVL's streaming targets, checked on the first (10-100) and the last window."""
    first, last = result["windows"][0], result["windows"][-1]
    checks = {
        "fps_first": first["fps"],
        "fps_last": last["fps"],
        "fps_at_least_60": min(first["fps"], last["fps"]) >= TARGET_FPS,
        "latency_last_over_first": last["median_ms"] / first["median_ms"],
    }
    if first["peak_gib"] and last["peak_gib"]:
        checks["peak_memory_last_over_first"] = last["peak_gib"] / first["peak_gib"]
        checks["peak_memory_flat_within_1pct"] = abs(last["peak_gib"] / first["peak_gib"] - 1) <= 0.01
    for key in ("peak_gib", "reserved_gib"):  # every frame from 10 on, not only the windows' peaks
        known = [p for p in result.get(key, [])[10:] if p is not None]
        if known:
            checks[f"{key}_from_frame_10_max_over_min"] = max(known) / min(known)
            checks[f"{key}_from_frame_10_flat_within_1pct"] = max(known) / min(known) <= 1.01
    return checks


def new_session(
    args, model, device: torch.device, hybrid: bool, compile: bool | None = None, overlap: bool | None = None
) -> StreamingSession:
    return StreamingSession(
        model,
        tiny_qwen2_5_vl_processor(),
        frame_size=args.frame_size,
        cuda_graphs=device.type == "cuda" and not args.no_cuda_graphs,
        allow_growing_cache=not hybrid,
        fuse=True,
        compile=args.compile if compile is None else compile,
        overlap_encoder=overlap,
    )


# Largest relative RMS error of the streamed logits and states against the one-pass forward. bf16 through 36
# random-weight layers measured 0.07 (logits) to 0.14 (recurrent state) on an H100 (results/streaming_fps_h100.json);
# a state lost or misplaced between frames gives ~1.
ONE_SHOT_TOLERANCE = 0.2


@torch.no_grad()
def check_one_shot(args, model, device: torch.device, overlap: bool | None = None) -> dict:
    """The stream's state after `--check-frames` frames (fed one at a time, CUDA graphs and all) against the
    model's own forward over the same tokens in one pass (its own ViT, get_rope_index positions and cache):
    relative RMS error of the next-token logits and of each kind of cache tensor (worst layer). Beside it, the
    precision's own scale: that forward against the same in a wider dtype (float32 for a bf16 model, float64 for
    float32). Without torch.compile: compiled vision blocks would also run (and recompile for) the one-shot
    forward. `overlap`: the session's overlap_encoder (False for `hybrid_one_stream`)."""
    session = new_session(args, model, device, hybrid=True, compile=False, overlap=overlap)
    frames = [frame_pool(args.frame_size, device)[i % POOL] for i in range(args.check_frames)]
    for frame in frames:
        session.add_frame(frame)
    prompt, encoder = session.prompt, session.encoder
    ids = torch.tensor(prompt.prefix_ids + prompt.frame_ids.tolist() * len(frames), device=device)[None]
    pixel_values = torch.cat([encoder.patches(encoder.prepare(frame)) for frame in frames])
    inputs = {
        "input_ids": ids,
        "pixel_values": pixel_values,
        "image_grid_thw": encoder.grid_thw.repeat(len(frames), 1),
        "mm_token_type_ids": (ids == model.config.image_token_id).long(),
        "use_cache": True,
        "logits_to_keep": 1,
    }
    out = model(**inputs)
    logits = out.logits[:, -1].float()
    result = {
        "frames": len(frames),
        "tokens": ids.shape[1],
        "prefill_graph": session.prefill_graph is not None,
        "logits_rel_rms": relative_rms(logits, session.next_token_logits(), torch.float64),
        "same_argmax": bool(logits.argmax() == session.next_token_logits().argmax()),
        "state_rel_rms": worst_state_errors(session.state.cache, output_cache(out)),
    }
    del session
    free()
    # The scale of the model's own rounding: the same one-pass forward in a wider dtype (a copy of the weights,
    # cast up exactly), against the one above. Streamed errors near these are the precision's, not the stream's.
    wider = torch.float64 if model.dtype == torch.float32 else torch.float32
    precise_model = copy.deepcopy(model).to(wider)
    precise = precise_model(**inputs)
    result["precision_scale"] = {
        "dtype": str(wider).removeprefix("torch."),
        "logits_rel_rms": relative_rms(precise.logits[:, -1], logits, torch.float64),
        "state_rel_rms": worst_state_errors(output_cache(out), output_cache(precise)),
    }
    del out, precise, precise_model
    free()
    return result


def worst_state_errors(cache, reference_cache) -> dict[str, float]:
    """Relative RMS error of each kind of cache tensor against the reference cache's, worst layer."""
    errors: dict[str, float] = {}
    for (key, mine), (_, reference) in zip(held_states(cache), held_states(reference_cache), strict=True):
        errors[key] = max(errors.get(key, 0.0), relative_rms(reference, mine, torch.float64))
    return errors


def check_key(variant: str) -> str:
    """Where the report keeps a hybrid variant's one-shot check ("one_shot_check" for `hybrid`, as before)."""
    return "one_shot_check" if variant == "hybrid" else f"one_shot_check_{variant}"


def run_variant(args, report: dict, variant: str, device: torch.device, dtype: torch.dtype, save) -> None:
    hybrid, overlap = variant != "stock", False if variant == "hybrid_one_stream" else None
    print(f"building the {variant} model ...", flush=True)
    model = build_model(args.config, hybrid, args.window, device, dtype)
    if hybrid and args.check_frames:
        print(f"checking {args.check_frames} streamed frames against one forward over them ...", flush=True)
        check = check_one_shot(args, model, device, overlap)
        report[check_key(variant)] = check
        save()
        print(json.dumps(check), flush=True)
        worst = max(check["logits_rel_rms"], *check["state_rel_rms"].values())
        if worst > ONE_SHOT_TOLERANCE:
            raise SystemExit(
                f"The streamed state differs from one forward over the same frames by {worst:.3f} (relative RMS), "
                f"more than bf16 rounding explains ({ONE_SHOT_TOLERANCE}): a streaming bug (the report holds the errors by tensor kind)."
            )
    session = new_session(args, model, device, hybrid, overlap=overlap)
    frames = args.frames if hybrid else min(args.frames, args.stock_frames)
    print(f"streaming {frames} frames into the {variant} model ...", flush=True)
    result = stream(args, session, device, frames, args.hybrid_seconds if hybrid else args.stock_seconds)
    result["overlap_encoder"] = session.overlap is not None
    if args.profile and result["stopped_by"] != "out of memory":
        result["profile"] = profile_frames(args, session, device)
    if hybrid:
        result["ask"] = time_ask(args, session, device)
    result["weight_tflop_per_frame"] = weight_flops_per_frame(model, session) / 1e12
    if report.get("matmul_tflops"):
        result["floor_ms"] = 1000 * result["weight_tflop_per_frame"] / report["matmul_tflops"]
    result["targets"] = targets(result) if result["windows"] else {}
    report["variants"][variant] = result
    save()
    print(markdown_variant(variant, result), flush=True)
    del session, model
    free()


def markdown_variant(variant: str, result: dict) -> str:
    lines = [
        f"### {variant}: {result['frames']} frames ({result['tokens_per_frame']} tokens each, "
        f"{result['tokens']} tokens in all), stopped by {result['stopped_by']}; state {result['state_mib']:.1f} MiB"
        + ("; ViT on a second stream" if result.get("overlap_encoder") else "")
        + (
            f"; prefill graph from frame {result['prefill_graph_from_frame']}"
            if result["prefill_graph_from_frame"]
            else ""
        ),
        "",
        "| frames | median ms | p90 ms | FPS (1000/median) | FPS (wall) | peak GiB | reserved GiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in result["windows"]:
        wall = f"{row['fps_wall']:.1f}" if "fps_wall" in row else ""
        peak, held = (
            f"{row[key]:.3f}" if row.get(key) is not None else "" for key in ("peak_gib", "reserved_gib")
        )
        lines.append(
            f"| {row['frames'][0]}-{row['frames'][1]} | {row['median_ms']:.2f} | {row['p90_ms']:.2f} | "
            f"{row['fps']:.1f} | {wall} | {peak} | {held} |"
        )
    floor = (
        f"; floor (weight matmuls at the measured bf16 rate) {result['floor_ms']:.2f} ms"
        if "floor_ms" in result
        else ""
    )
    lines += ["", f"{result['weight_tflop_per_frame']:.3f} TFLOP of weight matmuls per frame{floor}"]
    if "profile" in result:
        lines.append("")
        for part, profile in result["profile"].items():
            kinds = kernel_ms_by_kind_text(profile)
            lines.append(
                f"profile, {part} (per frame): {profile['kernels_per_step']:.0f} kernels, "
                f"{profile['kernel_ms_per_step']:.2f} ms ({kinds or 'no device kernels'})"
            )
    if "ask" in result:
        ask = result["ask"]
        lines += [
            "",
            f"ask ({'static cache, graph decode' if ask['static_decode'] else 'dynamic branch'}): "
            f"{ask['tokens']} tokens in {ask['first_s']:.2f} s the first time, {ask['again_s']:.2f} s again",
        ]
    if result.get("targets"):
        lines += [
            "",
            "targets: "
            + ", ".join(
                f"{k} = {v:.3f}" if isinstance(v, float) else f"{k} = {v}"
                for k, v in result["targets"].items()
            ),
        ]
    return "\n".join(lines)


def precision_text(scale: dict | None) -> str:
    """The one-shot check's precision scale in words (reports from before it have none)."""
    if not scale:
        return ""
    states = ", ".join(f"{key} {error:.2e}" for key, error in scale["state_rel_rms"].items())
    return (
        f" The one forward itself against the same in {scale['dtype']} (the scale of the model's own rounding): "
        f"logits {scale['logits_rel_rms']:.2e}; {states}."
    )


def markdown(report: dict) -> str:
    head = f"{report['command']}\n\n{report['device']}, {report['date']}, " + ", ".join(
        f"{name} {version}" for name, version in report["versions"].items() if version
    )
    if report.get("matmul_tflops"):
        head += f"; measured bf16 matmul rate {report['matmul_tflops']:.0f} TFLOP/s"
    checks = []
    # in the report's run order; a variant stopped between its check and its stream still shows its check, and a
    # report written under other variant names (`--plot-only` of an older one) shows its own
    for variant in dict.fromkeys([*report["variants"], *VARIANTS]):
        check = report.get(check_key(variant))
        if check:
            states = ", ".join(f"{key} {error:.2e}" for key, error in check["state_rel_rms"].items())
            checks.append(
                f"One-shot check ({variant}): {check['frames']} frames streamed one at a time (prefill graph "
                f"used: {check['prefill_graph']}) against one forward over the same {check['tokens']} tokens, "
                f"relative RMS error: logits {check['logits_rel_rms']:.2e} (same argmax: "
                f"{check['same_argmax']}); worst layer per state: {states}."
                + precision_text(check.get("precision_scale"))
            )
    sections = [markdown_variant(variant, result) for variant, result in report["variants"].items()]
    return "\n\n".join([head, *checks, *sections]) + "\n"


def plot(report: dict, path: Path) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    figure, (latency, memory) = plt.subplots(1, 2, figsize=(12, 4.5))
    for variant, result in report["variants"].items():
        frames = range(result["frames"])
        latency.plot(frames, result["latency_ms"], linewidth=0.6, label=variant)
        if all(p is not None for p in result["peak_gib"]):
            line = memory.plot(frames, result["peak_gib"], linewidth=0.8, label=f"{variant} allocated")[0]
            if all(p is not None for p in result.get("reserved_gib", [None])):
                memory.plot(
                    frames,
                    result["reserved_gib"],
                    linewidth=0.8,
                    linestyle="--",
                    color=line.get_color(),
                    label=f"{variant} reserved",
                )
    latency.axhline(1000 / TARGET_FPS, color="grey", linestyle="--", linewidth=0.8, label="60 FPS")
    for axis, ylabel in (
        (latency, "ms per frame (ViT + prefill)"),
        (memory, "peak memory during the frame (GiB): allocated, reserved"),
    ):
        axis.set_xlabel("frame")
        axis.set_ylabel(ylabel)
        axis.grid(True, alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend()
    latency.set_yscale("log")
    figure.suptitle(
        f"Streaming {report['frame_size']}x{report['frame_size']} frames, "
        f"{'Qwen2.5-VL-3B' if report['config'] == '3b' else 'tiny Qwen2.5-VL'} vs its InfiniteVL hybrid, "
        f"{report['device']}"
    )
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    return True


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", choices=("3b", "tiny"), default="3b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=VARIANTS,
        default=["hybrid", "stock"],
        help="hybrid: the hybrid's session as StreamingSession builds it (with CUDA graphs, each frame's ViT on a "
        "second CUDA stream beside the previous frame's prefill); hybrid_one_stream: the same with "
        "overlap_encoder=False",
    )
    parser.add_argument("--frames", type=int, default=2000, help="frames streamed into the hybrid")
    parser.add_argument(
        "--stock-frames", type=int, default=600, help="at most this many into the stock model"
    )
    parser.add_argument("--stock-seconds", type=float, default=150.0, help="and for at most this long")
    parser.add_argument(
        "--hybrid-seconds", type=float, default=240.0, help="stop the hybrid's stream after this long"
    )
    parser.add_argument("--frame-size", type=int, default=448)
    parser.add_argument(
        "--window", type=int, default=None, help="SWA window (default: 8192 on 3b, 64 on tiny)"
    )
    parser.add_argument("--window-frames", type=int, default=100, help="frames per summarised window")
    parser.add_argument("--ask-tokens", type=int, default=16)
    parser.add_argument(
        "--check-frames",
        type=int,
        default=None,
        help="frames streamed and checked against one forward over them first (default: 40 on 3b, past the "
        "window and the prefill graph's capture; 12 on tiny; 0 skips)",
    )
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="FRAMES",
        help="after the stream, profile FRAMES more frames and their vision encoding alone (kernels by kind)",
    )
    parser.add_argument("--no-cuda-graphs", action="store_true")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the ViT blocks (both models) and the hybrid's captured per-frame prefill",
    )
    parser.add_argument(
        "--compile-mode",
        choices=COMPILE_MODES,
        default=None,
        help="torch.compile's mode for --compile (implies it)",
    )
    parser.add_argument(
        "--recurrent-max-tokens",
        type=int,
        default=None,
        help="fla's fused recurrent kernel for inputs up to this many tokens, chunked above (default: "
        f"hybridize's, {backends.FLA_RECURRENT_MAX_TOKENS}; a frame is 258 tokens at 448x448)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="300 hybrid frames (90 s at most), stock up to 150 / 60 s"
    )
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--plot-only", type=Path, default=None, help="redraw table and plot from a JSON result"
    )
    args = parser.parse_args(argv)
    args.compile = args.compile_mode or args.compile
    if "hybrid_one_stream" in args.variants and (args.no_cuda_graphs or not args.device.startswith("cuda")):
        parser.error(
            "hybrid_one_stream is hybrid without its second CUDA stream: without CUDA graphs, hybrid already runs "
            "on one; pass a CUDA --device"
        )
    if args.recurrent_max_tokens is not None:
        if args.recurrent_max_tokens < 1:
            parser.error("--recurrent-max-tokens must be at least 1")
        backends.FLA_RECURRENT_MAX_TOKENS = args.recurrent_max_tokens  # for this process's every scan
    if args.quick:
        args.frames, args.stock_frames, args.stock_seconds, args.hybrid_seconds = 300, 150, 60.0, 90.0
    args.window = args.window or (8192 if args.config == "3b" else 64)
    if args.check_frames is None:
        args.check_frames = 40 if args.config == "3b" else 12
    return args


def run(args, report: dict, device: torch.device, dtype: torch.dtype, save) -> None:
    for variant in args.variants:
        run_variant(args, report, variant, device, dtype, save)


def main(argv=None) -> None:
    args = parse_args(argv)

    def fields(device: torch.device) -> dict:
        return {
            "frame_size": args.frame_size,
            "cuda_graphs": device.type == "cuda" and not args.no_cuda_graphs,
            "compile": args.compile,
            "fla_recurrent_max_tokens": backends.FLA_RECURRENT_MAX_TOKENS,
            "matmul_tflops": matmul_flops_per_s(device) / 1e12 if device.type == "cuda" else None,
            "variants": {},
        }

    run_benchmark("streaming_fps", args, argv, args.quick, fields, run, markdown, plot)


if __name__ == "__main__":
    main()

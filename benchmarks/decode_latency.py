"""Decode latency and memory at long context: the stock Qwen2.5-VL-3B against its InfiniteVL hybrid.

Both models are built from `hybridize.presets.qwen2_5_vl_3b_config()` with random bf16 weights (speed does not
depend on their values), SDPA attention; the hybrid is the ratio-1/4 plan (SWA window 8192 at layers 0, 4,
..., 32, Gated DeltaNet elsewhere), built from its config. Batch 1. Variants:

- `stock_eager`: the stock model, transformers' DynamicCache, eager forward per token (what generate() does);
- `stock_static_graph`: the stock model, transformers' StaticCache (max length = context + the steps run)
  and its decode forward captured in a CUDA graph (its best form; the 4-D mask, a compare of the key slots
  with the position, is computed inside the graph as transformers' SDPA mask would be);
- `hybrid_eager`: the hybrid with transformers' DynamicCache and the mixers' own slots, eager forward;
- `hybrid_static_graph`: the hybrid through `hybridize.inference.decode.StaticDecoder` (static hybrid cache,
  decode step captured once in a CUDA graph and replayed for every context);
- `hybrid_static_graph_compiled`: the same with the step's forward compiled by torch.compile before the capture
  (`StaticDecoder(compile=True)`; the compile time is in `warmup_s` of the first context);
- `hybrid_static_graph_autotuned` (only when named in `--variants`): compiled in mode
  "max-autotune-no-cudagraphs", which benchmarks Triton's matrix-product templates against cuBLAS for each of the
  step's M=1 products (`StaticDecoder(compile="max-autotune-no-cudagraphs")`; minutes more compilation).

Context is created cheaply: every cache is filled with random values and its position counters set to the
context length (the step's cost depends on the context only through the buffer sizes and positions; for the
hybrid the buffers do not grow at all). A real prefill is also timed (`--prefill-contexts`): the stock model
in one forward, the hybrid chunked into its static cache (`--prefill-chunk`); the hybrid's graph decode is then
timed again from that real state. Timing per METHOD.md: warm-up steps, then `--repeats` runs of up to
`--steps` tokens each (fewer for slow steps, so a run lasts about a second) between CUDA events (a step = feed
the last token, run the model, argmax), the median reported;
peak memory is `torch.cuda.max_memory_allocated` over filling plus timing (weights included). A variant that
runs out of memory is recorded as such and skipped for longer contexts. The floor is the bytes of decoder
and lm_head weights over the device-to-device copy bandwidth measured at the start.

    python benchmarks/decode_latency.py                     # H100: ~8 minutes (estimate), every context
    python benchmarks/decode_latency.py --quick             # 1K and 128K, no prefill, fewer steps: ~3 minutes
    python benchmarks/decode_latency.py --quick --variants hybrid_static_graph_compiled --profile 8
                                                            # + kernels per step, by kind (torch.profiler)
    python benchmarks/decode_latency.py --config tiny --device cpu --contexts 32 64   # CPU smoke run
    python benchmarks/decode_latency.py --plot-only benchmarks/results/decode_latency_h100.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import DynamicCache, Qwen2_5_VLForConditionalGeneration, StaticCache

import hybridize  # noqa: F401  (registers the hybrid classes)
from hybridize.compat import cache_argument
from hybridize.converters import build_hybrid_config, hybrid_model_class, plan_layers
from hybridize.converters.discovery import layer_specs
from hybridize.inference.decode import StaticDecoder
from hybridize.inference.static_cache import StaticAttentionLayer, StaticHybridCache
from hybridize.mixers.cache import MixerCacheLayer
from hybridize.presets import qwen2_5_vl_3b_config, tiny_qwen2_5_vl_config

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ is not a package
from common import free, is_oom, kernel_ms_by_kind_text, profile_steps, pyplot, run_benchmark  # noqa: E402

VARIANTS = (
    "stock_eager",
    "stock_static_graph",
    "hybrid_eager",
    "hybrid_static_graph",
    "hybrid_static_graph_compiled",
    "hybrid_static_graph_autotuned",
)
OPT_IN = ("hybrid_static_graph_autotuned",)  # run only when named in --variants
# torch.compile's mode per compiled variant
COMPILED = {
    "hybrid_static_graph_compiled": True,
    "hybrid_static_graph_autotuned": "max-autotune-no-cudagraphs",
}
CONTEXTS = ("1K", "16K", "64K", "128K", "512K", "1M")
CONFIGS = {"3b": dict(window=8192), "tiny": dict(window=16)}


def parse_tokens(text: str) -> int:
    """ "1K" -> 1024, "1M" -> 1048576, "300" -> 300."""
    scale = {"K": 1024, "M": 1024 * 1024}.get(text[-1].upper(), 1)
    return int(text[:-1] if scale > 1 else text) * scale


def label(tokens: int) -> str:
    for suffix, scale in (("M", 1024 * 1024), ("K", 1024)):
        if tokens >= scale and tokens % scale == 0:
            return f"{tokens // scale}{suffix}"
    return str(tokens)


# --- models ---------------------------------------------------------------------------------------------


def model_config(name: str):
    return qwen2_5_vl_3b_config() if name == "3b" else tiny_qwen2_5_vl_config()


def build_model(
    name: str, hybrid: bool, window: int, device: torch.device, dtype: torch.dtype, seed: int = 0
):
    """The stock model or its ratio-1/4 hybrid (built from the hybrid config: random weights either way)."""
    config = model_config(name)
    model_class = Qwen2_5_VLForConditionalGeneration
    if hybrid:
        layers = config.get_text_config(decoder=True).num_hidden_layers
        config = build_hybrid_config(config, plan_layers(layers, "1/4", window=window), layer_specs(config))
        model_class = hybrid_model_class(model_class)
    torch.manual_seed(seed)
    with torch.device(device):
        model = model_class._from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


def decode_bytes(model) -> int:
    """Bytes of weights one decode step reads: the text decoder and the output head."""
    parts = [model.get_decoder(), model.get_output_embeddings()]
    seen, total = set(), 0
    for part in parts:
        for parameter in part.parameters():
            if id(parameter) not in seen:
                seen.add(id(parameter))
                total += parameter.numel() * parameter.element_size()
    return total


def copy_bandwidth(device: torch.device) -> float:
    """Device-to-device copy bandwidth in bytes/s (bytes read plus written), median of 10 copies of 1 GiB."""
    source = torch.randn(256 * 1024 * 1024, device=device)
    target = torch.empty_like(source)
    times = []
    for _ in range(12):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        target.copy_(source)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * source.numel() * source.element_size() / statistics.median(times[2:])


# --- timing ---------------------------------------------------------------------------------------------


class Clock:
    """CUDA events on a GPU, perf_counter (after a synchronize) elsewhere."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def time(self, fn) -> float:
        """Seconds `fn` takes on the device."""
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        begin = time.perf_counter()
        fn()
        return time.perf_counter() - begin


def time_decode(step, clock: Clock, steps: int, repeats: int, warmup: int) -> dict:
    """ms per token of `step` (one token through the model): warm-up, then the median of `repeats` runs of up to
    `steps` tokens, fewer when a step is slow (a run then lasts about a second)."""
    begin = time.perf_counter()
    for _ in range(warmup):
        step()
    warmup_s = time.perf_counter() - begin
    steps = max(2, min(steps, int(1.0 / max(clock.time(step), 1e-6))))

    def run():
        for _ in range(steps):
            step()

    per_token = [1e3 * clock.time(run) / steps for _ in range(repeats)]
    median = statistics.median(per_token)
    return {"ms_per_token": median, "ms_per_token_runs": per_token, "steps": steps, "warmup_s": warmup_s}


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


# --- filling a context ------------------------------------------------------------------------------------


def random_(tensor: torch.Tensor, generator: torch.Generator, scale: float = 1.0) -> None:
    tensor.copy_(
        torch.randn(tensor.shape, generator=generator, device=tensor.device, dtype=torch.float32) * scale
    )


def fill_mixer_layer(layer: MixerCacheLayer, context: int, generator: torch.Generator) -> None:
    for name, state in layer.states.items():  # conv states hold inputs; recurrent ones sums of many updates
        random_(state, generator, 1.0 if name.startswith("conv") else 0.05)
    layer.seen_tokens = context


def text_config(model):
    return model.config.get_text_config(decoder=True)


def kv_shape(model, tokens: int, batch: int = 1) -> tuple[int, ...]:
    config = text_config(model)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return (batch, config.num_key_value_heads, tokens, head_dim)


def random_ids(model, length: int, device: torch.device) -> torch.Tensor:
    """(1, length) random text token ids: below the first special token (vision placeholders are not text)."""
    config = model.config
    special = [text_config(model).eos_token_id, config.image_token_id, config.vision_start_token_id]
    return torch.randint(0, min(token for token in special if token is not None), (1, length), device=device)


def short_prefill(model, cache, device: torch.device, length: int = 16) -> None:
    """A few real tokens through the model, so that every cache slot exists (mixers create theirs lazily)."""
    ids = random_ids(model, length, device)
    with torch.no_grad():
        model(input_ids=ids, **cache_argument(cache), use_cache=True)


def dynamic_context(model, context: int, device: torch.device, generator: torch.Generator) -> DynamicCache:
    """A DynamicCache as after `context` tokens: random keys/values (the last window - 1 in sliding layers) and
    random mixer states."""
    cache = DynamicCache(config=text_config(model))
    short_prefill(model, cache, device)
    for layer in cache.layers:
        if isinstance(layer, MixerCacheLayer):
            fill_mixer_layer(layer, context, generator)
            continue
        window = getattr(layer, "sliding_window", None)
        kept = context if window is None else min(context, window - 1)
        layer.keys = torch.empty(kv_shape(model, kept), dtype=layer.keys.dtype, device=device)
        layer.values = torch.empty_like(layer.keys)
        random_(layer.keys, generator)
        random_(layer.values, generator)
        if window is not None:
            layer.cumulative_length = context
    return cache


def fill_static_hybrid(cache: StaticHybridCache, context: int, generator: torch.Generator) -> None:
    """A static hybrid cache as after `context` tokens (mixer states exist: a prefill ran before)."""
    for layer in cache.layers:
        if isinstance(layer, StaticAttentionLayer):
            random_(layer.keys, generator)
            random_(layer.values, generator)
        else:
            fill_mixer_layer(layer, context, generator)
    for capacity, valid in cache.valid.items():
        valid.zero_()
        valid[:, : min(context, capacity)] = True
    cache.length.fill_(context)
    cache.position.fill_(context)
    cache.seen_tokens = 0
    cache.advance_host(context)


# --- variants -------------------------------------------------------------------------------------------


def eager_step(model, cache, context: int, device: torch.device):
    """A decode step with transformers' cache, eager: the model on the last token, then argmax."""
    state = {"token": torch.zeros(1, 1, dtype=torch.long, device=device), "position": context}

    def step():
        position = torch.full((1, 1), state["position"], dtype=torch.long, device=device)
        with torch.no_grad():
            logits = model(
                input_ids=state["token"], position_ids=position, **cache_argument(cache), use_cache=True
            ).logits
        state["token"] = logits[:, -1].argmax(-1, keepdim=True)
        state["position"] += 1

    return step


def stock_static_step(
    model, context: int, max_length: int, device: torch.device, generator, cuda_graph: bool, batch: int = 1
):
    """transformers' StaticCache of `batch` rows filled with `context` random tokens each, and a decode step over
    it captured in a CUDA graph (the cache's own length counter and the position advance inside the graph)."""
    config = text_config(model)
    cache = StaticCache(config=config, max_cache_len=max_length)
    _, heads, _, head_dim = kv_shape(model, 0)
    dtype = next(model.parameters()).dtype
    cache.early_initialization(
        batch_size=batch, num_heads=heads, head_dim=head_dim, dtype=dtype, device=device
    )
    for layer in cache.layers:
        random_(layer.keys[:, :, :context], generator)
        random_(layer.values[:, :, :context], generator)
        layer.cumulative_length.fill_(context)
    token = torch.zeros(batch, 1, dtype=torch.long, device=device)
    position = torch.full((batch, 1), context, dtype=torch.long, device=device)
    slots = torch.arange(max_length, device=device)

    def forward():
        mask = (slots <= position[0, 0])[
            None, None, None, :
        ]  # (1, 1, 1, max_length): keys up to the position, every row at the same one
        logits = model(
            input_ids=token,
            attention_mask=mask,
            position_ids=position,
            **cache_argument(cache),
            use_cache=True,
        ).logits
        position.add_(1)
        return logits

    with torch.no_grad():
        if not cuda_graph:

            def step():
                token.copy_(forward()[:, -1].argmax(-1, keepdim=True))

            return step, cache
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                forward()
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = forward()

    def replay():
        graph.replay()
        token.copy_(logits[:, -1].argmax(-1, keepdim=True))

    return replay, (cache, graph)


def hybrid_static_step(decoder: StaticDecoder):
    state = {"token": torch.zeros(decoder.cache.batch_size, dtype=torch.long, device=decoder.cache.device)}

    def step():
        state["token"] = decoder.step(state["token"]).argmax(-1)

    return step


def max_steps(args) -> int:
    return (
        max(
            args.warmup + args.steps * args.repeats, args.eager_warmup + args.eager_steps * args.eager_repeats
        )
        + 4
    )


def measure(args, variant: str, model, context: int, device, generator, decoder=None) -> dict:
    clock = Clock(device)
    cuda_graph = device.type == "cuda"
    eager = variant.endswith("eager")
    timing = (
        dict(steps=args.eager_steps, repeats=args.eager_repeats, warmup=args.eager_warmup)
        if eager
        else dict(steps=args.steps, repeats=args.repeats, warmup=args.warmup)
    )
    reset_peak(device)
    held = None
    if eager:
        held = dynamic_context(model, context, device, generator)
        step = eager_step(model, held, context, device)
    elif variant == "stock_static_graph":
        step, held = stock_static_step(
            model, context, context + max_steps(args), device, generator, cuda_graph
        )
    else:
        fill_static_hybrid(decoder.cache, context, generator)
        step = hybrid_static_step(decoder)
    result = time_decode(step, clock, **timing)
    if args.profile:
        result["profile"] = profile_steps(step, args.profile)
    result.update(
        peak_gib=peak_gib(device),
        cuda_graph=not eager and cuda_graph,
        cache_gib=(decoder.cache.nbytes() / 2**30) if decoder is not None else None,
    )
    del held, step
    return result


def time_prefill(args, model, context: int, device, decoder=None) -> dict:
    """One real prefill of `context` random tokens: the stock model in one forward with a DynamicCache, the hybrid
    chunked into its static cache. Median of `--prefill-repeats` after one untimed run (none where
    `args.prefill_warmup` is false: the caller has run the same kernels already)."""
    clock = Clock(device)
    ids = random_ids(model, context, device)

    def run():
        with torch.no_grad():
            if decoder is None:
                model(
                    input_ids=ids, logits_to_keep=1, **cache_argument(DynamicCache(config=text_config(model)))
                )
            else:
                decoder.cache.reset()
                decoder.prefill(ids, chunk_size=args.prefill_chunk)

    reset_peak(device)
    if getattr(args, "prefill_warmup", True):
        run()
    seconds = statistics.median(clock.time(run) for _ in range(args.prefill_repeats))
    return {"seconds": seconds, "tokens_per_s": context / seconds, "peak_gib": peak_gib(device)}


def run_model(args, report: dict, hybrid: bool, device: torch.device, dtype: torch.dtype, save) -> None:
    name = "hybrid" if hybrid else "stock"
    model = build_model(args.config, hybrid, args.window, device, dtype)
    report["models"][name] = {
        "parameters": sum(p.numel() for p in model.parameters()),
        "decode_weight_bytes": decode_bytes(model),
    }
    if report.get("bandwidth_bytes_per_s"):
        report["models"][name]["floor_ms"] = 1e3 * decode_bytes(model) / report["bandwidth_bytes_per_s"]
    generator = torch.Generator(device).manual_seed(args.seed)
    decoder, decoders = None, {}
    if hybrid:
        cache = StaticHybridCache.for_model(model, 1, max_length=1)
        decoder = StaticDecoder(model, cache, cuda_graph=device.type == "cuda", fuse=True)
        decoder.prefill(random_ids(model, 16, device))  # allocates the mixer states
        # one cache for both static variants: each decoder's graph is captured over its buffers
        decoders = {"hybrid_static_graph": decoder}
        for variant, mode in COMPILED.items():
            if variant in args.variants:
                decoders[variant] = StaticDecoder(
                    model, cache, cuda_graph=device.type == "cuda", compile=mode, fuse=True
                )

    for context in args.prefill_contexts:
        key = f"{name}/{label(context)}"
        try:
            report["prefill"][key] = time_prefill(args, model, context, device, decoder)
            if decoder is not None:  # decode from the real state just prefilled
                report["prefill"][key]["ms_per_token_after"] = time_decode(
                    hybrid_static_step(decoder), Clock(device), args.steps, args.repeats, args.warmup
                )["ms_per_token"]
        except Exception as error:  # noqa: BLE001 - OOM is recorded and the run goes on
            if not is_oom(error):
                raise
            report["prefill"][key] = {"oom": True}
        free()
        print(f"prefill {key}: {report['prefill'][key]}", flush=True)
        save()

    for variant in (v for v in args.variants if v.startswith(name)):
        out_of_memory = False
        for context in args.contexts:
            key = label(context)
            if out_of_memory:
                report["decode"][variant][key] = {"skipped": "out of memory at a shorter context"}
                continue
            try:
                report["decode"][variant][key] = measure(
                    args, variant, model, context, device, generator, decoders.get(variant)
                )
            except Exception as error:  # noqa: BLE001 - recorded, so one broken variant does not lose the run
                out_of_memory = is_oom(error)
                report["decode"][variant][key] = {"oom": out_of_memory, "error": repr(error)[:300]}
            free()
            print(f"{variant} {key}: {report['decode'][variant][key]}", flush=True)
            save()
    del model, decoder, decoders
    free()


# --- report -----------------------------------------------------------------------------------------------


def markdown(report: dict) -> str:
    variants = list(report["decode"])
    contexts = list(dict.fromkeys(key for results in report["decode"].values() for key in results))
    lines = [
        f"Decode latency, batch 1 ({report['device']}, {report['date']}); ms/token (peak GiB)",
        "",
        "| context | " + " | ".join(variants) + " |",
        "|---|" + "---|" * len(variants),
    ]
    for context in contexts:
        cells = []
        for variant in variants:
            result = report["decode"][variant].get(context, {})
            if "ms_per_token" in result:
                peak = f" ({result['peak_gib']:.1f})" if result.get("peak_gib") is not None else ""
                cells.append(f"{result['ms_per_token']:.2f}{peak}")
            else:
                cells.append("OOM" if result.get("oom") else "error" if result.get("error") else "-")
        lines.append(f"| {context} | " + " | ".join(cells) + " |")
    if report["prefill"]:
        lines += ["", "| prefill | seconds | tokens/s | peak GiB | hybrid graph decode after it (ms/token) |"]
        lines.append("|---|---|---|---|---|")
        for key, result in report["prefill"].items():
            if result.get("oom"):
                lines.append(f"| {key} | OOM | | | |")
                continue
            after = result.get("ms_per_token_after")
            peak = result.get("peak_gib")
            lines.append(
                f"| {key} | {result['seconds']:.3f} | {result['tokens_per_s']:,.0f} | "
                f"{'' if peak is None else f'{peak:.1f}'} | {'' if after is None else f'{after:.2f}'} |"
            )
    profiles = [
        (variant, context, result["profile"])
        for variant, results in report["decode"].items()
        for context, result in results.items()
        if "profile" in result
    ]
    if profiles:
        lines += ["", "| profile (per step) | kernels | kernel ms | by kind (ms) |", "|---|---|---|---|"]
        for variant, context, profile in profiles:
            kinds = kernel_ms_by_kind_text(profile)
            lines.append(
                f"| {variant} {context} | {profile['kernels_per_step']:.0f} | "
                f"{profile['kernel_ms_per_step']:.2f} | {kinds} |"
            )
    floors = {name: model.get("floor_ms") for name, model in report["models"].items()}
    if any(floors.values()):
        lines += [
            "",
            "Floor (decode weights / copy bandwidth): "
            + ", ".join(f"{name} {floor:.2f} ms" for name, floor in floors.items() if floor),
        ]
    lines += ["", f"`{report['command']}`"]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    figure, (latency, memory) = plt.subplots(1, 2, figsize=(12, 4.5))
    for variant, results in report["decode"].items():
        points = [(parse_tokens(k), r) for k, r in results.items() if "ms_per_token" in r]
        if not points:
            continue
        latency.plot(
            [p for p, _ in points], [r["ms_per_token"] for _, r in points], marker="o", label=variant
        )
        if all(r.get("peak_gib") is not None for _, r in points):
            memory.plot([p for p, _ in points], [r["peak_gib"] for _, r in points], marker="o", label=variant)
    for axis, ylabel in ((latency, "decode ms/token"), (memory, "peak memory (GiB)")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("context (tokens)")
        axis.set_ylabel(ylabel)
        axis.grid(True, which="both", alpha=0.3)
        if axis.lines:
            axis.legend()
    latency.set_yscale("log")
    figure.suptitle(f"Qwen2.5-VL-3B vs InfiniteVL hybrid, batch 1, {report['device']}")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    return True


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="3b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--contexts", nargs="+", default=None, help=f"default {' '.join(CONTEXTS)}")
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=VARIANTS,
        default=[variant for variant in VARIANTS if variant not in OPT_IN],
    )
    parser.add_argument("--prefill-contexts", nargs="*", default=None, help="default 16K 64K")
    parser.add_argument("--prefill-chunk", type=int, default=8192, help="the hybrid's prefill chunk (tokens)")
    parser.add_argument("--prefill-repeats", type=int, default=2)
    parser.add_argument("--window", type=int, default=None, help="SWA window (default: 8192 on 3b)")
    parser.add_argument("--steps", type=int, default=64, help="tokens per timed run (graph variants)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=8)
    parser.add_argument("--eager-steps", type=int, default=8, help="tokens per timed run (eager variants)")
    parser.add_argument("--eager-repeats", type=int, default=3)
    parser.add_argument("--eager-warmup", type=int, default=2)
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="STEPS",
        help="after timing, profile STEPS steps of each variant: kernels per step, their ms by kind, the costliest",
    )
    parser.add_argument("--quick", action="store_true", help="1K and 128K, fewer steps, no prefill")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--plot-only", type=Path, default=None, help="redraw table and plot from a JSON result"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.contexts = args.contexts or ["1K", "128K"]
        args.prefill_contexts = (
            args.prefill_contexts or []
        )  # fla's prefill kernels autotune for minutes first
        args.steps, args.repeats, args.warmup = 32, 5, 4
        args.eager_steps, args.eager_repeats, args.eager_warmup = 4, 2, 1
        args.prefill_repeats = 1
    args.contexts = args.contexts or list(CONTEXTS)
    args.prefill_contexts = ["16K", "64K"] if args.prefill_contexts is None else args.prefill_contexts
    args.window = args.window or CONFIGS[args.config]["window"]
    args.contexts = [parse_tokens(c) for c in args.contexts]
    args.prefill_contexts = [parse_tokens(c) for c in args.prefill_contexts]
    return args


def run(args, report: dict, device: torch.device, dtype: torch.dtype, save) -> None:
    for hybrid in (False, True):
        if any(v.startswith("hybrid" if hybrid else "stock") for v in args.variants):
            run_model(args, report, hybrid, device, dtype, save)


def main(argv=None) -> None:
    args = parse_args(argv)

    def fields(device: torch.device) -> dict:
        return {
            "methodology": {
                key: getattr(args, key)
                for key in ("steps", "repeats", "warmup", "eager_steps", "eager_repeats", "eager_warmup")
            }
            | {
                "prefill_chunk": args.prefill_chunk,
                "context": "random cache contents, position set to the context",
            },
            "bandwidth_bytes_per_s": copy_bandwidth(device) if device.type == "cuda" else None,
            "models": {},
            "prefill": {},
            "decode": {variant: {} for variant in args.variants},
        }

    run_benchmark("decode_latency", args, argv, args.quick, fields, run, markdown, plot)


if __name__ == "__main__":
    main()

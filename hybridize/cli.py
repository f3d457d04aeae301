"""`hybridize <verb>`: convert (or import) a model, train it stage by stage, check its data, evaluate it, inspect
it, generate or stream video with it.

Every argument is checked (and the output directory refused) before any model is loaded, so bad input
fails in a second with one line that says what to change.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from hybridize.converters.plan import DEFAULT_WINDOW, PATTERNS
from hybridize.inference.cuda_graphs import COMPILE_MODES
from hybridize.mixers.base import INIT_POLICIES


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hybridize", description=__doc__.splitlines()[0])
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--debug", action="store_true", help="show the full traceback of an error instead of one line"
    )
    verbs = parser.add_subparsers(dest="verb", required=True)

    def verb(name: str, help: str, **kwargs) -> argparse.ArgumentParser:
        return verbs.add_parser(
            name,
            help=help,
            parents=[common],
            formatter_class=argparse.ArgumentDefaultsHelpFormatter,
            **kwargs,
        )

    convert = verb("convert", "turn a transformer into a hybrid and save it")
    convert.add_argument(
        "--base",
        required=True,
        help="hub id, local directory, short name (Qwen2.5-VL-3B, Llama-3.2-1B, ...) or embedded tiny-qwen2.5-vl",
    )
    which = convert.add_mutually_exclusive_group()
    which.add_argument(
        "--ratio",
        help='fraction of layers that keep softmax attention: "1/4", "0.25", "0", "1"; one of --ratio, '
        "--swa-layers or --layers is required",
    )
    which.add_argument("--swa-layers", help="explicit softmax (sliding-window) layers, e.g. 0,4,8")
    convert.add_argument(
        "--pattern",
        default="interleave",
        choices=PATTERNS,
        help="where --ratio puts the softmax layers (interleave: i %% k == 0 for 1/k)",
    )
    convert.add_argument(
        "--round",
        action="store_true",
        help="take the nearest whole number of layers for a --ratio that is not one (0.3 of 8 layers -> 2)",
    )
    convert.add_argument(
        "--layers",
        help='per-layer map applied last, "0-3:sliding_window,4:mamba2", or a YAML/JSON file with a list '
        "(one mixer per layer) or a mapping; alone, the layers it does not name keep their attention; or the "
        "plan.yaml that `hybridize select` writes",
    )
    convert.add_argument(
        "--window", type=int, default=None, help=f"sliding window in tokens (default {DEFAULT_WINDOW})"
    )
    convert.add_argument(
        "--mixer",
        default=None,
        help="linear mixer for the other layers (default gated_deltanet); several, comma-separated, take turns "
        "(see `hybridize mixers`)",
    )
    convert.add_argument(
        "--init",
        default=None,
        help=f"init policy of every linear mixer: {' | '.join(INIT_POLICIES)} (default: each mixer's own)",
    )
    convert.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="MIXER.KEY=VALUE",
        help="a mixer option, e.g. gated_deltanet.expand_v=1 or mamba2.num_groups=4 (repeatable)",
    )
    convert.add_argument("--out", required=True, help="output directory (must be new or empty)")
    convert.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the hybrid saved in --out (a folder holding anything else is still refused)",
    )
    add_placement(convert, "the checkpoint's")

    imports = verb(
        "import",
        "write a released InfiniteVL checkpoint (hustvl/InfiniteVL, a hub id or a local folder) as a hybrid",
    )
    imports.add_argument(
        "source", help="hub id (hustvl/InfiniteVL, hustvl/InfiniteVL-LongSFT) or local folder"
    )
    imports.add_argument("--out", required=True, help="output directory (must be new or empty)")
    imports.add_argument("--overwrite", action="store_true", help="replace the hybrid saved in --out")
    imports.add_argument("--dtype", default=None, help="fp32 | bf16 | fp16 (default: the checkpoint's)")
    imports.add_argument(
        "--stage",
        default="supervised_fine_tuning",
        choices=("supervised_fine_tuning", "long_sequence_sft"),
        help="the training stage the checkpoint is the output of (InfiniteVL-LongSFT: long_sequence_sft)",
    )

    train = verbs.add_parser(
        "train",
        add_help=False,
        help="run a training stage from YAML: train [fit|validate] --config stage.yaml [overrides] (LightningCLI; "
        "hybridize train --help lists every setting)",
    )
    train.add_argument("arguments", nargs=argparse.REMAINDER)

    data = verb("data", "check training data before a run: hybridize data check CONFIG_OR_DATA")
    data_verbs = data.add_subparsers(dest="data_verb", required=True, help="what to do with the data")
    check = data_verbs.add_parser(
        "check",
        parents=[common],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        help="read every row, build every sample as training would, write report.json + token_lengths.png",
    )
    check.add_argument(
        "target",
        help="a stage YAML (its data section is checked) or data: JSON(L) files, a data set folder, hub id",
    )
    check.add_argument(
        "--processor", help="model directory / hub id / embedded name (default: the config's model)"
    )
    check.add_argument("--out", default="data-check", help="folder for report.json and token_lengths.png")
    check.add_argument("--max-length", type=int, help="tokens per sample (default: the config's, else 4096)")
    check.add_argument(
        "--format", default="auto", help="record layout of a data path: auto, llava, finevision, messages"
    )

    from hybridize.evaluation import cli as evaluation_cli  # argparse only: no torch at parse time

    evaluation = verb("eval", "how good is a hybrid: fidelity to its teacher, task accuracy")
    evaluation_cli.add_arguments(evaluation, parents=[common])

    from hybridize.selection import cli as selection_cli  # argparse only: no torch at parse time

    select = verb("select", "choose which layers keep softmax attention from data (kl, nll, mse, uniform)")
    selection_cli.add_arguments(select)

    mixers = verb("mixers", "list the registered mixers, their options and compute paths")
    mixers.add_argument("--json", action="store_true", help="print JSON instead of a table")

    inspect = verb("inspect", "print the layer plan of a saved hybrid and check its weights against it")
    inspect.add_argument("path", help="saved hybrid directory")

    generate = verb("generate", "generate a reply with a saved hybrid (printed as it is generated)")
    generate.add_argument("path", help="saved hybrid directory")
    generate.add_argument("--prompt", required=True, help="the user's message")
    generate.add_argument("--image", action="append", default=[], help="image file (repeat for several)")
    generate.add_argument("--max-new-tokens", type=int, default=32, help="most tokens to generate")
    add_placement(generate, "the checkpoint's")
    generate.add_argument(
        "--static-decode",
        action="store_true",
        help="decode over a static hybrid cache, each step a replayed CUDA graph on a GPU (same tokens)",
    )

    stream = verb(
        "stream",
        "stream a video into a saved hybrid frame by frame and answer questions at given times",
        description="Decode VIDEO (PyAV), feed frames sampled at --fps to a StreamingSession in constant "
        "memory, and answer each --ask at its --at times (comma-separated, e.g. 10s,1:30). The i-th --at "
        "belongs to the i-th --ask; a single --at applies to every question; without --at, questions are "
        "asked at the end of the video.",
    )
    stream.add_argument("video", help="video file (anything FFmpeg reads: mp4, mkv, webm, ...)")
    stream.add_argument("path", help="saved hybrid directory")
    stream.add_argument("--fps", type=float, default=2.0, help="frames sampled per second of video")
    stream.add_argument("--ask", action="append", required=True, help="a question (repeatable)")
    stream.add_argument("--at", action="append", default=[], help="times to ask at, e.g. 10s,60s or 1:30")
    stream.add_argument("--max-new-tokens", type=int, default=64, help="most tokens per answer")
    stream.add_argument("--frame-size", type=int, default=448, help="frames are resized to this square")
    stream.add_argument(
        "--system-prompt", default=None, help="system message before the video (default: the chat template's)"
    )
    add_placement(stream, "the checkpoint's")
    stream.add_argument("--no-cuda-graphs", action="store_true", help="run the frame steps eagerly on CUDA")
    stream.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the ViT blocks and the captured per-frame prefill (CUDA graphs; the first frames "
        "compile, about a minute for a 3B model)",
    )
    stream.add_argument(
        "--compile-mode",
        choices=COMPILE_MODES,
        default=None,
        help="torch.compile's mode for --compile (implies it); max-autotune-no-cudagraphs also tunes the "
        "matrix products' kernels, minutes more",
    )
    stream.add_argument(
        "--overlap-encoder",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="encode each frame on a second CUDA stream, beside the previous frame's prefill (default: with "
        "CUDA graphs, i.e. on --device cuda without --no-cuda-graphs; the frames' results are the same)",
    )
    return parser


def add_placement(parser: argparse.ArgumentParser, default_dtype: str) -> None:
    parser.add_argument("--dtype", default=None, help=f"fp32 | bf16 | fp16 (default: {default_dtype})")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cpu)")


def check_device(device: str | None) -> None:
    """--device names a device this machine has (checked before any model is loaded)."""
    if device is None:
        return
    import torch

    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {device!r} is not a device name; give cpu, cuda or cuda:N.") from None
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(
                f"--device {device}: this machine has no CUDA device (or torch without CUDA); use --device cpu."
            )
        if parsed.index is not None and parsed.index >= count:
            raise ValueError(
                f"--device {device}: this machine has {count} CUDA device(s), cuda:0..cuda:{count - 1}."
            )
    elif parsed.type != "cpu":
        raise ValueError(f"--device {device!r}: hybridize runs on cpu or cuda.")


def nonempty_text(value: str, flag: str) -> str:
    if not value.strip():
        raise ValueError(f"{flag} is empty; give the text to send to the model.")
    return value


def parse_options(items: list[str]) -> dict[str, dict]:
    """["gated_deltanet.expand_v=1", ...] -> {"gated_deltanet": {"expand_v": 1}}; values are read as YAML
    scalars (1, 0.5, 1e-3, true, null, text); each mixer checks their types against its options."""
    import yaml

    options: dict[str, dict] = {}
    for item in items:
        key, sep, text = item.partition("=")
        mixer, dot, name = key.strip().partition(".")
        if not (sep and dot and mixer and name):
            raise ValueError(f"--option {item!r} is not MIXER.KEY=VALUE, e.g. gated_deltanet.expand_v=1.")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            value = text
        if isinstance(value, str):
            try:  # YAML 1.1 reads 1e-3 as text
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, (list, dict)):
            raise ValueError(
                f"--option {item!r}: give one value (a number, true/false or text), not {value!r}."
            )
        options.setdefault(mixer, {})[name] = value
    return options


def read_layer_map(value: str | None):
    """--layers: a map string, or a YAML/JSON file holding a list, a mapping or a plan (`hybridize select`)."""
    if value is None or not value.endswith((".yaml", ".yml", ".json")):
        return value
    from hybridize.converters.plan import read_layers_file

    return read_layers_file(value, "--layers file")


def build_plan(args: argparse.Namespace, num_layers: int):
    from hybridize.converters.plan import is_plan_file_content, plan_layers
    from hybridize.mixers.registry import get_mixer_class

    options = parse_options(args.option)
    arguments = dict(
        ratio=args.ratio,
        swa_layers=args.swa_layers,
        layers=read_layer_map(args.layers),
        pattern=args.pattern,
        mixer=args.mixer,
        window=args.window,
        options=options,
        round_to_layers=args.round,
    )
    # A plan file (`hybridize select`) holds plan_layers arguments, not a layer map.
    if is_plan_file_content(arguments["layers"]):
        planned = arguments.pop("layers")
        given = [
            f"--{key.replace('_', '-')}" for key in ("ratio", "swa_layers") if arguments[key] is not None
        ]
        if given and {"ratio", "swa_layers", "layers"} & set(planned):
            raise ValueError(
                f"--layers {args.layers!r} is a plan file that places the layers itself; drop {' and '.join(given)}."
            )
        clashes = [
            f"--{key} {arguments[key]} (the file: {planned[key]})"
            for key in ("window", "mixer")
            if arguments[key] is not None and key in planned and planned[key] != arguments[key]
        ]
        if clashes:
            raise ValueError(
                f"--layers {args.layers!r} is a plan file that disagrees with {'; '.join(clashes)}."
            )
        arguments = {**arguments, **{key: value for key, value in planned.items() if value is not None}}
    arguments["mixer"] = arguments["mixer"] or "gated_deltanet"
    plan = plan_layers(num_layers, **arguments)
    if args.init is not None:
        if args.init not in INIT_POLICIES:
            raise ValueError(f"--init {args.init!r} is not one of {', '.join(INIT_POLICIES)}.")
        for name in plan.mixers:
            if "init" in mixer_fields(get_mixer_class(name)) and "init" not in options.get(name, {}):
                plan.mixers[name]["init"] = args.init
    return plan


def mixer_fields(mixer_class) -> dict[str, dataclasses.Field]:
    return {field.name: field for field in dataclasses.fields(mixer_class.config_class)}


def run_convert(args: argparse.Namespace) -> None:
    from hybridize.converters import checkpoint
    from hybridize.converters.convert import build_hybrid_config, convert

    if args.window is not None and args.window <= 0:
        raise ValueError(f"--window must be a positive number of tokens, got {args.window}.")
    checkpoint.parse_dtype(args.dtype)
    check_device(args.device)
    out = checkpoint.check_output_dir(args.out, args.overwrite)
    config = checkpoint.load_base_config(args.base)
    specs = checkpoint.base_layer_specs(config, args.base)
    plan = build_plan(args, len(specs))
    build_hybrid_config(config, plan, specs)  # every mixer option checked against the teacher, no weights yet

    print(f"loading {args.base} ...", file=sys.stderr)
    teacher, processor = checkpoint.load_base_model(args.base, dtype=args.dtype, device=args.device)
    hybrid, report = convert(teacher, plan)
    print(report.table())
    checkpoint.save_hybrid(hybrid, out, processor, overwrite=args.overwrite)
    print(f"saved hybrid to {out}")


def describe_mixers() -> list[dict]:
    """Every registered mixer: its options (default None = derived from the teacher) and compute paths."""
    from hybridize.mixers.ops.backends import library_available
    from hybridize.mixers.registry import available_mixers, get_mixer_class

    described = []
    for name in available_mixers():
        mixer_class = get_mixer_class(name)
        if mixer_class.wraps_attention:
            paths = {"teacher attention (sdpa, eager, flash_attention_2, ...)": True}
        else:
            paths = {"torch (reference)": True}
            paths.update({lib: library_available(lib) for lib in mixer_class.kernels})
        options = {}
        for field in mixer_fields(mixer_class).values():
            default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
            options[field.name] = "from teacher" if default is None else default
        doc = (mixer_class.__doc__ or sys.modules[mixer_class.__module__].__doc__ or "").strip()
        described.append(
            {
                "name": name,
                "class": f"{mixer_class.__module__}.{mixer_class.__qualname__}",
                "summary": doc.splitlines()[0] if doc else "",
                "options": options,
                "compute_paths": paths,
            }
        )
    return described


def run_mixers(args: argparse.Namespace) -> None:
    described = describe_mixers()
    if args.json:
        print(json.dumps(described, indent=2, default=str))
        return
    for mixer in described:
        paths = ", ".join(
            f"{path}{'' if ok else ' [unavailable here]'}" for path, ok in mixer["compute_paths"].items()
        )
        print(f"{mixer['name']}  ({mixer['class']})")
        print(f"  {mixer['summary']}")
        print(f"  compute paths: {paths}")
        options = ", ".join(f"{key}={value}" for key, value in mixer["options"].items()) or "none"
        print(f"  options: {options}")


def run_inspect(args: argparse.Namespace) -> None:
    from hybridize.converters.checkpoint import read_plan, verify_checkpoint

    data = read_plan(args.path)
    count = verify_checkpoint(args.path)
    plan = data["hybridize"]
    print(
        f"{args.path}: {data['model_type']} (from {plan.get('base_model') or 'unknown base'}), ratio {plan.get('ratio')}"
    )
    for idx, name in enumerate(plan["layers"]):
        how = "config" if idx in plan.get("native_layers", []) else "module"
        print(f"{idx:>5}  {name:<16} {how}")
    for name, options in plan["mixers"].items():
        print(f"{name}: {json.dumps(options)}")
    print(
        f"weights: {count} tensors, each present with the shape the plan builds (read from the file headers)"
    )


def run_generate(args: argparse.Namespace) -> None:
    from transformers import TextStreamer

    from hybridize.converters.checkpoint import check_checkpoint, load, load_processor, parse_dtype
    from hybridize.inference.chat import generate_reply
    from hybridize.media import load_image

    nonempty_text(args.prompt, "--prompt")
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}.")
    check_checkpoint(args.path)
    parse_dtype(args.dtype)
    check_device(args.device)
    processor = load_processor(args.path)
    if processor is None:
        raise ValueError(f"{args.path!r} has no saved processor or tokenizer to turn the prompt into tokens.")
    if args.image and not hasattr(processor, "image_processor"):
        raise ValueError(
            f"{args.path!r} is a text-only model (no image processor saved with it); drop --image."
        )
    images = [load_image(path) for path in args.image]
    model = load(args.path, dtype=args.dtype, device=args.device)
    tokenizer = getattr(processor, "tokenizer", processor)
    generate_reply(
        model,
        processor,
        args.prompt,
        images,
        max_new_tokens=args.max_new_tokens,
        static_decode=args.static_decode,
        fuse=args.static_decode,  # the model is ours for this one command
        streamer=TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True),
    )


def parse_time(value: str) -> float:
    """ "10s", "10", "1.5", "1:30" or "1:02:03" -> seconds."""
    text = value.strip().removesuffix("s")
    try:
        seconds = 0.0
        for part in text.split(":"):
            seconds = seconds * 60 + float(part)
    except ValueError:
        raise ValueError(f"--at time {value!r} is not seconds (10s, 12.5) or [h:]m:s (1:30).") from None
    if seconds < 0 or len(text.split(":")) > 3:
        raise ValueError(f"--at time {value!r} is not seconds (10s, 12.5) or [h:]m:s (1:30).")
    return seconds


def question_schedule(asks: list[str], ats: list[str], duration: float) -> list[tuple[float, str]]:
    """(time, question) pairs in time order; a question without times is asked at the end of the video."""
    if ats and len(ats) not in (1, len(asks)):
        raise ValueError(
            f"Got {len(asks)} --ask and {len(ats)} --at: give one --at per --ask, one --at for all, or none."
        )
    schedule = []
    for idx, question in enumerate(asks):
        times = ats[idx if len(ats) > 1 else 0].split(",") if ats else [str(duration)]
        for time in (parse_time(t) for t in times if t.strip()):
            if time > duration + 1e-6:
                raise ValueError(f"--at {time:g}s is past the end of the video ({duration:.2f}s).")
            schedule.append((time, question))
    return sorted(schedule, key=lambda item: item[0])


def run_stream(args: argparse.Namespace) -> None:
    from hybridize.converters.checkpoint import check_checkpoint, parse_dtype
    from hybridize.media import import_av, video_duration

    try:
        import_av()
    except ImportError as error:
        raise ValueError(str(error)) from None
    if not Path(args.video).is_file():
        raise FileNotFoundError(f"Video {args.video!r} does not exist.")
    if not args.fps > 0:
        raise ValueError(f"--fps must be positive, got {args.fps}.")
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}.")
    for question in args.ask:
        nonempty_text(question, "--ask")
    vision = check_checkpoint(args.path).get("vision_config") or {}
    factor = vision.get("patch_size", 14) * vision.get("spatial_merge_size", 2)
    if args.frame_size <= 0 or args.frame_size % factor:
        raise ValueError(f"--frame-size must be a positive multiple of {factor}, got {args.frame_size}.")
    parse_dtype(args.dtype)
    check_device(args.device)
    args.compile = args.compile_mode or args.compile
    cuda_graphs = str(args.device or "").startswith("cuda") and not args.no_cuda_graphs
    if args.compile and not cuda_graphs:
        raise ValueError(
            "--compile compiles the CUDA-graph-captured frame steps: it needs --device cuda and no "
            "--no-cuda-graphs."
        )
    if args.overlap_encoder and not cuda_graphs:
        raise ValueError(
            "--overlap-encoder overlaps the CUDA-graph-captured frame steps on two streams: it needs --device "
            "cuda and no --no-cuda-graphs."
        )
    duration = video_duration(args.video)
    schedule = question_schedule(args.ask, args.at, duration)
    stream_video(args, duration, schedule)


def stream_video(args: argparse.Namespace, duration: float, schedule: list[tuple[float, str]]) -> None:
    import math
    import time

    from tqdm import tqdm

    from hybridize.converters.checkpoint import load, load_processor
    from hybridize.inference.streaming import StreamingSession
    from hybridize.media import sample_video

    processor = load_processor(args.path)
    if processor is None or not hasattr(processor, "image_processor"):
        raise ValueError(
            f"{args.path!r} has no saved processor with an image processor to turn frames into pixels."
        )
    model = load(args.path, dtype=args.dtype, device=args.device)
    session = StreamingSession(
        model,
        processor,
        frame_size=args.frame_size,
        system_prompt=args.system_prompt,
        cuda_graphs=False if args.no_cuda_graphs else None,
        fuse=True,  # the model is ours for this one command
        compile=args.compile,
        overlap_encoder=args.overlap_encoder,
    )
    pending = list(schedule)

    def answer_until(now: float) -> None:
        while pending and pending[0][0] <= now:
            at, question = pending.pop(0)
            answer = session.ask(question, max_new_tokens=args.max_new_tokens)
            tqdm.write(f"[{at:.1f}s, {session.frames} frames] {question}\n  {answer}")

    start = time.perf_counter()
    with tqdm(total=math.ceil(duration * args.fps - 1e-6), unit="frame", file=sys.stderr) as progress:
        for seconds, frame in sample_video(args.video, args.fps):
            answer_until(seconds - 1e-6)  # a question at t sees every frame up to t
            session.add_frame(frame)
            progress.update()
    answer_until(math.inf)
    elapsed = time.perf_counter() - start
    print(
        f"streamed {session.frames} frames ({session.tokens_per_frame} tokens each) in {elapsed:.1f} s; "
        f"state {session.cache_bytes() / 2**20:.1f} MiB",
        file=sys.stderr,
    )


def run_import(args: argparse.Namespace) -> None:
    from hybridize.converters.checkpoint import parse_dtype
    from hybridize.converters.infinitevl import import_infinitevl

    parse_dtype(args.dtype)
    out = import_infinitevl(  # refuses a non-empty --out before any work
        args.source, args.out, overwrite=args.overwrite, dtype=args.dtype, stage=args.stage
    )
    print(f"saved hybrid to {out}")


def run_eval(args: argparse.Namespace) -> None:
    from hybridize.evaluation.cli import run

    run(args)


def run_select(args: argparse.Namespace) -> None:
    from hybridize.selection.cli import run

    run(args)


def run_data(args: argparse.Namespace) -> None:
    from hybridize.lightning_modules.data.check import run

    run(args)


def run_train(args: argparse.Namespace) -> None:
    from hybridize.training import main as train

    train(args.arguments, debug=args.debug)


COMMANDS = {
    "convert": run_convert,
    "import": run_import,
    "train": run_train,
    "data": run_data,
    "eval": run_eval,
    "select": run_select,
    "mixers": run_mixers,
    "inspect": run_inspect,
    "generate": run_generate,
    "stream": run_stream,
}


# Errors a user's input causes: one line, exit code 2 (--debug shows the traceback).
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, ImportError)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    if argv[:1] == ["train"]:  # LightningCLI parses the rest (argparse would take its flags for its own)
        args = argparse.Namespace(
            verb="train", arguments=[a for a in argv[1:] if a != "--debug"], debug=debug
        )
    else:
        args = parser.parse_args(argv)
    from hybridize.compat import silence_stale_warnings

    silence_stale_warnings()
    try:
        COMMANDS[args.verb](args)
    except USER_ERRORS as error:
        if debug:
            raise
        message = " ".join(str(error).split())  # one line, whatever the library wrote
        parser.exit(2, f"hybridize {args.verb}: error: {message} (--debug shows the traceback)\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

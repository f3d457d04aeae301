"""`hybridize <verb>`: convert a model, inspect a hybrid, generate with it.

Every argument is checked (and the output directory refused) before any model is loaded, so bad input
fails in a second with one line that says what to change.
"""

from __future__ import annotations

import argparse
import json
import sys

from hybridize.mixers.base import INIT_POLICIES


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hybridize", description=__doc__.splitlines()[0])
    verbs = parser.add_subparsers(dest="verb", required=True)

    convert = verbs.add_parser("convert", help="turn a transformer into a hybrid and save it")
    convert.add_argument(
        "--base",
        required=True,
        help="hub id, local directory, short name (Qwen2.5-VL-3B) or embedded tiny-qwen2.5-vl",
    )
    which = convert.add_mutually_exclusive_group()
    which.add_argument(
        "--ratio", help='fraction of layers that keep softmax attention: "1/4", "0.25", "0", "1"'
    )
    which.add_argument("--swa-layers", help="explicit softmax (sliding-window) layers, e.g. 0,4,8")
    convert.add_argument("--window", type=int, default=8192, help="sliding window in tokens (default 8192)")
    convert.add_argument("--mixer", default="gated_deltanet", help="linear mixer for the other layers")
    convert.add_argument("--init", default="mimic", help=f"mixer init policy: {' | '.join(INIT_POLICIES)}")
    convert.add_argument("--out", required=True, help="output directory (must be new or empty)")
    convert.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    convert.add_argument("--dtype", default=None, help="fp32 | bf16 | fp16 (default: the checkpoint's)")
    convert.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default cpu)")

    inspect = verbs.add_parser("inspect", help="print the layer plan of a saved hybrid")
    inspect.add_argument("path")

    generate = verbs.add_parser("generate", help="generate a reply with a saved hybrid")
    generate.add_argument("path")
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--image", action="append", default=[], help="image file (repeat for several)")
    generate.add_argument("--max-new-tokens", type=int, default=32)
    generate.add_argument("--dtype", default=None)
    generate.add_argument("--device", default=None)
    return parser


def run_convert(args: argparse.Namespace) -> None:
    from hybridize.converters import checkpoint
    from hybridize.converters.convert import convert
    from hybridize.converters.plan import parse_ratio, plan_layers
    from hybridize.mixers.registry import get_mixer_class

    if args.ratio is None and args.swa_layers is None:
        raise ValueError("give --ratio (e.g. 1/4) or --swa-layers (e.g. 0,4,8).")
    if args.ratio is not None:
        parse_ratio(args.ratio)
    if args.window <= 0:
        raise ValueError(f"--window must be a positive number of tokens, got {args.window}.")
    get_mixer_class(args.mixer)
    if args.init not in INIT_POLICIES:
        raise ValueError(f"--init {args.init!r} is not one of {', '.join(INIT_POLICIES)}.")
    checkpoint.parse_dtype(args.dtype)
    out = checkpoint.check_output_dir(args.out, args.overwrite)
    config = checkpoint.load_base_config(args.base)
    num_layers = config.get_text_config(decoder=True).num_hidden_layers
    plan = plan_layers(
        num_layers,
        args.ratio,
        swa_layers=args.swa_layers,
        mixer=args.mixer,
        window=args.window,
        mixer_options={"init": args.init} if "init" in _fields(get_mixer_class(args.mixer)) else None,
    )

    print(f"loading {args.base} ...", file=sys.stderr)
    teacher, processor = checkpoint.load_base_model(args.base, dtype=args.dtype, device=args.device)
    hybrid, report = convert(teacher, plan)
    print(report.table())
    checkpoint.save_hybrid(hybrid, out, processor, overwrite=args.overwrite)
    print(f"saved hybrid to {out}")


def _fields(mixer_class) -> set[str]:
    import dataclasses

    return {field.name for field in dataclasses.fields(mixer_class.config_class)}


def run_inspect(args: argparse.Namespace) -> None:
    from hybridize.converters.checkpoint import read_plan

    data = read_plan(args.path)
    plan = data["hybridize"]
    print(
        f"{args.path}: {data['model_type']} (from {plan.get('base_model') or 'unknown base'}), ratio {plan.get('ratio')}"
    )
    for idx, name in enumerate(plan["layers"]):
        how = "config" if idx in plan.get("native_layers", []) else "module"
        print(f"{idx:>5}  {name:<16} {how}")
    for name, options in plan["mixers"].items():
        print(f"{name}: {json.dumps(options)}")


def run_generate(args: argparse.Namespace) -> None:
    from hybridize.converters.checkpoint import load, load_processor, parse_dtype, read_plan
    from hybridize.inference.chat import generate_reply, load_image

    read_plan(args.path)
    parse_dtype(args.dtype)
    images = [load_image(path) for path in args.image]
    processor = load_processor(args.path)
    if processor is None:
        raise ValueError(f"{args.path!r} has no saved processor or tokenizer to turn the prompt into tokens.")
    model = load(args.path, dtype=args.dtype, device=args.device)
    print(generate_reply(model, processor, args.prompt, images, max_new_tokens=args.max_new_tokens))


COMMANDS = {"convert": run_convert, "inspect": run_inspect, "generate": run_generate}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        COMMANDS[args.verb](args)
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        parser.exit(2, f"hybridize {args.verb}: error: {error}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

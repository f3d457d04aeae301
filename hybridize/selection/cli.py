"""`hybridize select`: the arguments and the entry point that `hybridize.cli` wires in."""

from __future__ import annotations

import argparse
import sys

METHOD_NAMES = ("kl", "nll", "mse", "uniform")  # the built-in methods (the registry may hold more)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--base", required=True, help="the teacher, as for convert (hub id, directory, short name)"
    )
    parser.add_argument(
        "--data",
        required=True,
        nargs="+",
        help="calibration data: chat JSON/JSONL files, or data sets (parquet / arrow folders, hub ids) as for "
        "training; samples must be longer than --window",
    )
    parser.add_argument(
        "--budget", required=True, help="softmax layers to keep: a count (9) or a fraction (1/4)"
    )
    parser.add_argument("--method", default="kl", help=f"how layers are scored: {', '.join(METHOD_NAMES)}")
    parser.add_argument("--mixer", default="gated_deltanet", help="the linear mixer of the other layers")
    parser.add_argument("--window", type=int, default=8192, help="the sliding window the kept layers get")
    parser.add_argument("--init", default=None, help="init policy of the mixers (default: the mixer's own)")
    parser.add_argument(
        "--align-steps",
        type=int,
        default=None,
        help="stage 1a steps of the all-linear student (default: the method's)",
    )
    parser.add_argument(
        "--train-steps",
        type=int,
        default=None,
        help="stage 1b steps per scored layer, kl (default: the method's)",
    )
    parser.add_argument(
        "--eval-batches", type=int, default=8, help="held-out batches the scores are measured on"
    )
    parser.add_argument("--learning-rate", type=float, default=1e-3, help="of the alignment and the kl runs")
    parser.add_argument("--greedy", action="store_true", help="kl: re-score the other layers after each pick")
    parser.add_argument(
        "--max-length", type=int, default=4096, help="tokens per sample (longer ones are cut)"
    )
    parser.add_argument("--batch-size", type=int, default=1, help="samples per batch")
    parser.add_argument("--seed", type=int, default=0, help="data order and mixer initialisation")
    parser.add_argument(
        "--devices",
        type=int,
        default=1,
        help="train on this many devices (DDP, spawned processes; scoring stays in the main process)",
    )
    parser.add_argument(
        "--out", required=True, help="new folder for plan.yaml, scores.json, scores.png; rerun to resume"
    )
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    parser.add_argument("--dtype", default=None, help="bf16, fp16, fp32 (default: bf16 on a GPU, else fp32)")


def data_module(args: argparse.Namespace):
    from hybridize.lightning_modules.data import ChatDataModule

    files = all(path.endswith((".json", ".jsonl")) for path in args.data)
    data = ChatDataModule(
        train_files=args.data if files else None,
        sources=None if files else list(args.data),
        processor=args.base,
        max_length=args.max_length,
        batch_size=args.batch_size,
        seed=args.seed,
    )
    data.setup("fit")
    return data


def run(args: argparse.Namespace) -> None:
    """Every input is checked, and the calibration data read, before the teacher's weights are loaded."""
    from pathlib import Path

    from hybridize.cli import check_device
    from hybridize.converters.checkpoint import (
        base_layer_specs,
        load_base_config,
        load_base_model,
        parse_dtype,
    )
    from hybridize.evaluation import default_placement
    from hybridize.evaluation.report import import_pyplot
    from hybridize.mixers.registry import get_mixer_class
    from hybridize.selection.select import (
        SelectionSettings,
        check_out_dir,
        hold_out,
        parse_budget,
        select_layers,
    )

    device, dtype = default_placement(args.device, args.dtype)
    parse_dtype(dtype)
    check_device(device)
    get_mixer_class(args.mixer)
    import_pyplot()  # the scores' plot needs it: fail before any work
    num_layers = len(base_layer_specs(load_base_config(args.base), args.base))
    settings = SelectionSettings(
        method=args.method,
        budget=parse_budget(args.budget, num_layers),
        window=args.window,
        mixer=args.mixer,
        init=args.init,
        align_steps=args.align_steps,
        train_steps=args.train_steps,
        eval_batches=args.eval_batches,
        learning_rate=args.learning_rate,
        greedy=args.greedy,
        seed=args.seed,
        devices=args.devices,
        source={"base": args.base, "data": list(args.data), "max_length": args.max_length, "dtype": dtype},
    )
    if device is not None and device.startswith("cuda"):
        import torch

        if settings.devices > torch.cuda.device_count():
            raise ValueError(
                f"--devices {settings.devices}: this machine has {torch.cuda.device_count()} CUDA devices; "
                "give at most that many."
            )
    check_out_dir(Path(args.out), settings)
    held_out, training = hold_out(data_module(args).train_dataloader(), settings)

    print(f"loading {args.base} ...", file=sys.stderr)
    teacher, _ = load_base_model(args.base, dtype=dtype, device=device)
    result = select_layers(teacher, [*held_out, *training], settings, out=args.out)
    print(f"softmax layers ({args.method}, budget {settings.budget}): {result.softmax_layers}")
    print(
        f"{result.tokens:,} tokens in {result.seconds:.1f} s; plan written to {Path(args.out) / 'plan.yaml'}"
    )

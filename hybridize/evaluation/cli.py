"""`hybridize eval fidelity | tasks`: the arguments and the entry point that `hybridize.cli` wires in."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser, parents: list[argparse.ArgumentParser] = ()) -> None:
    """Add the `fidelity` and `tasks` sub-commands to the `eval` parser (`parents`: shared flags like --debug)."""
    commands = parser.add_subparsers(dest="evaluation", required=True, help="what to measure")

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return commands.add_parser(
            name, help=help, parents=list(parents), formatter_class=argparse.ArgumentDefaultsHelpFormatter
        )

    fidelity = command("fidelity", "KL, top-1 agreement and per-layer errors of a hybrid against its teacher")
    fidelity.add_argument("hybrid", help="saved hybrid directory")
    fidelity.add_argument(
        "--teacher", required=True, help="the base model it was converted from (as for convert)"
    )
    fidelity.add_argument(
        "--data",
        required=True,
        nargs="+",
        help="chat data: LLaVA/ShareGPT or messages JSON/JSONL files or globs",
    )
    fidelity.add_argument(
        "--max-samples", type=int, default=None, help="use the first N samples (default all)"
    )
    fidelity.add_argument(
        "--max-length", type=int, default=4096, help="tokens per sample (longer ones are cut)"
    )
    fidelity.add_argument("--batch-size", type=int, default=4, help="samples per forward")
    fidelity.add_argument("--out", required=True, help="new or empty folder for fidelity.{json,md,png}")
    add_placement(fidelity)

    tasks = command(
        "tasks", "generation accuracy on local task files (exact match, relaxed, ANLS, multiple choice)"
    )
    tasks.add_argument(
        "model", help="saved hybrid directory, or a base model (hub id, directory, tiny-qwen2.5-vl)"
    )
    tasks.add_argument(
        "--tasks", required=True, nargs="+", help="task files (JSONL or parquet), one task each"
    )
    tasks.add_argument("--compare", default=None, help="a second model (e.g. the base) run on the same tasks")
    tasks.add_argument("--batch-size", type=int, default=8, help="questions per generate call")
    tasks.add_argument("--max-new-tokens", type=int, default=32, help="most tokens per answer")
    tasks.add_argument("--out", required=True, help="new or empty folder for tasks.{json,md}")
    add_placement(tasks)


def add_placement(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    parser.add_argument("--dtype", default=None, help="bf16, fp16, fp32 (default: bf16 on a GPU, else fp32)")


def check_placement(args: argparse.Namespace) -> None:
    from hybridize.cli import check_device
    from hybridize.converters.checkpoint import parse_dtype

    parse_dtype(args.dtype)
    check_device(args.device)


def run(args: argparse.Namespace) -> None:
    """Run `hybridize eval <fidelity|tasks>` from parsed arguments; bad input raises before a model loads."""
    check_placement(args)
    if args.evaluation == "fidelity":
        from hybridize.evaluation.fidelity import evaluate_fidelity
        from hybridize.evaluation.report import import_pyplot

        import_pyplot()  # before any work: the report's plot needs it
        evaluate_fidelity(
            args.hybrid,
            args.teacher,
            args.data,
            args.out,
            max_samples=args.max_samples,
            max_length=args.max_length,
            batch_size=args.batch_size,
            device=args.device,
            dtype=args.dtype,
        )
    else:
        from hybridize.evaluation.tasks import evaluate_tasks

        evaluate_tasks(
            args.model,
            args.tasks,
            args.out,
            compare=args.compare,
            batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens,
            device=args.device,
            dtype=args.dtype,
        )

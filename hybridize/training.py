"""`hybridize train [fit|validate] --config stage.yaml [--section.key value ...]`: one training stage through
LightningCLI (jsonargparse): a stage module from `hybridize.lightning_modules`, the chat data module and the
Trainer, all from YAML. The data module reads the processor saved with the model's checkpoint. `--ckpt_path`
resumes an interrupted run (`last` picks the newest checkpoint of the run's ModelCheckpoint)."""

from __future__ import annotations

import argparse
import contextlib
import logging
import re
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

from lightning.pytorch.cli import LightningCLI

from hybridize.lightning_modules.data import ChatDataModule
from hybridize.lightning_modules.stage import HybridStage
from hybridize.lightning_modules.strategies import leave_process_group

SUBCOMMANDS = ("fit", "validate")


class HybridizeCLI(LightningCLI):
    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {name: spec for name, spec in LightningCLI.subcommands().items() if name in SUBCOMMANDS}

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.init_args.checkpoint", "data.init_args.processor")

    def parse_arguments(self, parser, args) -> None:
        with own_argv():
            super().parse_arguments(parser, args)

    def _run_subcommand(self, subcommand: str) -> None:
        try:
            super()._run_subcommand(subcommand)
        except BaseException:
            remove_unused_log_dir(self.trainer)
            raise


def remove_unused_log_dir(trainer) -> None:
    """A run that failed before its first step leaves no log folder behind (the config it saved, the logger's
    empty event or metrics files)."""
    log_dir = Path(trainer.log_dir) if trainer.log_dir else None
    if log_dir is None or not log_dir.is_dir() or trainer.global_step > 0 or any(log_dir.rglob("*.ckpt")):
        return
    shutil.rmtree(log_dir)
    for parent in (log_dir.parent, log_dir.parent.parent):  # lightning_logs/, then the root it made
        if parent.is_dir() and not any(parent.iterdir()):
            parent.rmdir()


@contextlib.contextmanager
def own_argv() -> Iterator[None]:
    """LightningCLI gets its arguments from us: hide the `hybridize train ...` command line from its parsing (it warns
    when both are present), and only from that: Lightning's DDP launcher starts the other ranks with `sys.argv`."""
    saved = sys.argv
    sys.argv = saved[:1]
    try:
        yield
    finally:
        sys.argv = saved


UNION_NOISE = ("Does not validate", "Subtypes:", "Errors:", "Given value", "- Expected a <class 'NoneType'>")


def summarize_parser_error(message: str) -> str:
    """jsonargparse's report (for a class in a Union: one block per candidate type, then the given value) as one
    line: the key, and the reason given for the class that was named."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    kept = [line.removeprefix("- ") for line in lines if not line.startswith(UNION_NOISE)]
    text = re.sub(r"Problem with given class_path '([\w.]+)':", r"(\1)", " ".join(kept))
    if re.search(r"not accepted|unrecognized arguments", text):
        text += " (hybridize train --help lists every setting)"
    return text


def main(argv: list[str], debug: bool = False) -> None:
    if not argv or argv[0] not in (*SUBCOMMANDS, "-h", "--help"):
        argv = ["fit", *argv]
    no_exit = {"exit_on_error": False}
    logging.getLogger("lightning.fabric.utilities.seed").setLevel(
        logging.WARNING
    )  # the seed is in the saved config
    try:
        HybridizeCLI(
            HybridStage,
            ChatDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            auto_configure_optimizers=False,  # each stage builds its AdamW + schedule from its own arguments
            save_config_kwargs={"overwrite": True},
            parser_kwargs={**no_exit, **{name: no_exit for name in SUBCOMMANDS}},
            args=argv,
        )
    except (argparse.ArgumentError, ValueError) as error:  # bad settings, or a stage refusing its inputs
        if debug:
            raise
        raise ValueError(summarize_parser_error(str(error))) from None
    leave_process_group()  # each rank of a DDP/FSDP run, together, before the process ends

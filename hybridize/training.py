"""`hybridize train [fit|validate] --config stage.yaml [--section.key value ...]`: one training stage through
LightningCLI (jsonargparse): a stage module from `hybridize.lightning_modules`, the chat data module and the
Trainer, all from YAML. The data module reads the processor saved with the model's checkpoint. `--ckpt_path`
resumes an interrupted run (`last` picks the newest checkpoint of the run's ModelCheckpoint)."""

from __future__ import annotations

from lightning.pytorch.cli import LightningCLI

from hybridize.lightning_modules.data import ChatDataModule
from hybridize.lightning_modules.stage import HybridStage

SUBCOMMANDS = ("fit", "validate")


class HybridizeCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.init_args.checkpoint", "data.init_args.processor")


def main(argv: list[str]) -> None:
    if not argv or argv[0] not in (*SUBCOMMANDS, "-h", "--help"):
        argv = ["fit", *argv]
    HybridizeCLI(
        HybridStage,
        ChatDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        auto_configure_optimizers=False,  # each stage builds its AdamW + schedule from its own arguments
        save_config_kwargs={"overwrite": True},
        args=argv,
    )

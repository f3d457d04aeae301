"""Running `hybridize eval` sub-commands through their own parser (what `hybridize.cli` wires in)."""

from __future__ import annotations

import argparse

from hybridize.evaluation import cli


def run_eval(*argv: str) -> None:
    parser = argparse.ArgumentParser(prog="hybridize eval")
    cli.add_arguments(parser)
    cli.run(parser.parse_args(argv))

"""The ``melt`` command: one entry point with a subcommand per job, as ``vllm serve`` or ``accelerate launch``.

    melt convert OURO_DIR OUT_DIR --gate latent        # = python -m melt_kernels.ouro convert ...
    melt train --teacher OURO_DIR --out RUN_DIR ...     # = python -m melt_kernels.train ...
    python -m melt_kernels convert ...                  # the same command without the console script

Each subcommand is its module's own command line (``melt SUBCOMMAND --help``), imported only when chosen.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# subcommand: (module with main(argv, prog), how main's argv starts, help)
COMMANDS = {
    "convert": ("melt_kernels.ouro", ["convert"], "convert an Ouro checkpoint to MELT, save it and generate"),
    "train": ("melt_kernels.train.__main__", [], "post-train MELT from a LoopLM teacher (the paper's recipe)"),
}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="melt", description="MELT models: convert Ouro checkpoints, post-train, "
                                     "generate.  `melt SUBCOMMAND --help` for each.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}")
    for name, (_, _, text) in COMMANDS.items():
        sub.add_parser(name, help=text, add_help=False)  # the subcommand's own parser answers --help
    args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    module, head, _ = COMMANDS[args.command]
    prog = "melt" if head else f"melt {args.command}"  # convert's own parser names its subcommand itself
    return importlib.import_module(module).main([*head, *rest], prog=prog)

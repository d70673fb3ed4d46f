"""The ``melt`` command: one entry point with a subcommand per job, as ``vllm serve`` or ``accelerate launch``.

    melt convert OURO_DIR OUT_DIR --gate latent        # = python -m melt_kernels.ouro convert ...
    melt train --teacher OURO_DIR --out RUN_DIR ...     # = python -m melt_kernels.train ...
    python -m melt_kernels convert ...                  # the same command without the console script

Each subcommand is its module's own command line (``melt SUBCOMMAND --help``), imported only when chosen.  A
run that succeeds exits with status 0; an argument whose file or folder cannot be used ends the command with one
line naming it, as argparse reports its own errors (:func:`reading`, :func:`reporting`), and status 2.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import sys

# subcommand: (module with main(argv, prog), how main's argv starts, help)
COMMANDS = {
    "convert": ("melt_kernels.ouro", ["convert"], "convert an Ouro checkpoint to MELT, save it and generate"),
    "train": ("melt_kernels.train.__main__", [], "post-train MELT from a LoopLM teacher (the paper's recipe)"),
}


class ArgumentProblem(Exception):
    """What was wrong with a command-line argument's file, folder or value, naming the argument."""


@contextlib.contextmanager
def reading(argument: str):
    """Turns the errors of reading what ``argument`` names (a missing or unreadable file, a checkpoint that is not
    one, a field or tensor the package does not implement) into one :class:`ArgumentProblem` naming it."""
    from safetensors import SafetensorError

    try:
        yield
    except (OSError, ValueError, KeyError, ImportError, SafetensorError) as e:
        why = e.args[0] if isinstance(e, KeyError) and e.args else e  # KeyError's str() adds quotes
        raise ArgumentProblem(f"argument {argument}: {why}") from e


@contextlib.contextmanager
def reporting(prog: str):
    """Ends command ``prog`` as argparse ends it on a bad argument: one line on stderr, status 2."""
    try:
        yield
    except ArgumentProblem as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(2)


def main(argv=None) -> None:
    """The console script: runs the subcommand and returns None (status 0), never its result, which
    ``sys.exit`` would print and turn into status 1."""
    parser = argparse.ArgumentParser(prog="melt", description="MELT models: convert Ouro checkpoints, post-train, "
                                     "generate.  `melt SUBCOMMAND --help` for each.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}")
    for name, (_, _, text) in COMMANDS.items():
        sub.add_parser(name, help=text, add_help=False)  # the subcommand's own parser answers --help
    args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    module, head, _ = COMMANDS[args.command]
    prog = "melt" if head else f"melt {args.command}"  # convert's own parser names its subcommand itself
    importlib.import_module(module).main([*head, *rest], prog=prog)

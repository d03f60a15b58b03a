"""`segbook` console script: one small module per subcommand in `segbook.commands`.

Each command module defines `HELP`, `add_arguments(parser)` and `run(args) -> int`. Errors a user can act
on (SegBookError) are printed as one line, without a traceback; Ctrl-C exits 130.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import re
import sys

from . import parentwatch
from .errors import SegBookError

COMMANDS = ["predict", "finetune", "evaluate", "models", "download"]


def _load(name: str):
    try:
        return importlib.import_module(f"segbook.commands.{name}")
    except ModuleNotFoundError as e:
        if e.name == f"segbook.commands.{name}":
            return None  # a command still being built is simply not offered
        raise


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="segbook", description="STU-Net segmentation and fine-tuning")
    parser.add_argument("-v", "--verbose", action="store_true", help="log details to stderr")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        module = _load(name)
        if module is not None:
            p = sub.add_parser(name, help=module.HELP, description=module.HELP)
            module.add_arguments(p)
            p.set_defaults(_run=module.run)
    return parser


# A value made of numbers and commas that starts with a minus, e.g. `--roi -50,-20,100,60,80,180`: argparse
# takes it for an option (it knows only single negative numbers), so it is bound to the option before it.
_NEGATIVE_LIST = re.compile(r"^-[0-9.][0-9.eE+-]*(,[-+0-9.eE]+)+$")


def _bind_negative_lists(argv: list[str]) -> list[str]:
    out = []
    for arg in argv:
        if out and out[-1].startswith("--") and "=" not in out[-1] and _NEGATIVE_LIST.match(arg):
            out[-1] = f"{out[-1]}={arg}"
        else:
            out.append(arg)
    return out


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(_bind_negative_lists(argv))
    args.argv = argv   # as typed after the program name: fine-tuning records it in the model's provenance
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    parentwatch.watch()     # started by the Slicer module: end with it
    try:
        return int(args._run(args) or 0)
    except SegBookError as e:
        print(f"segbook {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"segbook {args.command}: interrupted", file=sys.stderr)
        return 130

"""The `meshplan` console script: parse, call the library, print. Bad input is one line
on stderr and exit code 2."""
from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import os
import sys

from meshplan.cli.common import flag
from meshplan.core.errors import MeshplanError

# Each module in meshplan/cli registers one subcommand; imported on demand so that
# commands which do not need torch never import it.
COMMANDS = ("simulate", "plan", "whatif", "profile", "run", "validate")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meshplan", description=(
        "Plan, simulate and run data/tensor/sequence/context/pipeline-parallel training "
        "of large transformers."))
    parser.add_argument("--version", action="version",
                        version=f"%(prog)s {importlib.metadata.version('meshplan')}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"meshplan.cli.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args) or 0
    except MeshplanError as exc:
        print(f"meshplan {args.command}: error: {exc.render(flag)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"meshplan {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader of our output went away (`meshplan plan --json | head`): stop quietly with
        # exit 1, as rich's console does for the tables, and no second error at interpreter exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())

"""The `meshplan` console script: parse, call the library, print. Bad input is one line
on stderr and exit code 2."""
from __future__ import annotations

import os

# Before numpy is imported, which reads it once: numpy advises transparent huge pages for
# arrays of 4 MiB and more, and a kernel that defragments advised memory on fault (THP
# defrag "madvise", its default) stalled the first search 0.4-0.8 s here compacting for the
# candidate table's fresh ~0.7 GB (numpy.org/doc/stable/reference/global_state.html).
os.environ.setdefault("NUMPY_MADVISE_HUGEPAGE", "0")

import argparse  # noqa: E402
import difflib  # noqa: E402
import functools  # noqa: E402
import importlib  # noqa: E402
import importlib.metadata  # noqa: E402
import sys  # noqa: E402

from meshplan.cli.common import flag  # noqa: E402
from meshplan.core.errors import MeshplanError  # noqa: E402

# Each module in meshplan/cli registers one subcommand; imported on demand so that
# commands which do not need torch never import it.
COMMANDS = ("simulate", "plan", "whatif", "profile", "run", "validate")


class Parser(argparse.ArgumentParser):
    """argparse's parser whose errors (a missing or malformed argument) are one line on
    stderr pointing to --help, as the CLI's other errors are, not the whole usage text."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help\n")


def build_parser() -> argparse.ArgumentParser:
    # No abbreviated flags: argparse would otherwise read whatif's --mode as --model
    parser = Parser(prog="meshplan", allow_abbrev=False, description=(
        "Plan, simulate and run data/tensor/sequence/context/pipeline-parallel training "
        "of large transformers."))
    parser.add_argument("--version", action="version",
                        version=f"%(prog)s {importlib.metadata.version('meshplan')}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                parser_class=functools.partial(Parser, allow_abbrev=False))
    for name in COMMANDS:
        importlib.import_module(f"meshplan.cli.{name}").register(sub)
    for command in sub.choices.values():  # for unknown_arguments' hints
        command.set_defaults(command_parser=command)
    return parser


def unknown_arguments(command: argparse.ArgumentParser, extras: list[str]) -> str:
    """The error for arguments `command` does not take: each unknown flag with the flags
    of `command` it may have meant (those it begins, those holding its word, a close
    spelling)."""
    known = [o for action in command._actions for o in action.option_strings if o.startswith("--")]
    hints = []
    for arg in extras:
        name = arg.split("=", 1)[0]
        if not name.startswith("--"):
            continue
        word = name[2:].rstrip("s")
        near = ([o for o in known if o.startswith(name)] or [o for o in known if word and word in o]
                or difflib.get_close_matches(name, known, 3, 0.8))
        hints.append(f"{name}: did you mean {' or '.join(near[:3])}?" if near else f"{name}: no such flag")
    return (f"unrecognized arguments: {' '.join(extras)}" + (f" ({'; '.join(hints)})" if hints else "")
            + f"; see {command.prog} --help")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    if extras:  # one line, naming the flags of the subcommand that were meant
        command = args.command_parser
        print(f"{command.prog}: error: {unknown_arguments(command, extras)}", file=sys.stderr)
        return 2
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

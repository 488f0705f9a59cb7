"""The `hasten` command line: one module per command, each with `register(subparsers)`.

Generated text goes to stdout and nothing else; progress, statistics and errors go to stderr,
so output can be piped and compared. This package sits on top of everything: it imports the
library (`hasten.api`, ...) and nothing imports it.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from ..errors import HastenError

# Each names a module `hasten.commands.<name>` whose `register(subparsers)` adds its parser(s)
# and sets `run` (a function of the parsed arguments) as a default.
COMMAND_MODULES = ("generate", "bench", "check", "serve", "datastore", "distill", "train", "redteam",
                   "bitdelta", "finetune", "export")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hasten", description="Lossless speculative decoding: the same text as plain "
        "decoding, generated faster. Generated text goes to stdout; progress, statistics and "
        "errors go to stderr. `hasten COMMAND --help` explains each command.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"{__name__}.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        import transformers
        transformers.logging.set_verbosity_error()
        args.run(args)
    except HastenError as e:
        print(f"hasten: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0

"""The ``cqil`` console script.

One module per subcommand (:mod:`cqil.cli.fetch_model`, :mod:`~cqil.cli.analyze`,
:mod:`~cqil.cli.plan`, :mod:`~cqil.cli.export`, :mod:`~cqil.cli.evaluate`, :mod:`~cqil.cli.recover`),
each with an ``add_<name>_parser`` function that declares its arguments and a ``run_<name>`` function
that calls the library; :func:`main` wires them together. Bad input (a missing file, an unknown
model, an impossible plan: a :class:`cqil.errors.CqilError`, or an argparse usage error) ends with
one ``cqil: error: ...`` line and exit status 2; any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys

from cqil.cli.analyze import add_analyze_parser
from cqil.cli.evaluate import add_evaluate_parser
from cqil.cli.export import add_export_parser
from cqil.cli.fetch_model import add_fetch_model_parser
from cqil.cli.plan import add_plan_parser
from cqil.cli.recover import add_recover_parser
from cqil.errors import CqilError

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors are the same single line as every other input error."""

    def error(self, message: str) -> None:
        self.exit(EXIT_USAGE, f"cqil: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="cqil", description="Recovery training for LLMs with parallelized layers.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    add_fetch_model_parser(subparsers)
    add_analyze_parser(subparsers)
    add_plan_parser(subparsers)
    add_export_parser(subparsers)
    add_evaluate_parser(subparsers)
    add_recover_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-shard loading bars drown the command's own output
    try:
        return args.run(args)
    except CqilError as e:
        # Library messages may span lines (transformers' do); the contract is one line.
        print(f"cqil: error: {' '.join(str(e).split())}", file=sys.stderr)
        return EXIT_USAGE

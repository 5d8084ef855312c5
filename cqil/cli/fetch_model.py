"""``cqil fetch-model``: convert an embedded model once and print its folder."""

from __future__ import annotations

import argparse


def add_fetch_model_parser(subparsers) -> None:
    from cqil.pretrained import EMBEDDED_MODELS

    p = subparsers.add_parser(
        "fetch-model",
        help="convert an embedded model to a Hugging Face folder and print its path",
        description="Convert an embedded model (shipped as GGUF in a pip package) once into a "
        "Hugging Face folder under $CQIL_HOME and print the folder.",
    )
    p.add_argument("name", choices=sorted(EMBEDDED_MODELS), help="embedded model name")
    p.add_argument("--force", action="store_true", help="convert again, replacing the existing folder")
    p.set_defaults(run=run_fetch_model)


def run_fetch_model(args: argparse.Namespace) -> int:
    from cqil.pretrained import fetch_model

    print(fetch_model(args.name, force=args.force))
    return 0

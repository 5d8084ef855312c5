"""``cqil recover RECIPE [key=value ...]``: run a whole recovery from a recipe.

The same as ``train/recover.py`` (which calls :func:`load` and :func:`recover` from here): runs under
``python``, ``accelerate launch`` (DDP or DeepSpeed) and ``torchrun``. Overrides use dotted keys and
YAML values, e.g. ``train.max_steps=50 'parallelize.groups=[[2,3],[4,5]]'``. Exit codes: 0 done, 75
preempted (SIGTERM/SIGUSR1, checkpoint written: run the same command again to resume), 3 non-finite loss.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence


def add_recover_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "recover",
        help="recovery training of a parallelized model from a recipe YAML",
        description="Run a whole recovery from RECIPE (see recipes/): parallelize the model, train the "
        "recipe's parameters, evaluate and export. key=value overrides use dotted keys and YAML values, "
        "e.g. train.max_steps=50. Exit status 75: preempted, checkpoint written (run again to resume); "
        "3: non-finite loss.",
    )
    p.add_argument("recipe", help="recipe YAML file")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted-key overrides of the recipe")
    p.set_defaults(run=run_recover)


def load(path: str, overrides: Sequence[str] = ()):
    """The recipe at ``path`` with ``overrides`` applied; a file that cannot be read is a RecipeError."""
    from cqil.recovery.recipe import RecipeError, load_recipe

    try:
        return load_recipe(path, list(overrides))
    except RecipeError:
        raise
    except OSError as e:
        raise RecipeError(path, "", f"cannot read the recipe ({e.strerror or e})") from None


def recover(recipe, *, source: str) -> int:
    """Run the recovery of a loaded ``recipe``; returns the process exit code."""
    from cqil.recovery.trainer import run

    return run(recipe, source=source)


def run_recover(args: argparse.Namespace) -> int:
    return recover(load(args.recipe, args.overrides), source=args.recipe)

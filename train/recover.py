"""Recover a parallelized LLM: ``accelerate launch train/recover.py RECIPE.yaml [key=value ...]``.

Runs the same under ``python``, ``accelerate launch`` (DDP or DeepSpeed) and ``torchrun``; it is
``cqil recover`` (:mod:`cqil.cli.recover`) as a script, and all the logic is in
:mod:`cqil.recovery.trainer`. Bad input: one ``error:`` line, exit 2. Overrides use dotted keys and YAML values, e.g.
``train.max_steps=50 'parallelize.groups=[[2,3],[4,5]]'``. Exit codes: 0 done, 75 preempted
(SIGTERM/SIGUSR1, checkpoint written: run the same command again to resume), 3 non-finite loss.
"""

import sys

from cqil.cli.recover import load, recover
from cqil.errors import CqilError


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else 2
    try:  # bad input (a CqilError) is one line and exit 2; anything else keeps its traceback
        return recover(load(argv[0], argv[1:]), source=argv[0])
    except CqilError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""``python -m cqil``: the same as the ``cqil`` console script."""

import sys

from cqil.cli import main

sys.exit(main())

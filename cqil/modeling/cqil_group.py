"""Inside the package, the exported model's ``cqil_group`` module is :mod:`cqil.rewrite.group` itself.

An export copies ``cqil/rewrite/group.py`` verbatim next to ``modeling_cqil.py`` under the name
``cqil_group.py``; ``modeling_cqil.py`` imports it relatively (``from .cqil_group import ...``),
which transformers' remote-code loader follows, copying the file along. Inside the package the same
relative import lands here, so a model loaded with the package's classes holds the very classes of
:mod:`cqil.rewrite.group` and the ``isinstance`` checks of :mod:`cqil.rewrite.surgery` keep working on it.
"""

from cqil.rewrite.group import (
    BranchGroup,
    MergedGroup,
    ParallelGroup,
    bypass_mask,
    effective_layers,
    set_layer_idx,
    take_cache,
)

__all__ = [
    "BranchGroup",
    "MergedGroup",
    "ParallelGroup",
    "bypass_mask",
    "effective_layers",
    "set_layer_idx",
    "take_cache",
]

"""Inside the package, the exported model's ``cqil_compat`` module is :mod:`cqil._compat` itself.

An export copies ``cqil/_compat.py`` verbatim next to ``modeling_cqil.py`` under the name
``cqil_compat.py`` (see :mod:`cqil.modeling.cqil_group` for why the shim exists).
"""

from cqil._compat import cache_kwargs, capture_hidden_states, causal_lm_output, output_cache

__all__ = ["cache_kwargs", "capture_hidden_states", "causal_lm_output", "output_cache"]

"""The exported model's code: :class:`CqilConfig` and :class:`CqilForCausalLM`.

These modules are copied verbatim into every export folder (``configuration_cqil.py``,
``modeling_cqil.py``, and ``cqil/rewrite/group.py`` as ``cqil_group.py``) so that
``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`` works without cqil
installed. Inside the package they are ordinary modules: :func:`cqil.export.load.load_export` loads an
export with these classes directly, without remote code.
"""

from cqil.modeling.configuration_cqil import CqilConfig
from cqil.modeling.modeling_cqil import CqilForCausalLM

__all__ = ["CqilConfig", "CqilForCausalLM"]

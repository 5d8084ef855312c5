"""The cqil export folder: its format, its check (:func:`check_export`) and loading it back (:func:`load_export`).

An export folder holds::

    config.json                   model_type "cqil", auto_map -> the two files below
    configuration_cqil.py         CqilConfig            (cqil/modeling/configuration_cqil.py, verbatim)
    modeling_cqil.py              CqilForCausalLM       (cqil/modeling/modeling_cqil.py, verbatim)
    cqil_group.py                 the group math        (cqil/rewrite/group.py, verbatim; imported relatively)
    cqil_compat.py                transformers touchpoints (cqil/_compat.py, verbatim; imported relatively)
    model.safetensors             or model-0000i-of-0000n.safetensors + model.safetensors.index.json
    generation_config.json
    tokenizer files               when a tokenizer is given
    README.md                     the model card: YAML metadata + what was done, results, how to load
    plots/*.png                   the report's plots, when given

``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`` loads it with transformers
alone; :func:`load_export` loads it with this package's classes (no remote code). The state dict
keys are those of the in-memory parallelized model, so weights are written as they are. Nothing is
ever pickled: weights are safetensors, everything else JSON, Python source or Markdown.

Every export is written into a hidden temporary sibling of ``out_dir`` and renamed into place at the
end, so a failure leaves no partial folder behind.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from cqil._compat import zero3_init_disabled
from cqil.errors import ModelError, ModelNotFoundError

if TYPE_CHECKING:
    pass


_PACKAGE = Path(__file__).resolve().parents[1]
# Export-folder name -> source file in the package.
CODE_FILES = {
    "configuration_cqil.py": _PACKAGE / "modeling" / "configuration_cqil.py",
    "modeling_cqil.py": _PACKAGE / "modeling" / "modeling_cqil.py",
    "cqil_group.py": _PACKAGE / "rewrite" / "group.py",
    "cqil_compat.py": _PACKAGE / "_compat.py",
}
AUTO_MAP = {
    "AutoConfig": "configuration_cqil.CqilConfig",
    "AutoModelForCausalLM": "modeling_cqil.CqilForCausalLM",
}
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
# What a model folder must never contain: every one of these is (or may be) a pickle.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"dtype {dtype} is not supported; expected one of {sorted(DTYPES)}")
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def check_export(folder: str | os.PathLike):
    """Check that ``folder`` is a complete cqil export and return its :class:`CqilConfig`.

    Raises ``FileNotFoundError`` (a missing folder, config, code or weight file) or ``ValueError``
    (not a cqil export, a malformed ``cqil`` entry, a weight missing, unexpected or of the wrong
    shape), each with one message that names the file or key.
    """
    from safetensors import safe_open

    from cqil.modeling.configuration_cqil import CqilConfig

    folder = Path(folder)
    if not folder.is_dir():
        raise ModelNotFoundError(f"{folder}: no such folder")
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ModelNotFoundError(f"{config_path}: no such file; {folder} is not a model folder")
    try:
        raw = json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ModelError(f"{config_path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict) or raw.get("model_type") != "cqil":
        found = raw.get("model_type") if isinstance(raw, dict) else None
        raise ModelError(
            f"{config_path}: model_type is {found!r}, not 'cqil'; {folder} is not a cqil export "
            "(write one with `cqil export` or cqil.export_model)"
        )
    for key in ("cqil", "text_config"):
        if not isinstance(raw.get(key), dict):
            raise ModelError(f"{config_path}: '{key}' is missing or not an object")
    for key in ("plan", "bypass", "bypass_distance", "gates", "gate_shape", "form"):
        if key not in raw["cqil"]:
            raise ModelError(f"{config_path}: 'cqil.{key}' is missing")
    for name in CODE_FILES:
        if not (folder / name).is_file():
            raise ModelNotFoundError(f"{folder / name}: no such file (the export's model code)")

    shapes = _checkpoint_shapes(folder, safe_open)
    try:
        config = CqilConfig.from_pretrained(folder)
        expected = _expected_shapes(config)
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise ModelError(f"{config_path}: does not describe a model ({type(e).__name__}: {e})") from None
    _compare_shapes(
        expected, {k: (str(folder / f), shape) for k, (f, shape) in shapes.items()}, where=str(folder)
    )
    return config


def _expected_shapes(config) -> dict[str, tuple[int, ...]]:
    """``{key: shape}`` of the weights a saved model with ``config`` has (tied copies left out)."""
    from cqil.modeling.modeling_cqil import CqilForCausalLM

    with torch.device("meta"), zero3_init_disabled():  # shapes only: nothing allocated or initialised
        skeleton = CqilForCausalLM(config)
    tied = set(skeleton.all_tied_weights_keys)
    return {k: tuple(v.shape) for k, v in skeleton.state_dict().items() if k not in tied}


def _compare_shapes(
    expected: dict[str, tuple[int, ...]], found: dict[str, tuple[str, tuple[int, ...]]], *, where: str
) -> None:
    """Raise ``ValueError`` naming the first missing, mis-shaped or unexpected weight.

    ``found`` maps each key to (the file holding it, its shape).
    """
    for key, shape in expected.items():
        if key not in found:
            raise ModelError(f"{where}: weight {key!r} is missing (config.json has it)")
        file, got = found[key]
        if got != shape:
            raise ModelError(
                f"{file}: weight {key!r} has shape {list(got)} but config.json implies {list(shape)}"
            )
    for key, (file, _) in found.items():
        if key not in expected:
            raise ModelError(f"{file}: unexpected weight {key!r} (config.json has no such parameter)")


def _checkpoint_shapes(folder: Path, safe_open) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``{key: (file name, shape)}`` of every tensor in the folder's safetensors, read from headers only."""
    index = folder / WEIGHTS_INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ModelError(f"{index}: not a safetensors index ({type(e).__name__}: {e})") from None
        files = sorted(set(weight_map.values()))
    elif (folder / WEIGHTS_NAME).is_file():
        files = [WEIGHTS_NAME]
    else:
        raise ModelNotFoundError(
            f"{folder}: no {WEIGHTS_NAME} or {WEIGHTS_INDEX_NAME} (missing weight files)"
        )
    shapes = {}
    for name in files:
        path = folder / name
        if not path.is_file():
            raise ModelNotFoundError(f"{path}: missing weight file (listed in {WEIGHTS_INDEX_NAME})")
        try:
            with safe_open(path, framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 (a safe_open handle is not iterable)
                    shapes[key] = (name, tuple(f.get_slice(key).get_shape()))
        except Exception as e:  # safetensors raises its own error types for a corrupt header
            raise ModelError(f"{path}: not a readable safetensors file ({e})") from None
    return shapes


def load_export(
    folder: str | os.PathLike,
    *,
    dtype: str | torch.dtype | None = None,
    attn_implementation: str | None = None,
    device: str | torch.device | None = None,
):
    """Load an export with this package's classes (no remote code), after :func:`check_export`.

    ``dtype`` defaults to the dtype the weights were saved in. The groups of the returned model are
    :mod:`cqil.rewrite.group` modules, so :mod:`cqil.rewrite.surgery`'s helpers work on it.
    """
    from cqil.modeling.modeling_cqil import CqilForCausalLM

    config = check_export(folder)
    model = CqilForCausalLM.from_pretrained(
        folder,
        config=config,
        dtype=_parse_dtype(dtype) if dtype is not None else "auto",
        attn_implementation=attn_implementation,
    )
    if device is not None:
        model.to(device)
    return model.eval()


# ---------------------------------------------------------------------------------------------- hub
